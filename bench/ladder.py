"""Quality per token: picochat trained at several depths on one shard folder at a fixed token budget, every
checkpoint scored by one evaluator that another tool's models can be scored by too.

    python bench/ladder.py prepare --data ../shared/data/webtext/shards --out /tmp/ladder
    python bench/ladder.py train --out /tmp/ladder --depths 4,6 --tokens 1966080
    python bench/ladder.py train --out /tmp/ladder --depths 4 --label ve -- --value-embeds   # an ablation
    python bench/ladder.py compare /tmp/ladder/runs.jsonl --plot /tmp/ladder/ladder.png

prepare: the data's last shard stays the validation shard ("val"); from the training shards every document whose
  sha256 % 20 == 0 is held apart (about 5%) into heldout.parquet ("heldout", text neither tool trains on, apart
  from the usual validation shard), the rest is written as data/shard_*.parquet, then val last. A BPE tokenizer of
  --vocab-size is trained on data/ (tokenizer/).
train: `picochat pretrain` per depth (head dim 64, full attention, --seq-len, --batch tokens per step, one
  micro-batch per step, --tokens in all) with the arguments after `--`, saving every --score-every steps; every
  checkpoint is scored on the first --score-docs documents of val and of heldout. Appends one JSON line per run
  to runs.jsonl: tool, label, depth, params, steps, tokens, train_seconds (see training_seconds), tok_per_sec,
  and the curve
  [{step, tokens, seconds, val, heldout}] with its last point repeated as bpb_val, bpb_heldout.
compare: a table of every run at equal tokens (the last point) and at equal wall time (each curve read at the
  shortest run's train_seconds, linearly between points), and a plot of bpb against tokens and against seconds.

The evaluator (score_documents): for each document, <|bos|> and its first --doc-tokens tokens; the cross-entropy of
each token given those before it, summed over all documents, divided by ln 2 and by the UTF-8 bytes those tokens
stand for. Tools with different tokenizers are compared per byte of the same text. A tool plugs in with three
functions: encode(text) -> ids (no bos), bos id, token_bytes (bytes per id), and logits(ids [B, T]) -> [B, T, V].

Runs take tens of minutes each on a CPU (a d4 run of 2M tokens on 2 cores of an AVX2-only Zen 1: 28 min of
training, 35 with the scoring); `train` says its progress on stderr.
"""
import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from picochat.checkpoint import list_steps, load_model
from picochat.shards import split_shards, write_shard


def read_docs(path):
    return [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]


def held_apart(text):
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 20 == 0


@torch.no_grad()
def score_documents(docs, *, encode, bos, token_bytes, logits, doc_tokens=512, batch=8):
    """Bits per byte of docs under a model: the tool-neutral evaluator (see the module docstring)."""
    token_bytes = torch.as_tensor(token_bytes, dtype=torch.float64)
    rows = sorted(([bos] + encode(text)[:doc_tokens] for text in docs), key=len)
    nats = nbytes = 0.0
    for i in range(0, len(rows), batch):
        group = rows[i:i + batch]
        width = max(len(r) for r in group)
        x = torch.tensor([r + [bos] * (width - len(r)) for r in group])
        mask = torch.tensor([[j < len(r) - 1 for j in range(width - 1)] for r in group])
        out = logits(x[:, :-1]).float()
        loss = F.cross_entropy(out.transpose(1, 2), x[:, 1:], reduction="none").double()
        nats += float((loss * mask).sum())
        nbytes += float((token_bytes[x[:, 1:]] * mask).sum())
    return nats / (math.log(2) * nbytes)


def picochat_scorer(folder, step):
    model, tok, _ = load_model(folder, step)
    model.eval()
    return dict(encode=lambda text: tok.encode(text), bos=tok.special("<|bos|>"), token_bytes=tok.token_bytes(),
                logits=lambda x: model(x))


def prepare(args):
    out = Path(args.out)
    train, val = split_shards(args.data)
    docs = [d for path in train for d in read_docs(path)]
    (out / "data").mkdir(parents=True, exist_ok=True)
    write_shard(out / "heldout.parquet", [d for d in docs if held_apart(d)])
    kept = [d for d in docs if not held_apart(d)]
    per = math.ceil(len(kept) / len(train))
    for i in range(len(train)):
        write_shard(out / "data" / f"shard_{i:05d}.parquet", kept[i * per:(i + 1) * per])
    write_shard(out / "data" / f"shard_{len(train):05d}.parquet", read_docs(val))
    env = dict(os.environ, PICOCHAT_HOME=str(out / "home"))
    subprocess.run([sys.executable, "-m", "picochat", "tokenizer", "train", "--data", str(out / "data"),
                    "--out", str(out / "tokenizer"), "--vocab-size", str(args.vocab_size)], env=env, check=True)
    print(json.dumps({"train_docs": len(kept), "heldout_docs": len(docs) - len(kept),
                      "val_docs": len(read_docs(val)), "vocab_size": args.vocab_size}))


def training_seconds(step_dts, step, warmup=2):
    """Seconds of training up to `step` from {step: seconds of that step}, the first `warmup` steps counted at the
    median step's time: one-off costs (compilation, allocator warm-up) would swamp a few minutes of training."""
    times = [step_dts[s] for s in sorted(step_dts)]
    median = sorted(times)[len(times) // 2]
    return sum(median if i < warmup else t for i, (s, t) in enumerate(zip(sorted(step_dts), times)) if s <= step)


def curve_point(folder, step, *, step_dts, batch, val_docs, heldout_docs, doc_tokens):
    seconds = training_seconds(step_dts, step)
    scorer = picochat_scorer(folder, step)
    return {"step": step, "tokens": step * batch, "seconds": round(seconds, 2),
            "val": score_documents(val_docs, doc_tokens=doc_tokens, **scorer),
            "heldout": score_documents(heldout_docs, doc_tokens=doc_tokens, **scorer)}


def train(args):
    out = Path(args.out)
    _, val = split_shards(out / "data")
    val_docs, heldout_docs = read_docs(val)[:args.score_docs], read_docs(out / "heldout.parquet")[:args.score_docs]
    steps = args.tokens // args.batch
    for depth in [int(d) for d in args.depths.split(",")]:
        run = f"{args.label}-d{depth}"
        folder = out / "home" / "runs" / run / "base"
        cmd = [sys.executable, "-m", "picochat", "pretrain", "--run", run, "--data", str(out / "data"),
               "--tokenizer", str(out / "tokenizer"), "--depth", str(depth), "--head-dim", "64",
               "--seq-len", str(args.seq_len), "--window-pattern", "L", "--total-batch-size", str(args.batch),
               "--device-batch-size", str(args.batch // args.seq_len), "--num-iterations", str(steps),
               "--eval-every", str(steps), "--save-every", str(args.score_every), "--keep", "1000",
               "--sample-every", "0", "--seed", str(args.seed), *args.extra]
        print(f"[ladder] {run}: {' '.join(cmd[2:])}", file=sys.stderr)
        t0 = time.time()
        subprocess.run(cmd, env=dict(os.environ, PICOCHAT_HOME=str(out / "home")), check=True,
                       stdout=subprocess.DEVNULL)
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        step_dts = {r["step"]: r["dt"] for r in metrics if "dt" in r}
        curve = [curve_point(folder, s, step_dts=step_dts, batch=args.batch, val_docs=val_docs,
                             heldout_docs=heldout_docs, doc_tokens=args.doc_tokens) for s in list_steps(folder)]
        model, _, _ = load_model(folder)
        last = curve[-1]
        record = {"tool": "picochat", "label": args.label, "depth": depth, "seed": args.seed,
                  "params": sum(p.numel() for p in model.parameters()), "steps": steps, "tokens": steps * args.batch,
                  "train_seconds": last["seconds"], "tok_per_sec": round(last["tokens"] / last["seconds"], 1),
                  "bpb_val": last["val"], "bpb_heldout": last["heldout"], "wall_seconds": round(time.time() - t0, 1),
                  "extra": args.extra, "curve": curve}
        with open(out / "runs.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "curve"}))


def at_seconds(curve, seconds, key):
    """A curve's bpb at a wall time, linearly between its points (its first point before the first score)."""
    for a, b in zip(curve, curve[1:]):
        if a["seconds"] <= seconds <= b["seconds"]:
            frac = (seconds - a["seconds"]) / max(b["seconds"] - a["seconds"], 1e-9)
            return a[key] + frac * (b[key] - a[key])
    return curve[-1][key] if seconds >= curve[-1]["seconds"] else curve[0][key]


def compare(args):
    runs = [json.loads(line) for path in args.runs for line in Path(path).read_text().splitlines() if line.strip()]
    for depth in sorted({r["depth"] for r in runs}):
        group = [r for r in runs if r["depth"] == depth]
        budget = min(r["train_seconds"] for r in group)
        for r in group:
            row = {"depth": depth, "tool": r["tool"], "label": r["label"], "seed": r.get("seed", 0),
                   "tokens": r["tokens"], "tok_per_sec": r["tok_per_sec"], "bpb_val": round(r["bpb_val"], 4),
                   "bpb_heldout": round(r["bpb_heldout"], 4), "equal_time_seconds": budget,
                   "bpb_val_at_equal_time": round(at_seconds(r["curve"], budget, "val"), 4),
                   "bpb_heldout_at_equal_time": round(at_seconds(r["curve"], budget, "heldout"), 4)}
            print(json.dumps(row))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in runs:
            name = f"{r['tool']} {r['label']} d{r['depth']} s{r.get('seed', 0)}"
            axes[0].plot([p["tokens"] for p in r["curve"]], [p["val"] for p in r["curve"]], marker=".", label=name)
            axes[1].plot([p["seconds"] for p in r["curve"]], [p["val"] for p in r["curve"]], marker=".", label=name)
        for ax, xlabel in zip(axes, ("tokens", "training seconds")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation bits per byte")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare")
    s.set_defaults(func=prepare)
    s.add_argument("--data", required=True, help="a shard folder (the last shard is its validation shard)")
    s.add_argument("--out", required=True)
    s.add_argument("--vocab-size", type=int, default=8192)
    s = sub.add_parser("train")
    s.set_defaults(func=train)
    s.add_argument("--out", required=True, help="a folder made by `prepare`")
    s.add_argument("--depths", default="4,6")
    s.add_argument("--tokens", type=int, default=120 * 16384)
    s.add_argument("--batch", type=int, default=16384, help="tokens per step")
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--score-every", type=int, default=20, help="steps between scored checkpoints")
    s.add_argument("--doc-tokens", type=int, default=512)
    s.add_argument("--score-docs", type=int, default=400, help="documents scored from each of val and heldout")
    s.add_argument("--label", default="default")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("extra", nargs="*", help="after --: more `picochat pretrain` flags (an ablation)")
    s = sub.add_parser("compare")
    s.set_defaults(func=compare)
    s.add_argument("runs", nargs="+", help="runs.jsonl files (the reference's too, in the same format)")
    s.add_argument("--plot", default="")
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
