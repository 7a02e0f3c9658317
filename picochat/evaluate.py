"""`picochat eval`: bits per byte and CORE for base models, chat evals (ChatCORE) for chat models.

    picochat eval base [--run R] [--step N] [--max-per-task N] [--bundle DIR]
        validation bits per byte (the data folder's last shard) and CORE over the eval bundle's 22 tasks
        (picochat/core.py); writes runs/<run>/base/eval_base.json
    picochat eval chat -t TASK|all [--run R] [--stage sft|rl] [-k K] [--max-problems N]
        ARC-Easy, ARC-Challenge, MMLU (letter of the choice: one forward pass, argmax over the letters),
        GSM8K, HumanEval, SpellingBee (generated with the tool live; pass@k over k samples) and the demo
        curriculum's DemoProblems and DemoSpelling; writes runs/<run>/<stage>/eval_chat.json

Both stride items across ranks (item i on rank i % world) and sum the counts, so they run under torchrun.
"""
import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from picochat.common import UserError, autocast_for, home_dir, init_runtime, print0, atomic_write_json, pick_run
from picochat import fastpath
from picochat.model import bits_per_byte
from picochat.replies import pass_at_k
from picochat.sandbox import describe_sandbox


def _all_reduce(values, device):
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        t = t.to(device)
        dist.all_reduce(t)
    return t.cpu().tolist()


# ---- chat evals -------------------------------------------------------------------------------------------
@dataclass
class ChatTask:
    name: str
    module: object
    kind: str                 # "choice": letter argmax; "generate": sample, then module.check
    baseline: float           # chance accuracy, for ChatCORE
    load_kwargs: dict = field(default_factory=dict)
    demo: bool = False        # reads the demo curriculum (data/demo/eval) instead of data/eval
    max_tokens: int = 512


def chat_tasks():
    from picochat.tasks import arc, mmlu, gsm8k, humaneval, spelling
    tasks = [ChatTask("ARC-Easy", arc, "choice", 0.25, {"subset": "ARC-Easy"}),
             ChatTask("ARC-Challenge", arc, "choice", 0.25, {"subset": "ARC-Challenge"}),
             ChatTask("MMLU", mmlu, "choice", 0.25),
             ChatTask("GSM8K", gsm8k, "generate", 0.0),
             ChatTask("HumanEval", humaneval, "generate", 0.0),
             ChatTask("SpellingBee", spelling, "generate", 0.0, max_tokens=256),
             ChatTask("DemoProblems", gsm8k, "generate", 0.0, demo=True, max_tokens=256),
             ChatTask("DemoSpelling", spelling, "generate", 0.0, demo=True, max_tokens=256)]
    return {t.name.lower(): t for t in tasks}


TASK_GROUPS = {"demo": ["demoproblems", "demospelling"], "arc": ["arc-easy", "arc-challenge"]}


def task_root(task, data=None):
    from picochat.shards import eval_dir
    return eval_dir(demo=True) if task.demo else (Path(data) if data else eval_dir())


def _crop_left(ids, max_len):
    return ids[-max_len:] if len(ids) > max_len else ids


def letter_ids(tokenizer, letters):
    ids = []
    for letter in letters:
        tok = tokenizer.encode(letter)
        if len(tok) != 1:
            raise UserError(f"the tokenizer splits the letter {letter!r} into {len(tok)} tokens")
        ids.append(tok[0])
    return ids


@torch.no_grad()
def choice_predictions(model, tokenizer, module, items, device, *, batch_size=32, autocast=None):
    """For each multiple-choice item, the index of the letter with the highest logit right after
    <|assistant_start|>, among that item's letters only. Many items per forward pass: prompts are sorted by
    length, padded on the right, and read at each row's last real position."""
    max_len = model.config.sequence_len
    prompts = [_crop_left(tokenizer.render_for_completion(module.prompt(it)), max_len) for it in items]
    choices = [letter_ids(tokenizer, module.letters(it)) for it in items]
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
    preds = [None] * len(items)
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        T = len(prompts[batch[0]])
        x = torch.full((len(batch), T), tokenizer.bos_id, dtype=torch.long)
        last = torch.tensor([len(prompts[i]) - 1 for i in batch])
        for r, i in enumerate(batch):
            x[r, :len(prompts[i])] = torch.tensor(prompts[i])
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            h = model.trunk(x.to(device))
            logits = _head(model, h[torch.arange(len(batch), device=device), last.to(device)]).cpu()
        for r, i in enumerate(batch):
            preds[i] = int(logits[r, choices[i]].argmax())
    return preds


def _head(model, h):
    sc = model.config.softcap
    return sc * torch.tanh(model.lm_head(h).float() / sc)


def run_chat_task(task, model, tokenizer, device, items, *, engine=None, num_samples=1, batch_size=32,
                  temperature=0.0, top_k=None, max_tokens=None, autocast=None, rank=0, world=1, seed=0,
                  log=print0):
    """Score one task on the given items (this rank takes items rank, rank + world, ...). Returns a result
    dict with accuracy (pass@num_samples for generative tasks), pass@1 and the centered accuracy."""
    t0 = time.perf_counter()
    mine = list(range(rank, len(items), world))
    if task.kind == "choice":
        preds = choice_predictions(model, tokenizer, task.module, [items[i] for i in mine], device,
                                   batch_size=batch_size, autocast=autocast)
        right = sum(int(p == items[i]["answer"]) for p, i in zip(preds, mine))
        correct, total = _all_reduce([right, len(mine)], device)
        acc = correct / max(1, total)
        result = {"kind": "choice", "correct": int(correct), "total": int(total), "accuracy": acc, "pass@1": acc}
    else:
        from picochat.replies import generate_all, reply_text
        if engine is None:
            from picochat.engine import Engine
            engine = Engine(model, tokenizer, tool=True)
        max_len = model.config.sequence_len
        prompts = [_crop_left(tokenizer.render_for_completion(task.module.prompt(items[i])), max_len - 1)
                   for i in mine]
        budgets = [max(1, min(max_tokens or task.max_tokens, max_len - len(p))) for p in prompts]

        def progress(done, total):
            if rank == 0:
                log(f"  {task.name}: {done}/{total} completions")
        completions = generate_all(engine, prompts, budgets, num_samples=num_samples, temperature=temperature,
                                   top_k=top_k, seeds=[seed + i for i in mine], slots=batch_size, progress=progress)
        sums = [0.0, 0.0, 0.0]  # pass@1, pass@k, items
        for i, comps in zip(mine, completions):
            c = sum(bool(task.module.check(items[i], reply_text(tokenizer, t))) for t in comps)
            sums[0] += pass_at_k(num_samples, c, 1)
            sums[1] += pass_at_k(num_samples, c, num_samples)
            sums[2] += 1
        p1, pk, total = _all_reduce(sums, device)
        acc = pk / max(1, total)
        result = {"kind": "generate", "correct": round(pk, 6), "total": int(total), "accuracy": acc,
                  "pass@1": p1 / max(1, total), "num_samples": num_samples, "temperature": temperature}
    result.update(baseline=task.baseline, centered=centered_accuracy(result["accuracy"], task.baseline),
                  seconds=time.perf_counter() - t0)
    return result


def centered_accuracy(acc, baseline):
    from picochat.core import centered
    return centered(acc, baseline)


def chatcore(results):
    """Mean centered accuracy over the tasks in results (name -> result)."""
    vals = [r["centered"] for r in results.values()]
    return sum(vals) / len(vals) if vals else float("nan")


# ---- CLI --------------------------------------------------------------------------------------------------
def add_parser(sub):
    p = sub.add_parser("eval", help="evaluate a model: bits per byte and CORE (base), ChatCORE tasks (chat)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    esub = p.add_subparsers(dest="which", metavar="<base|chat>", required=True)

    b = esub.add_parser("base", help="validation bits per byte and CORE of a base checkpoint",
                        description="Bits per byte on the data folder's validation shard and CORE (DCLM) over "
                                    "the eval bundle. Tasks whose data is missing are skipped and the score says "
                                    "how many it covers, e.g. 'CORE (20/22 tasks)'.")
    b.add_argument("--run", default="", help="run name: reads and writes $PICOCHAT_HOME/runs/<run>/base "
                                             "(default: the run trained most recently)")
    b.add_argument("--checkpoint", default="", help="checkpoint folder (default runs/<run>/base)")
    b.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    b.add_argument("--max-per-task", type=int, default=None, help="items per CORE task (default: all); a fixed "
                                                                  "shuffle, so the same items every time")
    b.add_argument("--bundle", default="", help="CORE eval bundle (default $PICOCHAT_HOME/data/eval/eval_bundle)")
    b.add_argument("--tasks", default="", help="comma list of CORE task labels (default: all of core.yaml)")
    b.add_argument("--data", default="", help="shard folder for bits per byte (default: the one pretraining used)")
    b.add_argument("--eval-tokens", type=int, default=2 ** 20, help="validation tokens for bits per byte")
    b.add_argument("--device-batch-size", type=fastpath.batch_size_arg, default="auto",
                   help="rows per batch for bits per byte, or auto: on a GPU the largest of up to 64 whose forward "
                        "fits (probed), elsewhere 8 if a memory estimate allows")
    b.add_argument("--batch-tokens", type=int, default=0,
                   help="padded tokens per CORE forward pass (default 65536 on GPU, 16384 on CPU)")
    b.add_argument("--skip-bpb", action="store_true")
    b.add_argument("--skip-core", action="store_true")
    b.add_argument("--device", default="")
    b.set_defaults(func=base_cli)

    c = esub.add_parser("chat", help="ChatCORE tasks of a chat checkpoint (sft or rl)",
                        description="ARC-Easy, ARC-Challenge, MMLU (letter argmax), GSM8K, HumanEval, SpellingBee, "
                                    "DemoProblems, DemoSpelling (generation with the tool live). ChatCORE = mean "
                                    "centered accuracy over the tasks run (chance: 0.25 for 4-way choice, 0 for "
                                    "generation). Results accumulate in runs/<run>/<stage>/eval_chat.json.")
    c.add_argument("-t", "--task", default="all", help="task name, comma list, 'demo' (the demo curriculum's "
                                                       "tasks), 'arc' (both) or 'all' (every task whose data exists)")
    c.add_argument("--run", default="", help="run name under $PICOCHAT_HOME/runs "
                                             "(default: the run trained most recently)")
    c.add_argument("--stage", default="sft", choices=["base", "sft", "rl"], help="which checkpoint folder")
    c.add_argument("--checkpoint", default="", help="checkpoint folder (default runs/<run>/<stage>)")
    c.add_argument("--step", type=int, default=None)
    c.add_argument("-k", "--num-samples", type=int, default=1, help="samples per problem: pass@k (generative tasks)")
    c.add_argument("--max-problems", type=int, default=None, help="first N problems of each task (default: all)")
    c.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0 = greedy "
                                                                   "for -k 1, else 1.0)")
    c.add_argument("--top-k", type=int, default=None)
    c.add_argument("--max-tokens", type=int, default=None, help="tokens per completion (default per task)")
    c.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass (multiple choice); "
                                                              "sequences decoded together (generative tasks)")
    c.add_argument("--data", default="", help="eval data folder (default $PICOCHAT_HOME/data/eval)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="")
    c.set_defaults(func=chat_cli)


def base_cli(args):
    from picochat import checkpoint
    from picochat.core import evaluate_core
    from picochat.loader import fixed_batches
    from picochat.shards import split_shards
    ddp, rank, _, world, device = init_runtime(args.device)
    folder = Path(args.checkpoint) if args.checkpoint else home_dir() / "runs" / pick_run(args.run) / "base"
    model, tokenizer, meta = checkpoint.load_model(folder, args.step, device)
    autocast = autocast_for(device)
    out = {"stage": meta.get("stage", "base"), "step": meta["step"], "checkpoint": str(folder)}
    t0 = time.perf_counter()

    if not args.skip_bpb:
        data = Path(args.data or meta.get("args", {}).get("data") or home_dir() / "data" / "pretrain")
        try:
            _, val_files = split_shards(data)
        except UserError as e:
            if args.data:
                raise
            print0(f"warning: no bits per byte: {e}")
            val_files = None
        if val_files:
            # the first eval_tokens of the validation shard, as pretraining measures it: the same on any rank count
            T, B = model.config.sequence_len, args.device_batch_size
            if B == "auto":
                # a CPU gains nothing from rows beyond 8 (and the demo's numbers stay those of 8)
                rows = 64 if device.type == "cuda" else 8
                B, how = fastpath.find_device_batch_size(model, None, T, rows_per_rank=rows, device=device,
                                                         autocast=autocast)
                print0(f"bits per byte in batches of {B} rows ({how})")
            val = fixed_batches(val_files, tokenizer, B, T, max(1, args.eval_tokens // (B * T)))
            mine = ((x.to(device), y.to(device)) for x, y in val[rank::world])
            out["val_bpb"] = bits_per_byte(model, mine, tokenizer.token_bytes(), autocast)
            out["bpb_data"] = str(val_files[0])
            print0(f"validation bits per byte: {out['val_bpb']:.4f} ({val_files[0].name})")

    if not args.skip_core:
        bundle = Path(args.bundle) if args.bundle else home_dir() / "data" / "eval" / "eval_bundle"
        if not (bundle / "core.yaml").is_file() and not args.bundle:
            print0(f"warning: no CORE: no eval bundle in {bundle} (run `picochat data download --what eval`)")
        else:
            batch_tokens = args.batch_tokens or (65536 if device.type == "cuda" else 16384)
            tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or None
            core = evaluate_core(model, tokenizer, bundle, device, max_per_task=args.max_per_task,
                                 batch_tokens=batch_tokens, autocast=autocast, rank=rank, world=world, tasks=tasks)
            out.update(core=core["core"], core_label=core["label"], core_tasks=core["tasks"],
                       core_missing=core["missing"], core_num_tasks=core["num_tasks"],
                       core_num_scored=core["num_scored"], max_per_task=args.max_per_task, bundle=str(bundle))
            print0(f"{core['label']}: {core['core']:.4f} ({core['examples']:,} examples in {core['seconds']:.0f}s)")
    if "val_bpb" not in out and "core" not in out:
        raise UserError("nothing evaluated: no validation shard and no eval bundle (pass --data and/or --bundle)")
    out["seconds"] = time.perf_counter() - t0
    if rank == 0:
        atomic_write_json(folder / "eval_base.json", out)
        print0(f"results in {folder / 'eval_base.json'}")
    if ddp:
        dist.destroy_process_group()
    return 0


def select_chat_tasks(spec, data=None):
    """Tasks named in spec ('all' = every task whose data is present)."""
    table = chat_tasks()
    if spec.strip().lower() == "all":
        chosen = [t for t in table.values()
                  if t.module.available(root=task_root(t, data), **t.load_kwargs)]
        if not chosen:
            raise UserError(f"no chat eval data in {data or 'data/eval'} or data/demo/eval: run "
                            f"`picochat data download --what eval` or `picochat data demo`")
        return chosen
    chosen = []
    for name in [s.strip().lower() for s in spec.split(",") if s.strip()]:
        names = TASK_GROUPS.get(name, [name])
        for n in names:
            if n not in table:
                raise UserError(f"unknown task {name!r}: pick from {', '.join(t.name for t in table.values())}, "
                                f"{', '.join(TASK_GROUPS)} or all")
            if table[n] not in chosen:
                chosen.append(table[n])
    return chosen


def chat_cli(args):
    from picochat import checkpoint
    if args.num_samples < 1:
        raise UserError("-k/--num-samples must be at least 1")
    ddp, rank, _, world, device = init_runtime(args.device)
    folder = Path(args.checkpoint) if args.checkpoint else home_dir() / "runs" / pick_run(args.run) / args.stage
    tasks = select_chat_tasks(args.task, args.data or None)
    model, tokenizer, meta = checkpoint.load_model(folder, args.step, device)
    autocast = autocast_for(device)
    temperature = args.temperature if args.temperature is not None else (0.0 if args.num_samples == 1 else 1.0)
    path = folder / "eval_chat.json"
    previous = {}
    if path.exists():
        import json
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = {}
    results = previous.get("tasks", {}) if previous.get("step") == meta["step"] else {}
    engine = None
    for task in tasks:
        items = task.module.load(root=task_root(task, args.data or None), **task.load_kwargs)
        if args.max_problems:
            items = items[:args.max_problems]
        if task.kind == "generate" and engine is None:
            from picochat.engine import Engine
            engine = Engine(model, tokenizer, tool=True)
            print0(describe_sandbox())
        print0(f"{task.name}: {len(items)} problems" + (f", {args.num_samples} samples each at temperature "
                                                         f"{temperature}" if task.kind == "generate" else ""))
        r = run_chat_task(task, model, tokenizer, device, items, engine=engine, num_samples=args.num_samples,
                          batch_size=args.batch_size, temperature=temperature, top_k=args.top_k,
                          max_tokens=args.max_tokens, autocast=autocast, rank=rank, world=world, seed=args.seed)
        r["max_problems"] = args.max_problems
        results[task.name] = r
        metric = "accuracy" if task.kind == "choice" else f"pass@{args.num_samples}"
        print0(f"{task.name}: {metric} {r['accuracy']:.4f} (centered {r['centered']:+.4f}, {r['total']} problems, "
               f"{r['seconds']:.0f}s)")
    score = chatcore(results)
    label = f"ChatCORE ({len(results)} tasks)"
    print0(f"{label}: {score:.4f}")
    if rank == 0:
        atomic_write_json(path, {"stage": args.stage, "step": meta["step"], "checkpoint": str(folder),
                                 "chatcore": score, "chatcore_label": label, "tasks": results})
        print0(f"results in {path}")
    if ddp:
        dist.destroy_process_group()
    return 0
