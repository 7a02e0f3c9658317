"""Tokenizer throughput: training characters/s and encoding MB/s for picochat's tokenizer, with rustbpe alone and
HF `tokenizers` (a byte-level BPE trainer with a GPT-2-style pre-tokenizer) timed side by side on the same text.

    python bench/tokenizer.py --data ../shared/data/webtext/shards --vocab-size 32768 --max-chars 13500000

Each figure is the best of --repeats runs, the three trainers interleaved round by round (the machine may be
shared). Prints one JSON line.
"""
import argparse
import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from picochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", default="../shared/data/webtext/shards", help="folder of parquet shards with a text column")
p.add_argument("--vocab-size", type=int, default=32768)
p.add_argument("--max-chars", type=int, default=13_500_000)
p.add_argument("--doc-cap", type=int, default=10_000)
p.add_argument("--repeats", type=int, default=2)
args = p.parse_args()

docs, n = [], 0
for shard in sorted(Path(args.data).glob("*.parquet"))[:-1] or sorted(Path(args.data).glob("*.parquet")):
    for doc in pq.read_table(shard, columns=["text"]).column("text").to_pylist():
        doc = doc[:args.doc_cap][:args.max_chars - n]
        docs.append(doc)
        n += len(doc)
        if n >= args.max_chars:
            break
    if n >= args.max_chars:
        break
chars = sum(map(len, docs))


def ours():
    return Tokenizer.train(iter(docs), args.vocab_size, doc_cap=args.doc_cap)


def rustbpe_alone():
    import rustbpe
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(docs), args.vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    return bpe


def hf():
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return tok


train = {"ours": ours, "rustbpe": rustbpe_alone, "hf_tokenizers": hf}
best, built = {k: float("inf") for k in train}, {}
for _ in range(args.repeats):
    for name, fn in train.items():
        t0 = time.perf_counter()
        built[name] = fn()
        best[name] = min(best[name], time.perf_counter() - t0)

# encoding: the same text through our tokenizer (tiktoken, threaded batch) and HF's (batch)
mb = sum(len(d.encode()) for d in docs) / 2 ** 20
enc = {}
for name, fn in (("ours", lambda: built["ours"].encode(docs)),
                 ("hf_tokenizers", lambda: built["hf_tokenizers"].encode_batch(docs))):
    t0 = time.perf_counter()
    fn()
    enc[name] = mb / (time.perf_counter() - t0)

print(json.dumps({
    "bench": "tokenizer", "chars": chars, "vocab_size": args.vocab_size,
    "train_seconds": {k: round(v, 3) for k, v in best.items()},
    "train_chars_per_sec": {k: round(chars / v) for k, v in best.items()},
    "ours_over_rustbpe": round(best["rustbpe"] / best["ours"], 3),
    "ours_over_hf": round(best["hf_tokenizers"] / best["ours"], 3),
    "encode_mb_per_sec": {k: round(v, 1) for k, v in enc.items()},
    "ours_vocab": built["ours"].vocab_size}))
