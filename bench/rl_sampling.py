"""RL sampling throughput: a group of N replies to one prompt in one batched engine call (one prefill, the KV
cache replicated to N rows, batched decode) against N separate calls at batch 1. Prints one JSON line.

    python bench/rl_sampling.py                      # a random demo-sized model (depth 4, width 256)
    python bench/rl_sampling.py --checkpoint runs/demo/sft
A random model rarely stops early, so every reply runs to --max-tokens and both sides generate the same tokens.
"""
import argparse
import json
import time

import torch

from picochat.model import GPT, GPTConfig
from picochat.tokenizer import Tokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="a stage folder to load (default: a random model)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="best of this many timings each")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from picochat.engine import Engine

    if args.checkpoint:
        from picochat.checkpoint import load_model
        model, tok, _ = load_model(args.checkpoint)
    else:
        tok = _synthetic_tokenizer(args.vocab_size)
        cfg = GPTConfig.from_depth(args.depth, vocab_size=tok.vocab_size,
                                   sequence_len=args.seq_len, head_dim=args.head_dim)
        model = GPT(cfg).init_weights(seed=0)
        # a random model samples near uniformly (1/vocab per token), so replies almost always run to
        # max_tokens on both sides; the speedup is per generated token anyway
    model.eval()
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "How many apples? " * 40}]})
    prompt = prompt[:1] + prompt[-args.prompt_tokens + 1:]
    engine = Engine(model, tok, tool=True)
    n = args.samples

    def batched():
        seqs, _ = engine.generate_batch(prompt, num_samples=n, max_tokens=args.max_tokens, temperature=1.0, seed=1)
        return sum(len(s) - len(prompt) for s in seqs)

    def separate():
        return sum(len(engine.generate_batch(prompt, num_samples=1, max_tokens=args.max_tokens, temperature=1.0,
                                             seed=1 + i)[0][0]) - len(prompt) for i in range(n))

    def best(fn):
        fn()  # warm-up
        times, toks = [], 0
        for _ in range(args.repeats):
            t = time.perf_counter()
            toks = fn()
            times.append(time.perf_counter() - t)
        return min(times), toks

    tb, nb = best(batched)
    ts, ns = best(separate)
    print(json.dumps({"bench": "rl_sampling", "samples": n, "max_tokens": args.max_tokens,
                      "prompt_tokens": len(prompt), "params": model.num_params(),
                      "batched_seconds": round(tb, 4), "separate_seconds": round(ts, 4),
                      "batched_tokens": nb, "separate_tokens": ns,
                      "batched_tok_per_sec": round(nb / tb, 1), "separate_tok_per_sec": round(ns / ts, 1),
                      "speedup": round((ts / max(1, ns)) / (tb / max(1, nb)), 2),
                      "threads": torch.get_num_threads()}))


def _synthetic_tokenizer(vocab_size):
    """A vocab_size tokenizer without training: the 256 bytes, then printable byte pairs."""
    from picochat.tokenizer import SPECIAL_TOKENS
    ranks = {bytes([i]): i for i in range(256)}
    printable = range(32, 127)
    for a in printable:
        for b in printable:
            if len(ranks) >= vocab_size - len(SPECIAL_TOKENS):
                return Tokenizer(ranks)
            ranks[bytes([a, b])] = len(ranks)
    return Tokenizer(ranks)


if __name__ == "__main__":
    main()
