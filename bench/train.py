"""Training throughput: tokens/s, MFU against the matmul peak measured in the same run, peak memory.

    python bench/train.py --depth 6 --head-dim 64 --seq-len 512 --device-batch-size 32 --vocab-size 32768

Random tokens (throughput does not depend on the data); one optimizer step per micro-batch. Prints one JSON line.
"""
import argparse
import json
import resource
import time

import torch

from picochat.common import autodetect_device, compute_dtype, measure_matmul_flops
from picochat.model import GPT, GPTConfig
from picochat.optim import build_optimizer

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--depth", type=int, default=6)
p.add_argument("--aspect-ratio", type=int, default=64)
p.add_argument("--head-dim", type=int, default=64)
p.add_argument("--seq-len", type=int, default=512)
p.add_argument("--device-batch-size", type=int, default=32)
p.add_argument("--vocab-size", type=int, default=32768)
p.add_argument("--window-pattern", default="L")
p.add_argument("--value-embeds", action="store_true")
p.add_argument("--no-resid-scalars", action="store_true")
p.add_argument("--steps", type=int, default=6, help="timed steps (after --warmup)")
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--compile", action="store_true", help="compile the model, the loss kernel and the Muon update, as "
                                                     "`picochat pretrain --compile` does")
p.add_argument("--loss-chunk", type=int, default=0, help="rows per loss chunk (0: the model's default)")
p.add_argument("--device", default="")
args = p.parse_args()

device = torch.device(args.device or autodetect_device())
dtype = compute_dtype(device.type)
config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.seq_len,
                              aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                              window_pattern=args.window_pattern, value_embeds=args.value_embeds,
                              resid_scalars=not args.no_resid_scalars)
model = GPT(config).to(device).init_weights(seed=0)
model.loss_chunk = args.loss_chunk
opt = build_optimizer(model)
fwd = torch.compile(model, dynamic=False) if args.compile else model
if args.compile:
    model.compile_loss()
    opt.compile()
gen = torch.Generator().manual_seed(0)
x = torch.randint(0, args.vocab_size, (args.device_batch_size, args.seq_len + 1), generator=gen).to(device)
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()


def step():
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = fwd(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    model.zero_grad(set_to_none=True)


t0 = time.perf_counter()
for _ in range(args.warmup):
    step()
sync()
warmup_s = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in range(args.steps):
    step()
sync()
dt = (time.perf_counter() - t0) / args.steps
tokens = args.device_batch_size * args.seq_len
peak = measure_matmul_flops(device, dtype, n=4096 if device.type == "cuda" else 1024)
mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps({
    "bench": "train",
    "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
    "depth": args.depth, "width": config.n_embd, "seq_len": args.seq_len, "batch": args.device_batch_size,
    "vocab": args.vocab_size, "compile": args.compile, "loss_chunk": args.loss_chunk,
    "dtype": str(dtype).split(".")[-1], "params": model.num_params(),
    "tokens_per_sec": round(tokens / dt, 1), "step_ms": round(dt * 1000, 1),
    "model_flops_per_sec": round(model.flops_per_token() * tokens / dt / 1e9, 2) * 1e9,
    "measured_matmul_peak": round(peak / 1e9, 2) * 1e9, "mfu": round(model.flops_per_token() * tokens / dt / peak, 4),
    "peak_memory_mb": round(mem / 2 ** 20, 1), "warmup_s": round(warmup_s, 1)}))
