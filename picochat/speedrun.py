"""`picochat speedrun`: one command from nothing to a chat model, with a report card at the end.

    data -> tokenizer -> pretrain -> base eval -> SFT -> chat eval -> RL -> chat eval -> report

Each stage runs as its own `picochat <stage>` process (under torchrun when several GPUs are present), with
its output in runs/<run>/logs/<stage>.log. A stage whose finished outputs exist is skipped; a stage that was
cut off is resumed from its last checkpoint. So after a crash or a kill, the same command picks up where it
stopped and ends with the same numbers.

Presets pick the scale (default: from the hardware):
  demo  no GPU: depth 4 on the synthetic curriculum (or --data), ~25 min on a 2-core CPU, offline
  smoke the demo at a fraction of its budget, ~6 min on one core: a check that every stage works (the tests)
  d12   1 GPU: depth 12, GPT-1 size, ~1 h on an H100 (estimated from FLOPs, as below)
  gpu24 1 GPU with 24-32 GB (RTX 3090/4090 class): depth 12, full attention, ~6.5 h on an RTX 4090
  d20   8 GPUs: depth 20, the reference's "$100" tier, ~1.7 h on 8xH100
  gpt2  8 GPUs: depth 24, aims at GPT-2's CORE (0.2565), ~3.6 h on 8xH100
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from picochat.common import UserError, home_dir, fmt, format_duration, atomic_write_json
from picochat.checkpoint import latest_stage, read_meta, training_notes
from picochat.fastpath import batch_size_arg, estimate_training_memory
from picochat.model import GPTConfig, add_shape_args, derive_hparams
from picochat.launch import torchrun_command

CHARS_PER_TOKEN = 4.8  # web text with a 32K vocab; sizes the download
SHARD_CHARS = 250e6

# The demo's model, and learning rates raised for its short runs (a tiny model on an easy curriculum); each preset
# sets its Muon LR so that pretrain's batch rule gives it the same step size (0.0075 at 8K tokens, 0.0053 at 4K)
DEMO_MODEL = ["--head-dim", "64", "--seq-len", "256", "--embedding-lr", "0.6",
              "--unembedding-lr", "0.02", "--scalar-lr", "0.5", "--weight-decay", "0", "--log-every", "20"]
# Per preset: flags for each stage. Pretraining budgets for the GPU presets come from the depth rules.
PRESETS = {
    "demo": dict(
        gpus=0, vocab=4096, tokenizer_chars=50_000_000,
        pretrain=[*DEMO_MODEL, "--matrix-lr", "0.0369", "--depth", "4", "--device-batch-size", "32",
                  "--total-batch-size", "8192",
                  "--num-iterations", "500", "--warmup-steps", "20", "--eval-every", "200", "--eval-tokens", "131072",
                  "--save-every", "100"],
        eval_base=["--max-per-task", "20"],
        sft=["--mixture", "demo"],
        rl=["--task", "demo"],
        eval_chat=["-t", "demo", "--max-problems", "200"],
    ),
    # the demo at a fraction of its budget (~6 min on one core): what the tests run end to end, killed and
    # resumed. Every stage shows its effect except RL's: at this scale (depth 3, a quarter of the demo's
    # pretraining tokens) the SFT model's word-problem errors are not ones 20 RL steps fix (measured in
    # dev/LOG.md); the demo's base model is needed, so the RL gain is checked on the demo (CI runs it too)
    "smoke": dict(
        gpus=0, vocab=4096, tokenizer_chars=10_000_000, check_rl_gain=False,
        pretrain=[*DEMO_MODEL, "--matrix-lr", "0.0339", "--depth", "3", "--device-batch-size", "16",
                  "--total-batch-size", "4096",
                  "--num-iterations", "240", "--warmup-steps", "10", "--eval-every", "80", "--eval-tokens", "32768",
                  "--save-every", "40"],
        eval_base=["--max-per-task", "5", "--eval-tokens", "32768"],
        sft=["--mixture", "demo", "--task-epochs", "word_problem=0.3,spelling=0.3,world=0.3,identity=0.3",
             "--eval-every", "0", "--eval-problems", "50", "--save-every", "20"],
        rl=["--task", "demo", "--num-steps", "20", "--prompts-per-step", "8", "--num-samples", "8",
            "--eval-every", "0", "--final-eval-problems", "200", "--pass-k", "4",
            "--pass-problems", "20", "--max-tokens", "96", "--save-every", "10"],
        eval_chat=["-t", "demo", "--max-problems", "50"],
    ),
    "d12": dict(
        gpus=1, depth=12, vocab=32768, tokenizer_chars=2_000_000_000,
        pretrain=["--depth", "12", "--device-batch-size", "32", "--window-pattern", "SSSL", "--flex-attention",
                  "--value-embeds", "--compile", "--eval-every", "250", "--save-every", "1000"],
        eval_base=[], sft=["--mixture", "full"], rl=["--task", "gsm8k"], eval_chat=["-t", "all"],
    ),
    # one consumer GPU of 24 GB (RTX 3090/4090 class; picked for GPUs under 36 GiB): d12's model and budget
    # with full attention in every layer. Without FlashAttention-3 (Hopper only) sliding windows run SDPA with
    # a dense mask, all of the work and none of the saving, and FlexAttention's backward kernel needs more
    # shared memory than these cards have (99 KB a block, pytorch/pytorch#133254); for full causal layers
    # SDPA runs its flash kernel. No fp8: Ampere has none. 16 rows of 2048 tokens a micro-batch: a predicted
    # peak of 18.5 GiB (predicted_memory), which leaves room for the CUDA context, fragmentation and a
    # desktop; gradient accumulation keeps d12's batch of 2^19 tokens
    "gpu24": dict(
        gpus=1, depth=12, vocab=32768, tokenizer_chars=2_000_000_000,
        pretrain=["--depth", "12", "--device-batch-size", "16", "--seq-len", "2048", "--window-pattern", "L",
                  "--value-embeds", "--compile", "--eval-every", "250", "--save-every", "1000"],
        eval_base=[], sft=["--mixture", "full"], rl=["--task", "gsm8k"], eval_chat=["-t", "all"],
    ),
    "d20": dict(
        gpus=8, depth=20, vocab=32768, tokenizer_chars=2_000_000_000,
        pretrain=["--depth", "20", "--device-batch-size", "32", "--window-pattern", "SSSL", "--flex-attention",
                  "--value-embeds", "--compile", "--eval-every", "250", "--save-every", "1000"],
        eval_base=[], sft=["--mixture", "full"], rl=["--task", "gsm8k"], eval_chat=["-t", "all"],
    ),
    "gpt2": dict(
        gpus=8, depth=24, vocab=32768, tokenizer_chars=2_000_000_000,
        pretrain=["--depth", "24", "--device-batch-size", "16", "--window-pattern", "SSSL", "--flex-attention",
                  "--value-embeds", "--compile", "--eval-every", "250", "--save-every", "1000"],
        eval_base=[], sft=["--mixture", "full"], rl=["--task", "gsm8k"], eval_chat=["-t", "all"],
    ),
}


def add_parser(sub):
    p = sub.add_parser("speedrun", help="the whole pipeline in one command, ending in a report card",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="", help="scale (default: from the hardware)")
    p.add_argument("--run", default="", help="run name (default: the preset's name)")
    p.add_argument("--data", default="", help="your own text (txt/jsonl/parquet files or a folder) instead of the "
                                              "demo curriculum or the web download")
    p.add_argument("--price", type=float, default=2.5, help="$ per GPU-hour for the cost estimate")
    p.add_argument("--dry-run", action="store_true", help="print the stage commands and exit")
    p.add_argument("--check", action="store_true", help="exit 1 unless the report card passes its checks (for CI)")
    p.set_defaults(func=run)


def pick_preset():
    """demo without a GPU; gpu24 on GPUs with under 36 GiB (24-32 GB cards); else d12 below 8 GPUs, d20 from 8."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return "demo"
    if torch.cuda.get_device_properties(0).total_memory < 36 * 2 ** 30:
        return "gpu24"
    return "d12" if n < 8 else "d20"


def pretrain_flags(argv):
    """What predicted_memory reads of a preset's pretrain flags, parsed as `picochat pretrain` parses them (the
    shape flags are pretrain's own, model.add_shape_args); the stage's other flags are passed over."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_shape_args(p)
    p.add_argument("--device-batch-size", type=batch_size_arg, default="auto")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    return p.parse_known_args(argv)[0]


def predicted_memory(preset):
    """Peak pretraining memory per GPU in bytes for a GPU preset, from fastpath.estimate_training_memory
    with the preset's own pretrain flags (bf16, its GPU count sharding the optimizer), or None for the CPU
    presets and a batch left to auto."""
    cfg = PRESETS[preset]
    if not cfg["gpus"]:
        return None
    a = pretrain_flags(cfg["pretrain"])
    if a.device_batch_size == "auto":
        return None
    config = GPTConfig.from_depth(a.depth, vocab_size=cfg["vocab"], sequence_len=a.seq_len, aspect_ratio=a.aspect_ratio,
                                  head_dim=a.head_dim, n_kv_head=a.n_kv_head, window_pattern=a.window_pattern,
                                  value_embeds=a.value_embeds, smear=a.smear, backout=a.backout, qk_scale=a.qk_scale)
    return estimate_training_memory(config, a.device_batch_size, a.seq_len, world=cfg["gpus"],
                                    checkpointing=a.activation_checkpointing)["total"]


def stage_commands(preset, run_name, data_arg):
    """[(stage name, argv for `picochat`, done-marker path, resumable)] in order."""
    cfg = PRESETS[preset]
    home = home_dir()
    run_dir = home / "runs" / run_name
    r = ["--run", run_name]
    stages = []
    if data_arg:
        data = run_dir / "data"
        stages.append(("data", ["data", "import", data_arg, "--out", str(data)],
                       data / "_import_done", False))
    elif preset in ("demo", "smoke"):
        data = home / "data" / "demo" / "pretrain"
        stages.append(("data", ["data", "demo"], home / "data" / "demo" / "demo.json", False))
    else:
        data = home / "data" / "pretrain"
        hp = derive_hparams(cfg["depth"], cfg["vocab"])
        n_shards = math.ceil(hp["tokens"] * CHARS_PER_TOKEN / SHARD_CHARS) + 1
        stages.append(("data", ["data", "download", "-n", str(n_shards)],
                       home / "data" / f".download_{n_shards}_done", False))
    stages += [
        ("tokenizer", ["tokenizer", "train", *r, "--data", str(data), "--vocab-size", str(cfg["vocab"]),
                       "--max-chars", str(cfg["tokenizer_chars"])], run_dir / "tokenizer" / "tokenizer.json", False),
        ("pretrain", ["pretrain", *r, "--data", str(data), *cfg["pretrain"]], run_dir / "base" / "summary.json", True),
        ("base eval", ["eval", "base", *r, "--data", str(data), *cfg["eval_base"]],
         run_dir / "base" / "eval_base.json", False),
        ("sft", ["sft", *r, *cfg["sft"]], run_dir / "sft" / "summary.json", True),
        ("sft eval", ["eval", "chat", *r, "--stage", "sft", *cfg["eval_chat"]],
         run_dir / "sft" / "eval_chat.json", False),
        ("rl", ["rl", *r, *cfg["rl"]], run_dir / "rl" / "summary.json", True),
        ("rl eval", ["eval", "chat", *r, "--stage", "rl", *cfg["eval_chat"]], run_dir / "rl" / "eval_chat.json", False),
        ("report", ["report", *r], None, False),
    ]
    return stages


def run(args):
    preset = args.preset or pick_preset()
    cfg = PRESETS[preset]
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg["gpus"] > n_gpus:
        raise UserError(f"preset {preset} expects {cfg['gpus']} GPU(s) but {n_gpus} are visible: pick --preset "
                        f"{pick_preset()} or run on a machine with more GPUs")
    if args.data and not Path(args.data).expanduser().exists():
        raise UserError(f"--data {args.data} does not exist")
    run_name = args.run or preset
    run_dir = home_dir() / "runs" / run_name
    logs = run_dir / "logs"
    stages = stage_commands(preset, run_name, args.data)
    distributed = {"pretrain", "base eval", "sft", "sft eval", "rl", "rl eval"}
    print(f"picochat speedrun: preset {preset}, run {run_name}, {n_gpus} GPU(s), outputs in {run_dir}", flush=True)
    need = predicted_memory(preset)
    if need is not None:
        print(f"predicted peak memory of pretraining: {need / 2 ** 30:.1f} GiB per GPU", flush=True)
        have = torch.cuda.get_device_properties(0).total_memory if n_gpus else None
        if have is not None and need > 0.95 * have:
            print(f"warning: this GPU has {have / 2 ** 30:.1f} GiB: pretraining may run out of memory", flush=True)
    if args.dry_run:
        for name, argv, _, _ in stages:
            print(" ".join(command(name in distributed, argv, n_gpus)))
        return 0
    logs.mkdir(parents=True, exist_ok=True)
    timings_path = run_dir / "speedrun.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for name, argv, marker, resumable in stages:
        if marker is not None and marker.exists():
            print(f"[{name}] done already ({marker.name} exists): skipped", flush=True)
            continue
        cmd = command(name in distributed, argv, n_gpus)
        if resumable:
            cmd.append("--resume")  # a no-op when nothing was checkpointed yet
        print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        code = tee(cmd, logs / f"{name.replace(' ', '_')}.log")
        if code != 0:
            raise UserError(f"stage '{name}' failed (exit {code}); see {logs / (name.replace(' ', '_') + '.log')}. "
                            f"Fix the cause and run the same command again: finished stages are skipped")
        if name == "data" and marker.name.startswith(("_import", ".download")):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("ok\n")
        timings[name] = timings.get(name, 0.0) + time.time() - t0
        atomic_write_json(timings_path, timings)
        print(f"[{name}] finished in {format_duration(time.time() - t0)}", flush=True)
    checks = check_report(json.loads((run_dir / "report" / "report.json").read_text())["stages"],
                          rl_gain=cfg.get("check_rl_gain", True))
    print("\nchecks:")
    for ok, text in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {text}")
    total = sum(timings.values())
    gpu_hours = max(1, n_gpus) * total / 3600 if n_gpus else 0.0
    cost = f", about ${gpu_hours * args.price:,.0f} at ${args.price}/GPU-hour" if n_gpus else " on CPU (no GPU cost)"
    print(f"\nspeedrun finished: {format_duration(total)} of stage time{cost}")
    print(f"report card: {run_dir / 'report' / 'report.md'}")
    final = latest_stage(run_dir)
    notes = training_notes(read_meta(final[0])) if final is not None else None
    if notes:
        print(f"the model was trained on {notes['trained_on']}")
    print(f"talk to it:  picochat chat --run {run_name}")
    print(f"in a browser: picochat serve --run {run_name}   (then open http://127.0.0.1:8000)")
    if notes:
        print("try: " + " | ".join(notes["examples"]))
    if args.check and not all(ok for ok, _ in checks):
        print("speedrun --check: the report card failed a check (above)", file=sys.stderr)
        return 1
    return 0


def check_report(stages, rl_gain=True):
    """The report card's bars, [(passed, text)]: every stage finished, pretraining cut the validation bpb below
    0.6x its start, SFT taught the chat format (at least 90% of replies well formed), and (rl_gain) RL raised
    the accuracy on held-apart problems by more than 3 standard errors of the difference."""
    checks = [(stages[k]["status"] == "done", f"{k}: {stages[k]['status']}") for k in ("base", "sft", "rl")]
    base, sft, rl = stages["base"], stages["sft"], stages["rl"]
    b0, b1 = base.get("start_val_bpb"), base.get("val_bpb")
    checks.append((None not in (b0, b1) and b1 < 0.6 * b0,
                   f"pretraining: validation bpb {fmt(b0, 3)} -> {fmt(b1, 3)} (bar: below 0.6x the start)"))
    f0, f1 = sft.get("base_format_compliance"), sft.get("format_compliance")
    checks.append((f1 is not None and f1 >= 0.9,
                   f"SFT: format compliance {fmt(f0, 3)} -> {fmt(f1, 3)} (bar: at least 0.9)"))
    if rl_gain:
        a0, a1, n = rl.get("start_accuracy"), rl.get("accuracy"), rl.get("eval_problems")
        if None in (a0, a1, n):
            checks.append((False, "RL: the report has no accuracy before and after on held-apart problems"))
        else:
            se = math.sqrt((a0 * (1 - a0) + a1 * (1 - a1)) / n)
            checks.append((a1 - a0 > 3 * se, f"RL: accuracy on {n} held-apart problems {a0:.3f} -> {a1:.3f} "
                                             f"(bar: a gain above 3 standard errors, {3 * se:.3f})"))
    return checks


def command(distributed, argv, n_gpus):
    if distributed and n_gpus > 1:
        return torchrun_command(argv, n_gpus)
    return [sys.executable, "-m", "picochat", *argv]


def tee(cmd, log_path):
    """Run cmd, streaming its output to the terminal and appending it to log_path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
