"""`picochat sft`: teach the base model to chat (supervised fine-tuning on a mixture of conversations).

Conversations are rendered with their loss masks (only what the assistant writes is trained on) and packed
whole into rows of T+1 tokens: each row takes the largest buffered conversation that still fits, and the
rest of the row is padding (<|bos|>, never a target). Nothing is cropped to fill a row; a conversation longer
than a row is truncated, and counted. The loss of an optimizer step is the sum of token losses over every
supervised token of every micro-batch, divided by the number of those tokens in the whole step, so a
micro-batch with few (or no) supervised tokens weighs what its tokens weigh, never NaN.

The packing plan is a pure function of the mixture and the row shape, so --resume continues exactly: the
same batches, the same optimizer state, bit-identical losses (fp32).

Mixtures:
  demo  the demo curriculum (`picochat data demo`): word problems solved with the Python tool, spelling and
        letter counting, questions about the demo world, greetings and identity.
  full  SmolTalk (or chat you imported), GSM8K with tool calls, ARC and MMLU multiple choice, spelling and
        letter counting from the word list, identity; whatever of them is downloaded.
Both take --task-epochs (oversampling) and --data (your own conversations).

Your own data: `--data my.jsonl` (repeatable; a folder means every .jsonl in it) adds your conversations to the
mixture, each once per pass (`--task-epochs data=3`: three times); `--data-only` trains on them alone. One
conversation per line, in OpenAI form ({"messages": [{"role", "content"}]}), ShareGPT form ({"conversations":
[{"from", "value"}]}) or as a preference pair ({"chosen": ...}, its chosen side; see picochat/tasks/chat.py).
Every line of every file is checked before anything is written: a bad one stops the run with one line naming
the file, the line and the problem.
"""
import argparse
import json
import time
from array import array
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from picochat.common import (UserError, autocast_for, home_dir, init_runtime, print0, atomic_write_json,
                             format_duration, metrics_logger, vars_json)
from picochat.optim import build_optimizer, warmup_linear_decay
from picochat import checkpoint, fastpath
from picochat.checkpoint import load_start
from picochat.replies import follows_format, greedy_replies, reply_text
from picochat.tracking import add_log_to_arg, tracker
from picochat.tasks.mixture import Mixture, Source
from picochat.tasks import chat, identity, gsm8k, spelling, arc, mmlu
from picochat.tasks import demo as demo_tasks

STAGE = "sft"


# ---- packing -------------------------------------------------------------------------------------------------
def plan_rows(lengths, row_len, buffer_size=64):
    """Pack conversations (given by their token lengths, in mixture order) into rows of row_len tokens:
    best fit from a buffer of the next buffer_size conversations, padding what is left of a row. Returns a
    list of rows, each a list of conversation indices; a conversation longer than a row gets a row alone
    (and is truncated when rendered)."""
    rows, buf, nxt = [], [], 0
    while True:
        while len(buf) < buffer_size and nxt < len(lengths):
            buf.append(nxt)
            nxt += 1
        if not buf:
            return rows
        row, space = [], row_len
        while True:
            best = -1
            for j, i in enumerate(buf):  # the largest that fits; ties -> the earliest
                if lengths[i] <= space and (best < 0 or lengths[i] > lengths[buf[best]]):
                    best = j
            if best < 0:
                break
            i = buf.pop(best)
            row.append(i)
            space -= lengths[i]
        if not row:  # the front conversation fits no row: it gets one alone
            row.append(buf.pop(0))
        rows.append(sorted(row))


class SFTLoader:
    """Batches of packed rows for step s, micro-batch k, on this rank. Rows of a step are split between ranks
    and micro-batches by position, so a step's data does not depend on how it is divided.

    Every conversation is rendered once, here, into two flat arrays (token ids, 2 bytes each when the vocabulary
    fits in 16 bits, else 4; the loss mask, 1 byte each), and no more of it than a row holds: a batch is then
    a gather and a pad. A batch is (x, y) int64 (rows, row_len - 1), targets -1 wherever the next token is not
    supervised (user turns, tool outputs, padding); with device on CUDA both are in pinned memory, for
    `.to(device, non_blocking=True)`."""

    def __init__(self, convs, tokenizer, row_len, *, device_batch, grad_accum, rank=0, world=1, buffer_size=64,
                 device=None):
        self.row_len, self.bos = row_len, tokenizer.bos_id
        self.device_batch, self.grad_accum, self.rank, self.world = device_batch, grad_accum, rank, world
        self.pin = device is not None and torch.device(device).type == "cuda"
        wide = tokenizer.vocab_size > 2 ** 16
        ids, mask, self.lengths = array("i" if wide else "H"), array("B"), []
        for i in range(len(convs)):
            t, m = tokenizer.render_conversation(convs[i])
            self.lengths.append(len(t))
            ids.extend(t[:row_len])  # a longer conversation gets a row alone, truncated to it
            mask.extend(m[:row_len])
        self.ids = np.frombuffer(ids, dtype=np.int32 if wide else np.uint16)
        self.mask = np.frombuffer(mask, dtype=np.bool_)
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)  # conversation i: offsets[i]:offsets[i+1]
        np.cumsum(np.minimum(self.lengths, row_len), out=self.offsets[1:])
        self.truncated = sum(n > row_len for n in self.lengths)
        self.rows = plan_rows(self.lengths, row_len, buffer_size)
        self.rows_per_step = device_batch * grad_accum * world

    @property
    def steps_per_epoch(self):
        return max(1, len(self.rows) // self.rows_per_step)

    def micro_batch(self, step, k):
        """(x, y) of micro-batch k of optimizer step `step` for this rank (wraps around past the last row)."""
        first = step * self.rows_per_step + (k * self.world + self.rank) * self.device_batch
        return self.batch([(first + j) % len(self.rows) for j in range(self.device_batch)])

    def batch(self, rows):
        """(x, y) of the packed rows with these indices (into self.rows), conversations laid end to end from
        the start of each row, the rest padded with <|bos|>."""
        ids = np.full((len(rows), self.row_len), self.bos, dtype=np.int64)
        mask = np.zeros((len(rows), self.row_len), dtype=np.bool_)
        for b, r in enumerate(rows):
            pos = 0
            for i in self.rows[r]:
                a, e = self.offsets[i], self.offsets[i + 1]
                ids[b, pos:pos + e - a] = self.ids[a:e]
                mask[b, pos:pos + e - a] = self.mask[a:e]
                pos += e - a
        # written straight into the (pinned) tensors that are copied to the device
        x = torch.empty((len(rows), self.row_len - 1), dtype=torch.long, pin_memory=self.pin)
        y = torch.full((len(rows), self.row_len - 1), -1, dtype=torch.long, pin_memory=self.pin)
        np.copyto(x.numpy(), ids[:, :-1])
        np.copyto(y.numpy(), ids[:, 1:], where=mask[:, 1:])
        return x, y

    def stats(self):
        tokens = sum(min(n, self.row_len) for n in self.lengths)
        return {"conversations": len(self.lengths), "rows": len(self.rows), "truncated": self.truncated,
                "fill": tokens / max(1, len(self.rows) * self.row_len)}


def step_loss(model, batches, device, autocast, ddp=False):
    """Forward + backward over the micro-batches of one step. Each micro-batch contributes
    sum(token losses) / (supervised tokens in the whole step, over all ranks), so the gradient is that of the
    mean loss over the step's supervised tokens however they are spread. Returns (mean loss, tokens)."""
    count = torch.tensor(float(sum(int((y >= 0).sum()) for _, y in batches)), device=device)
    if ddp:
        dist.all_reduce(count)
    world = dist.get_world_size() if ddp else 1
    # the optimizer averages gradients over ranks, so each rank scales its share up by the rank count
    denom = count.clamp(min=1.0) / world
    total = torch.zeros((), device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # async from pinned memory
        with autocast():
            loss = model(x, y, reduction="sum")
        (loss / denom).backward()
        total += loss.detach()
    if ddp:
        dist.all_reduce(total)
    return float(total / count.clamp(min=1.0)), int(count)


@torch.no_grad()
def eval_loss(model, loader, device, autocast, max_rows=None):
    """Mean loss over the supervised tokens of a packed set (all of it, or max_rows rows)."""
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    rows = range(loader.rank * loader.device_batch, min(len(loader.rows), max_rows or len(loader.rows)),
                 loader.world * loader.device_batch)
    for first in rows:
        x, y = loader.batch(range(first, min(first + loader.device_batch, len(loader.rows))))
        with autocast():
            total += model(x.to(device, non_blocking=True), y.to(device, non_blocking=True), reduction="sum").double()
        count += (y >= 0).sum().double()
    if dist.is_initialized():
        both = torch.stack([total, count])
        dist.all_reduce(both)
        total, count = both
    return float(total / count) if count > 0 else float("nan")


# ---- chat evaluation --------------------------------------------------------------------------------------------
def chat_eval(model, tokenizer, suites, max_tokens=192):
    """suites: {name: (items, prompt_fn, check_fn)}. Greedy replies to every item; returns per-suite accuracy,
    and format compliance over all replies."""
    was_training = model.training
    model.eval()
    res, ok_format, n = {}, 0, 0
    for name, (items, prompt_fn, check_fn) in suites.items():
        replies = greedy_replies(model, tokenizer, [prompt_fn(it) for it in items], max_tokens)
        right = sum(bool(check_fn(it, reply_text(tokenizer, r))) for it, r in zip(items, replies))
        fmt = sum(follows_format(tokenizer, r) for r in replies)
        res[name] = right / max(1, len(items))
        res[f"{name}_format"] = fmt / max(1, len(items))
        ok_format += fmt
        n += len(items)
    res["format"] = ok_format / max(1, n)
    model.train(was_training)
    return res


# ---- mixtures ----------------------------------------------------------------------------------------------------
DEFAULT_EPOCHS = {  # per-task passes in the full mixture; --task-epochs overrides
    "smoltalk": 1.0, "imported": 1.0, "data": 1.0, "gsm8k": 2.0, "arc_easy": 1.0, "arc_challenge": 1.0,
    "mmlu": 0.5, "spelling": 1.0, "identity": 2.0,
    # demo curriculum sources (as tagged in data/demo/sft/train.jsonl). Only a tenth of the worked word problems:
    # enough to learn the format and the tool (0.68 held-apart accuracy on the demo), leaving the rest of the
    # problems to RL, which learns from their answers alone (0.90 after RL; all 5,000 worked solutions in SFT
    # give ~0.96 with no RL)
    "word_problem": 0.1, "world": 1.0,
}


def parse_epochs(text):
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
            if not sep or out[name.strip()] < 0:
                raise ValueError
        except ValueError:
            raise UserError("--task-epochs: expected name=number pairs like 'gsm8k=2,mmlu=0.5', "
                            f"got {part!r}") from None
    return out


def build_mixture(args):
    """(Mixture, validation conversations, chat-eval suites) for --mixture demo|full, with --data added (or alone,
    with --data-only: then there is no validation set and no chat eval)."""
    epochs = dict(DEFAULT_EPOCHS, **parse_epochs(args.task_epochs))
    sources, notes, val, suites = [], [], [], {}
    if args.data_only:
        if not args.data:
            raise UserError("--data-only trains on the conversations of --data alone: name a file with --data")
    elif args.mixture == "demo":
        folder = demo_tasks.root(args.demo_data or None)
        for name, convs in demo_tasks.sft_conversations(folder).items():
            if name == "identity" and args.identity_jsonl:
                continue
            sources.append(Source(name, convs, epochs.get(name, 1.0)))
        val = demo_tasks.val_conversations(folder)
        suites = {"word_problems": (demo_tasks.word_problems("test", folder)[:args.eval_problems], gsm8k.prompt,
                                    gsm8k.check)}
        if spelling.available("test", folder / "eval"):
            suites["spelling"] = (demo_tasks.spelling_questions("test", folder)[:args.eval_problems],
                                  spelling.prompt, spelling.check)
    elif args.mixture == "full":
        try:
            convs, skipped = chat.smoltalk("train")
            sources.append(Source("smoltalk", convs, epochs["smoltalk"]))
            val = chat.smoltalk("test")[0][:2000]
        except UserError as e:
            notes.append(f"no SmolTalk ({e})")
        imported = chat.imported()
        if imported:
            sources.append(Source("imported", imported, epochs["imported"]))
        if gsm8k.available("train"):
            sources.append(Source("gsm8k", gsm8k.load("train"), epochs["gsm8k"], gsm8k.conversation))
        else:
            notes.append("no GSM8K train")
        if gsm8k.available("test"):
            suites["gsm8k"] = (gsm8k.load("test")[:args.eval_problems], gsm8k.prompt, gsm8k.check)
        for subset, name in (("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")):
            if arc.available(subset, "train"):
                sources.append(Source(name, arc.load(subset, "train"), epochs[name], arc.conversation))
            else:
                notes.append(f"no {subset} train")
        if mmlu.available("auxiliary_train"):
            sources.append(Source("mmlu", mmlu.load("auxiliary_train"), epochs["mmlu"], mmlu.conversation))
        else:
            notes.append("no MMLU auxiliary_train")
        if spelling.available("train"):
            sources.append(Source("spelling", spelling.load("train"), epochs["spelling"], spelling.conversation))
            suites["spelling"] = (spelling.load("test")[:args.eval_problems], spelling.prompt, spelling.check)
        else:
            notes.append("no word list for spelling")
        if not args.identity_jsonl:
            sources.append(Source("identity", identity.load(seed=args.seed), epochs["identity"]))
    else:
        raise UserError(f"--mixture must be demo or full, got {args.mixture!r}")
    if args.identity_jsonl:
        sources.append(Source("identity", identity.load(args.identity_jsonl), epochs["identity"]))
    for path in args.data:
        convs, skipped = chat.load(path)
        if skipped:
            notes.append(f"{path}: {skipped} conversations skipped (unusable turns)")
        sources.append(Source(f"data:{Path(path).name}", convs, epochs["data"]))
    mixture = Mixture(sources, seed=args.seed)
    if not len(mixture):
        raise UserError(f"the {args.mixture} mixture is empty ({'; '.join(notes)}): download data with "
                        f"`picochat data download --what sft,eval` or pass --data")
    for note in notes:
        print0(f"note: {note}")
    return mixture, val, suites


# ---- CLI -------------------------------------------------------------------------------------------------------
def add_parser(sub):
    p = sub.add_parser("sft", help="supervised fine-tuning: teach the base model to chat",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="default", help="run name: reads runs/<run>/base, writes runs/<run>/sft")
    p.add_argument("--base", default="", help="base checkpoint folder (default runs/<run>/base)")
    p.add_argument("--out", default="", help="output folder (default runs/<run>/sft)")
    p.add_argument("--tokenizer", default="", help="tokenizer folder (default runs/<run>/tokenizer, else the base's)")
    g = p.add_argument_group("data")
    g.add_argument("--mixture", default="demo", choices=("demo", "full"), help="which conversations to train on")
    g.add_argument("--demo-data", default="", help="demo curriculum folder (default $PICOCHAT_HOME/data/demo)")
    g.add_argument("--data", action="append", default=[], metavar="PATH",
                   help="your own conversations, a .jsonl file (or a folder of them) in OpenAI, ShareGPT or "
                        "preference-pair form, added to the mixture (repeatable: --data a.jsonl --data b.jsonl)")
    g.add_argument("--data-only", action="store_true",
                   help="train on --data alone, without the --mixture (no validation set or chat eval then)")
    g.add_argument("--identity-jsonl", default="", metavar="PATH",
                   help="identity conversations replacing the built-in ones")
    default_epochs = ", ".join(f"{k}={v:g}" for k, v in DEFAULT_EPOCHS.items())
    g.add_argument("--task-epochs", default="", help="per-task passes, e.g. 'gsm8k=2,mmlu=0.5,data=3' "
                                                      f"(defaults: {default_epochs})")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--seq-len", type=int, default=0, help="row length in tokens (default: the model's context)")
    g.add_argument("--device-batch-size", type=fastpath.batch_size_arg, default="auto",
                   help="rows per micro-batch per rank, or auto: a step keeps 16 x --grad-accum rows per rank, in "
                        "the largest micro-batches that fit (on a GPU probed with a real forward and backward, "
                        "elsewhere from a memory estimate), gradient accumulation making up the rest")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: one pass over the mixture)")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR")
    g.add_argument("--embedding-lr", type=float, default=0.2)
    g.add_argument("--unembedding-lr", type=float, default=0.004)
    g.add_argument("--scalar-lr", type=float, default=0.1)
    g.add_argument("--init-lr-frac", type=float, default=1.0, help="all LRs are multiplied by this")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="LR decays linearly to this fraction")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=100,
                   help="validation loss and chat eval every N steps (0: start and end)")
    g.add_argument("--eval-rows", type=int, default=256, help="validation rows per evaluation")
    g.add_argument("--eval-problems", type=int, default=100, help="prompts per chat-eval suite")
    g.add_argument("--eval-max-tokens", type=int, default=192)
    g.add_argument("--save-every", type=int, default=200,
                   help="checkpoint every N steps and at the end (0: at the end only)")
    g.add_argument("--keep", type=int, default=2)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--resume", action="store_true", help="continue the SFT run in --out exactly")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="")
    g.add_argument("--seed", type=int, default=0, help="seed of the mixture's shuffle")
    add_log_to_arg(g)
    p.set_defaults(func=run)


def run(args):
    out = Path(args.out) if args.out else home_dir() / "runs" / args.run / STAGE
    t0 = time.time()
    data = build_mixture(args)  # every line of the data checked before anything is written (the lock included)
    with checkpoint.stage_lock(out):  # for the whole run: a second run writing to out stops at once
        return _run(args, out, *data, t0=t0)


def _run(args, out, mixture, val_convs, suites, *, t0):
    ddp, rank, local_rank, world, device = init_runtime(args.device)
    run_dir = home_dir() / "runs" / args.run
    base = Path(args.base) if args.base else run_dir / "base"
    tok_dir = Path(args.tokenizer) if args.tokenizer else run_dir / "tokenizer"
    resuming = args.resume and checkpoint.latest_step(out) is not None
    start = out if resuming else base
    model, tokenizer, start_meta = load_start(start, tok_dir, device, "SFT" if resuming else "base")
    row_len = (args.seq_len or model.config.sequence_len) + 1
    if row_len - 1 > model.config.sequence_len:
        raise UserError(f"--seq-len {args.seq_len} is longer than the model's context ({model.config.sequence_len})")
    autocast = autocast_for(device)
    # a model trained with sliding windows keeps them: FA3 or FlexAttention on GPUs, as in pretraining
    attention = fastpath.use_fast_attention(device, flex=device.type == "cuda", seq_len=row_len - 1,
                                            windows=model.windows)
    print0(fastpath.dense_window_warning(model, device, attention) or f"attention {attention}")

    lrs = dict(matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr,
               scalar_lr=args.scalar_lr)
    optimizer = build_optimizer(model, **{k: v * args.init_lr_frac for k, v in lrs.items()},
                                weight_decay=args.weight_decay)
    if args.device_batch_size == "auto":
        # the step's rows stay those of the default split (16 per rank per micro-batch): only how they are
        # split into micro-batches follows the memory, so the optimization does not (each micro-batch's loss
        # is normalized by the whole step's supervised tokens)
        rows = 16 * args.grad_accum
        args.device_batch_size, how = fastpath.find_device_batch_size(model, optimizer, row_len - 1, rows_per_rank=rows,
                                                                      device=device, autocast=autocast)
        args.grad_accum = rows // args.device_batch_size
        print0(f"micro-batch {args.device_batch_size} rows x {args.grad_accum} accumulation steps ({how})")
    loader = SFTLoader(mixture, tokenizer, row_len, device_batch=args.device_batch_size, grad_accum=args.grad_accum,
                       rank=rank, world=world, device=device)
    val_loader = (SFTLoader(val_convs, tokenizer, row_len, device_batch=args.device_batch_size, grad_accum=1,
                            rank=rank, world=world, device=device)
                  if val_convs else None)
    num_steps = args.num_iterations if args.num_iterations > 0 else loader.steps_per_epoch
    st = loader.stats()
    print0(f"mixture: {mixture.describe()}")
    print0(f"packed into {st['rows']:,} rows of {row_len - 1} tokens ({100 * st['fill']:.0f}% filled) in "
           f"{time.time() - t0:.1f}s; {num_steps} steps x {loader.rows_per_step} rows")
    if st["truncated"]:
        print0(f"warning: {st['truncated']:,} conversations are longer than a row ({row_len} tokens) and were "
               f"truncated; raise --seq-len (up to the model's context) to keep them whole")

    step = checkpoint.resume_finetune(out, start_meta, STAGE, optimizer) if resuming else 0
    mirror = tracker(args.log_to, out=out, run=args.run, stage=STAGE, config=vars_json(args),
                     step=step, rank=rank)
    log = metrics_logger(out / "metrics.jsonl", step, rank, mirror=mirror)

    def evaluate(step):
        model.eval()
        rec = {"step": step}
        if val_loader is not None:
            rec["val_loss"] = eval_loss(model, val_loader, device, autocast, args.eval_rows)
        if rank == 0 and suites:
            with autocast():
                rec.update(chat_eval(model, tokenizer, {k: v for k, v in suites.items()}, args.eval_max_tokens))
        if ddp:
            dist.barrier()
        model.train()
        if len(rec) > 1:  # --data-only has no validation set and no chat eval
            print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in rec.items() if k != "step"))
        log(rec)
        return rec

    model.train()
    first_eval = evaluate(step) if step == 0 else None
    if first_eval is not None and rank == 0:
        atomic_write_json(out / "start_eval.json", first_eval)
    t_train, last_eval = 0.0, first_eval
    while step < num_steps:
        t_step = time.perf_counter()
        mult = warmup_linear_decay(step, num_steps, args.warmup_steps, args.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * mult
        batches = [loader.micro_batch(step, k) for k in range(args.grad_accum)]
        loss, ntok = step_loss(model, batches, device, autocast, ddp)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t_step
        t_train += dt
        step += 1
        log({"step": step, "loss": loss, "lr_mult": mult, "supervised_tokens": ntok, "dt": dt})
        if step % args.log_every == 0 or step == num_steps:
            print0(f"step {step:05d}/{num_steps} | loss {loss:.4f} | lr x{mult:.2f} | {ntok} supervised tokens | "
                   f"{dt * 1000:.0f} ms | ETA {format_duration(t_train / step * (num_steps - step)) if step else '?'}")
        if step == num_steps or (args.eval_every > 0 and step % args.eval_every == 0):
            last_eval = evaluate(step)
        if (args.save_every > 0 and step % args.save_every == 0) or step == num_steps:
            checkpoint.save_checkpoint(out, step, model, optimizer, rank_state={"rng": torch.get_rng_state()},
                                       meta={"stage": STAGE, "val_loss": (last_eval or {}).get("val_loss"),
                                             "base": str(base), "args": vars_json(args)},
                                       tokenizer=tokenizer, keep=args.keep)

    if rank == 0:
        start_eval = json.loads((out / "start_eval.json").read_text()) if (out / "start_eval.json").exists() else {}
        summary = checkpoint.StageSummary(
            stage=STAGE, step=step, train_seconds=t_train, val_loss=(last_eval or {}).get("val_loss"),
            format_compliance=(last_eval or {}).get("format"), base_format_compliance=start_eval.get("format"),
            eval=last_eval, base_eval=start_eval, mixture=mixture.counts(), rows=st["rows"],
            truncated=st["truncated"], row_fill=st["fill"], args=vars_json(args), device=str(device), world_size=world)
        atomic_write_json(out / "summary.json", summary)
        compliance = (f"format compliance {start_eval['format']:.2f} -> {last_eval['format']:.2f}, "
                      if "format" in start_eval and "format" in (last_eval or {}) else "")
        print0(f"done: {step} steps in {format_duration(t_train)}, {compliance}checkpoint in {out}")
    if ddp:
        dist.destroy_process_group()
    return 0
