"""CORE evaluation speed: a depth-4 model (random init) over every task of the eval bundle that is present.

    python bench/core.py --max-per-task 100 --compare-per-task 10

Three measurements in the same run, on the same model:
  full      the batched evaluator (shared prefixes in a KV cache, head only at scored positions) over
            --max-per-task items per task: wall time and examples/s
  compare   --compare-per-task items per task scored three ways: one sequence at a time with the full logits
            (the plain computation), batched without prefix sharing, and batched with it; the speed ratios
            and whether all three judge every item the same
The tokenizer is trained on the shared webtext shard (or --tokenizer DIR). Prints one JSON line.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from picochat.common import autodetect_device, compute_dtype
from picochat.model import GPT, GPTConfig
from picochat.tokenizer import Tokenizer
from picochat import core

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--depth", type=int, default=4)
p.add_argument("--head-dim", type=int, default=128)
p.add_argument("--seq-len", type=int, default=2048)
p.add_argument("--vocab-size", type=int, default=32768)
p.add_argument("--tokenizer", default="", help="tokenizer folder (default: train one on the shared webtext shard)")
p.add_argument("--bundle", default=str(SHARED / "eval_bundle"))
p.add_argument("--max-per-task", type=int, default=100)
p.add_argument("--compare-per-task", type=int, default=10, help="items per task for the three-way comparison")
p.add_argument("--batch-tokens", type=int, default=0, help="default: 16384 on CPU, 65536 on GPU")
p.add_argument("--device", default="")
p.add_argument("--skip-full", action="store_true", help="only the comparison")
args = p.parse_args()

device = torch.device(args.device or autodetect_device())
dtype = compute_dtype(device.type)
autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else None
batch_tokens = args.batch_tokens or (65536 if device.type == "cuda" else 16384)

if args.tokenizer:
    tok = Tokenizer.load(args.tokenizer)
else:
    import pyarrow.parquet as pq
    t0 = time.perf_counter()
    texts = pq.read_table(SHARED / "webtext" / "shards" / "shard_00000.parquet").column("text").to_pylist()
    tok = Tokenizer.train(iter(texts), args.vocab_size, max_chars=20_000_000)
    print(f"tokenizer: {tok.vocab_size} tokens in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

config = GPTConfig.from_depth(args.depth, vocab_size=tok.vocab_size, sequence_len=args.seq_len, head_dim=args.head_dim)
model = GPT(config).to(device).init_weights(seed=0).eval()
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
quiet = lambda *a: None  # noqa: E731


def timed(fn):
    """(result, wall seconds); its process CPU seconds are appended to cpu_seconds: on a shared machine the wall
    time depends on the other jobs, the CPU time much less."""
    sync()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    cpu_seconds.append(time.process_time() - c)
    return out, time.perf_counter() - t


cpu_seconds = []


result = {"bench": "core", "device": str(device), "threads": torch.get_num_threads(), "depth": args.depth,
          "width": config.n_embd, "vocab_size": tok.vocab_size, "seq_len": args.seq_len, "batch_tokens": batch_tokens}

# warm-up (allocator, kernels) on a few items, not timed
core.evaluate_core(model, tok, args.bundle, device, max_per_task=2, batch_tokens=batch_tokens, autocast=autocast,
                   tasks=["copa", "hellaswag"], log=quiet)

if not args.skip_full:
    full, dt = timed(lambda: core.evaluate_core(model, tok, args.bundle, device, max_per_task=args.max_per_task,
                                                batch_tokens=batch_tokens, autocast=autocast, log=quiet))
    result.update(label=full["label"], core=round(full["core"], 4), max_per_task=args.max_per_task,
                  examples=full["examples"], seconds=round(dt, 1), cpu_seconds=round(cpu_seconds[-1], 1),
                  examples_per_sec=round(full["examples"] / dt, 2))

n = args.compare_per_task
single, t_single = timed(lambda: core.evaluate_core(model, tok, args.bundle, device, max_per_task=n,
                                                    batch_tokens=batch_tokens, autocast=autocast, single=True,
                                                    log=quiet))
shared, t_shared = timed(lambda: core.evaluate_core(model, tok, args.bundle, device, max_per_task=n,
                                                    batch_tokens=batch_tokens, autocast=autocast, log=quiet))
plain, t_plain = timed(lambda: core.evaluate_core(model, tok, args.bundle, device, max_per_task=n,
                                                  batch_tokens=batch_tokens, autocast=autocast, share_prefix=False,
                                                  log=quiet))

agree = all(single["tasks"][t]["correct"] == shared["tasks"][t]["correct"] == plain["tasks"][t]["correct"]
            for t in single["tasks"])
ex = single["examples"]
result.update(compare_per_task=n, compare_examples=ex,
              one_at_a_time_examples_per_sec=round(ex / t_single, 2),
              batched_examples_per_sec=round(ex / t_plain, 2),
              batched_shared_prefix_examples_per_sec=round(ex / t_shared, 2),
              speedup_batched=round(t_single / t_plain, 2), speedup_batched_shared_prefix=round(t_single / t_shared, 2),
              cpu_seconds_one_at_a_time=round(cpu_seconds[-3], 1), cpu_seconds_batched=round(cpu_seconds[-1], 1),
              cpu_seconds_batched_shared_prefix=round(cpu_seconds[-2], 1),
              cpu_speedup_batched_shared_prefix=round(cpu_seconds[-3] / cpu_seconds[-2], 2),
              same_judgements=agree)
print(json.dumps(result))
