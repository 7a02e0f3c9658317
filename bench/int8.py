"""int8 weights (Engine(dtype=torch.int8), `chat --dtype int8`) against float32 on a trained checkpoint: bits per
byte and greedy decoding on text the model never trained on.

    python bench/int8.py --run q8 --data /work/shared/data/webtext/shards
    python bench/int8.py --checkpoint path/to/stage_folder --data DIR --prompts 20 --tokens 64

- bpb: model.bits_per_byte over the first --eval-tokens tokens of the data's validation shard (its last one,
  which pretraining holds apart), each engine's InferenceModel reading every row through a cache in pieces of
  INT8_KERNEL_MAX_ROWS tokens: the int8 kernel, as in decoding (bpb_*). bpb_*_whole_rows score whole rows in one
  forward instead: int8_matmul's other path (dequantize, then gemm), the one a long prompt's prefill takes.
- greedy agreement: --prompts prompts, the first --prompt-tokens tokens of the validation shard's first documents.
  float32 decodes --tokens tokens greedily (Engine.generate); the int8 engine then reads that continuation one
  token per step (prefill, then batch-1 decode steps: the int8 kernel) and picks its own greedy token at every
  step: greedy_agreement is the fraction of steps where the two choices agree. identical_continuations counts the
  prompts whose free-running int8 greedy continuation equals float32's (one early difference changes the rest).
Prints one JSON line.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

from picochat.checkpoint import load_model, resolve_checkpoint
from picochat.common import pick_run
from picochat.decode import StaticCache, softcap
from picochat.engine import Engine
from picochat.int8 import INT8_KERNEL_MAX_ROWS
from picochat.loader import fixed_batches
from picochat.model import bits_per_byte
from picochat.shards import iter_texts, split_shards

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--run", default="", help="run name under $PICOCHAT_HOME/runs (default: the run trained most recently)")
p.add_argument("--stage", default=None, help="base, sft or rl (default: the run's latest)")
p.add_argument("--checkpoint", default="", help="a stage folder instead of --run/--stage")
p.add_argument("--data", required=True, help="folder of parquet shards (the last one is the validation shard)")
p.add_argument("--eval-tokens", type=int, default=131072)
p.add_argument("--batch-size", type=int, default=8, help="rows per scoring forward")
p.add_argument("--prompts", type=int, default=20)
p.add_argument("--prompt-tokens", type=int, default=32)
p.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
args = p.parse_args()

if args.threads:
    torch.set_num_threads(args.threads)
folder, stage = resolve_checkpoint("" if args.checkpoint else pick_run(args.run), args.stage, args.checkpoint)
model, tokenizer, meta = load_model(folder, None, "cpu")
engines = {"float32": Engine(model, tokenizer, tool=False), "int8": Engine(model, tokenizer, tool=False,
                                                                           dtype=torch.int8)}
_, val_files = split_shards(args.data)
T = model.config.sequence_len
token_bytes = tokenizer.token_bytes()


def scorer(net, piece=None):
    """What bits_per_byte calls, model(x, y, reduction="none"), through an InferenceModel: per-token losses
    (B, T), 0 where y < 0. piece: each row goes through a one-row cache that many tokens per forward (None: the
    whole batch in one forward, no cache)."""
    def hidden(x):
        if piece is None:
            return net.hidden(x)
        rows = []
        for row in x:
            cache = StaticCache(model.config, 1, len(row), "cpu", net.dtype)
            rows.append(torch.cat([net.hidden(row[None, s:s + piece], cache, slice(0, 1), [s])
                                   for s in range(0, len(row), piece)], dim=1))
        return torch.cat(rows)

    def loss(x, y, reduction):
        assert reduction == "none"
        logits = softcap(net.logits(hidden(x)), model.config.softcap)
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten().clamp(min=0), reduction="none")
        return nll.view(y.shape) * (y >= 0)
    return loss


@torch.inference_mode()
def forced_agreement(engine, prompt, continuation):
    """Steps where engine's greedy token equals continuation's, reading continuation one token per step."""
    cache = StaticCache(model.config, 1, len(prompt) + len(continuation), "cpu", engine.net.dtype)
    logits = engine.prefill(prompt, cache)[None]
    agree = 0
    for i, tok in enumerate(continuation):
        agree += int(logits[0].argmax()) == tok  # greedy: the soft-cap keeps the order
        if i + 1 < len(continuation):
            logits = engine.decode([tok], cache, [len(prompt) + i])
    return agree


def greedy(engine, prompt):
    seqs, _ = engine.generate_batch(prompt, 1, args.tokens, temperature=0.0)
    return seqs[0][len(prompt):]


out = {"bench": "int8", "checkpoint": str(folder), "stage": stage, "step": meta["step"],
       "model": f"d{model.config.n_layer} w{model.config.n_embd} V{model.config.vocab_size}",
       "params": model.num_params(), "threads": torch.get_num_threads()}
t0 = time.perf_counter()
batches = fixed_batches(val_files, tokenizer, args.batch_size, T, max(1, args.eval_tokens // (args.batch_size * T)))
out["eval_tokens"] = sum(x.numel() for x, _ in batches)
with torch.inference_mode():
    for name, e in engines.items():
        out[f"bpb_{name}"] = round(bits_per_byte(scorer(e.net, INT8_KERNEL_MAX_ROWS), batches, token_bytes), 5)
        out[f"bpb_{name}_whole_rows"] = round(bits_per_byte(scorer(e.net), batches, token_bytes), 5)
out["bpb_model_forward"] = round(bits_per_byte(model, batches, token_bytes), 5)  # the float32 figures' check
out["bpb_int8_rel_diff"] = round(out["bpb_int8"] / out["bpb_float32"] - 1, 5)

prompts = []
for text in iter_texts(val_files[-1:]):
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    if len(ids) >= args.prompt_tokens:
        prompts.append(ids[:args.prompt_tokens])
    if len(prompts) == args.prompts:
        break
agree = steps = identical = 0
for prompt in prompts:
    ref = greedy(engines["float32"], prompt)
    agree += forced_agreement(engines["int8"], prompt, ref)
    steps += len(ref)
    identical += greedy(engines["int8"], prompt) == ref
out.update(prompts=len(prompts), greedy_steps=steps, greedy_agreement=round(agree / steps, 4),
           identical_continuations=identical, seconds=round(time.perf_counter() - t0, 1))
print(json.dumps(out))
