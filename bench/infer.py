"""Inference throughput: decode tokens/s at batch 1 (Engine.generate) and aggregate tokens/s of concurrent
requests through the continuous-batching Scheduler (what the server runs), against a naive loop on the same model
(GPT.forward over the whole sequence for every new token, no cache: naive_generate_tok_s).

    python bench/infer.py                       # depth 6, width 384 (head dim 64), vocab 32768, fp32
    python bench/infer.py --threads 2 --compile
    python bench/infer.py --depth 20 --head-dim 128 --vocab-size 65536 --dtype float32,int8 --skip-naive

With several --dtype values, batch-1 decode is measured for each (one Engine per dtype over the same model, rounds
interleaved: batch1_tok_s_by_dtype, and batch1_ratio_to_first = each one's figure over the first one's); the
scheduler and naive figures are the first dtype's.

Random weights (speed does not depend on them); stop tokens are switched off so every request decodes exactly
--tokens tokens. Each figure is the best of --repeats rounds, the measurements interleaved round by round (the machine
may be shared).
Prints one JSON line.
"""
import argparse
import json
import os
import threading
import time

import torch

from picochat.checkpoint import ENGINE_DTYPES
from picochat.common import autodetect_device
from picochat.batching import Request, Scheduler
from picochat.engine import Engine
from picochat.model import GPT, GPTConfig
from picochat.tokenizer import SPECIAL_TOKENS

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--depth", type=int, default=6)
p.add_argument("--head-dim", type=int, default=64)
p.add_argument("--vocab-size", type=int, default=32768)
p.add_argument("--seq-len", type=int, default=2048)
p.add_argument("--prompt-tokens", type=int, default=32)
p.add_argument("--tokens", type=int, default=256, help="tokens decoded per request")
p.add_argument("--concurrent", type=int, default=8, help="requests in flight for the aggregate figure")
p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
p.add_argument("--top-k", type=int, default=0)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--threads", type=int, default=0,
               help="torch threads of the thread that runs the model (0 = torch's default). Use 1 on a busy machine: "
                    "a 2-thread OpenMP team stalls on every op when the other core is busy (both engines drop to "
                    "<10 tok/s)")
p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
p.add_argument("--device", default="")
p.add_argument("--dtype", default="auto",
               help=f"the engine's dtype, or several separated by commas (of {', '.join(ENGINE_DTYPES)}; see above)")
p.add_argument("--skip-naive", action="store_true")
args = p.parse_args()
dtypes = args.dtype.split(",")
for name in dtypes:
    if name not in ENGINE_DTYPES:
        p.error(f"--dtype {name}: not one of {', '.join(ENGINE_DTYPES)}")

# every measurement runs in the scheduler's thread, as in the server; this one keeps one torch thread (see
# batching.Scheduler: a second OpenMP team in the process would slow both)
threads = args.threads or torch.get_num_threads()
torch.set_num_threads(1)
device = torch.device(args.device or autodetect_device())
config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.seq_len, head_dim=args.head_dim)
model = GPT(config).to(device).init_weights(seed=0).eval()


class StubTokenizer:
    """What the engine needs from a tokenizer when no tool call happens: the special token ids."""
    def __init__(self, vocab):
        self.ids = {s: vocab - len(SPECIAL_TOKENS) + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.bos_id = self.ids["<|bos|>"]

    def special(self, name):
        return self.ids[name]


tok = StubTokenizer(args.vocab_size)
engines = {name: Engine(model, tok, tool=False, compile=args.compile, dtype=ENGINE_DTYPES[name]) for name in dtypes}
for e in engines.values():
    e.stop_ids = frozenset()  # never stop early: every request decodes exactly --tokens tokens
engine = engines[dtypes[0]]
gen = torch.Generator().manual_seed(0)
prompt = torch.randint(0, args.vocab_size - len(SPECIAL_TOKENS), (args.prompt_tokens,), generator=gen).tolist()
top_k = args.top_k or None
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn):
    sync()
    t0 = time.perf_counter()
    n = fn()
    sync()
    return n / (time.perf_counter() - t0)


def engine_run(engine):
    n = 0
    for tokens, _ in engine.generate(prompt, 1, args.tokens, temperature=args.temperature, top_k=top_k, seed=0):
        n += 1
    assert n == args.tokens, n
    return n


@torch.no_grad()
def naive_run():
    """The obvious decoding loop: the whole sequence through GPT.forward for each token, top-k and temperature on the
    last position's logits."""
    seq = list(prompt)
    gen = torch.Generator(device=device).manual_seed(0)
    n = 0
    while n < args.tokens and len(seq) < config.sequence_len:
        logits = model(torch.tensor([seq], device=device))[0, -1]
        if args.temperature <= 0:
            nxt = int(logits.argmax())
        else:
            if top_k:
                v, _ = torch.topk(logits, min(top_k, logits.numel()))
                logits[logits < v[-1]] = -float("inf")
            nxt = int(torch.multinomial(torch.softmax(logits / args.temperature, -1), 1, generator=gen))
        seq.append(nxt)
        n += 1
    return n


def scheduler_run(k, sched):
    done = threading.Semaphore(0)
    counts = [0] * k

    def emitter(i):
        def emit(ev):
            if ev[0] == "token":
                counts[i] += 1
            else:
                done.release()
        return emit

    for i in range(k):
        sched.submit(Request(prompt=prompt, max_tokens=args.tokens, temperature=args.temperature, top_k=top_k,
                             seed=i, emit=emitter(i)))
    for _ in range(k):
        done.acquire()
    assert sum(counts) == k * args.tokens, counts
    return sum(counts)


sched = Scheduler(engine, slots=args.concurrent, threads=threads).start()
t0 = time.perf_counter()
for e in engines.values():
    sched.run_job(lambda e=e: engine_run(e)).result()  # warm-up (the layouts, compiling)
warmup_s = time.perf_counter() - t0
scheduler_run(1, sched)
# rounds of every measurement, best of each: on a shared machine the load moves between phases
runs = {f"b1 {name}": lambda e=e: sched.run_job(lambda: engine_run(e)).result() for name, e in engines.items()}
runs.update({"one": lambda: scheduler_run(1, sched), "agg": lambda: scheduler_run(args.concurrent, sched)})
if not args.skip_naive:
    runs["naive"] = lambda: sched.run_job(naive_run).result()
res = {k: 0.0 for k in runs}
for _ in range(args.repeats):
    for k, fn in runs.items():
        res[k] = max(res[k], timed(fn))
sched.stop()
b1s = {name: res[f"b1 {name}"] for name in dtypes}
b1, one, agg, naive = b1s[dtypes[0]], res["one"], res["agg"], res.get("naive")
print(json.dumps({
    "bench": "infer", "device": str(device), "threads": threads, "compile": args.compile,
    "model": f"d{args.depth} w{config.n_embd} h{config.n_head}x{config.head_dim} V{args.vocab_size}",
    "params": model.num_params(), "dtype": dtypes[0] if dtypes[0] != "auto" else str(engine.net.dtype).split(".")[-1],
    "prompt_tokens": args.prompt_tokens, "decode_tokens": args.tokens, "temperature": args.temperature,
    "top_k": top_k,
    "batch1_tok_s": round(b1, 1), "batch1_ms_per_token": round(1000 / b1, 2),
    **({"batch1_tok_s_by_dtype": {k: round(v, 2) for k, v in b1s.items()},
        "batch1_ratio_to_first": {k: round(v / b1, 2) for k, v in b1s.items()}} if len(dtypes) > 1 else {}),
    "naive_generate_tok_s": round(naive, 1) if naive else None,
    "scheduler_1_tok_s": round(one, 1),
    f"scheduler_{args.concurrent}_concurrent_tok_s": round(agg, 1),
    "concurrency_speedup": round(agg / one, 2),
    "warmup_s": round(warmup_s, 1), "load_avg_1m": round(os.getloadavg()[0], 2),
}))
