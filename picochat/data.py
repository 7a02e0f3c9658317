"""`picochat data`: get text to train on.

    picochat data download [-n 8] [--source climbmix|fineweb-edu] [--what pretrain,sft,eval]
    picochat data import PATH... [--chat]       your own txt / jsonl / parquet -> standard shards
    picochat data demo [--seed 0] [--scale 1]   the offline synthetic curriculum (picochat/demo.py)

The data folder's layout and the shard format are in picochat/shards.py; how downloads are fetched and verified
is in picochat/download.py.
"""
import argparse
import json
import random
import re
import time
from pathlib import Path

import pyarrow as pa

from picochat.common import UserError, atomic_write_bytes, atomic_write_json, replacing_dir
from picochat.download import PRETRAIN_SOURCES, WHAT_SETS, download_pretrain, download_sets
from picochat.shards import (SHARD_CHARS, open_parquet, read_text, iter_jsonl, pretrain_dir, sft_dir,
                             write_shards)


# ---- import -------------------------------------------------------------------------------------------------
TEXT_SUFFIXES = (".txt", ".md", ".text", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
DOC_BREAK = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")  # two or more blank lines
PARA_BREAK = re.compile(r"\n[ \t]*\n")


def split_text(text, chunk_chars=10_000):
    """A .txt file -> documents. Runs of 2+ blank lines separate documents. A document over 2 x chunk_chars (a
    book, tiny-shakespeare, a file with no such breaks) is cut into ~chunk_chars pieces at paragraph boundaries
    (line boundaries inside an overlong paragraph): the loader crops a document that does not fit its row and
    drops the rest, and pieces can be shuffled and some held out for validation."""
    docs = []
    for doc in DOC_BREAK.split(text):
        doc = doc.strip()
        if len(doc) <= 2 * chunk_chars:
            docs += [doc] if doc else []
            continue
        pieces = []
        for para in PARA_BREAK.split(doc):
            pieces.extend(_pack(para.split("\n"), "\n", chunk_chars) if len(para) > chunk_chars else [para])
        docs.extend(_pack(pieces, "\n\n", chunk_chars))
    return docs


def _pack(pieces, sep, limit):
    out, cur, n = [], [], 0
    for p in pieces:
        if cur and n + len(p) > limit:
            out.append(sep.join(cur))
            cur, n = [], 0
        cur.append(p)
        n += len(p) + len(sep)
    if cur:
        out.append(sep.join(cur))
    return out


def _input_files(paths, suffixes):
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
            if not found:
                raise UserError(f"{p}: no {', '.join(suffixes)} files in this folder")
            files.extend(found)
        elif not p.exists():
            raise UserError(f"{p}: no such file or folder")
        elif not p.name.endswith(suffixes):
            raise UserError(f"{p}: unsupported file type (use {', '.join(suffixes)})")
        else:
            files.append(p)
    return files


def read_documents(path):
    """The documents of one input file: .txt (see split_text), .jsonl with a `text` string field per line,
    or .parquet with a `text` column. Malformed input -> UserError naming the file and line."""
    path = Path(path)
    if path.name.endswith(TEXT_SUFFIXES):
        return split_text(read_text(path))
    if path.name.endswith(JSONL_SUFFIXES):
        docs = []
        for n, obj in iter_jsonl(path):
            if not isinstance(obj.get("text"), str):
                raise UserError(f"{path} line {n}: no 'text' string field (keys: {', '.join(obj) or 'none'})")
            if obj["text"].strip():
                docs.append(obj["text"])
        return docs
    pf = open_parquet(path, column="text")
    if not pa.types.is_string(pf.schema_arrow.field("text").type) and \
            not pa.types.is_large_string(pf.schema_arrow.field("text").type):
        raise UserError(f"{path}: the 'text' column holds {pf.schema_arrow.field('text').type}, not strings")
    docs = []
    for i in range(pf.num_row_groups):
        try:
            col = pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
        except Exception as e:
            raise UserError(f"{path} row group {i}: unreadable ({e.__class__.__name__}: {e})") from None
        docs.extend(d for d in col if d and d.strip())
    return docs


def _check_out(out, force):
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} already has files: pass --force to replace them, or --out DIR for another folder")


def import_text(paths, out=None, *, shard_chars=SHARD_CHARS, val_docs=None, seed=42, force=False):
    """Your own text -> standard pretraining shards in out (default data/pretrain). Documents from all files are
    pooled, shuffled with a fixed seed, and the first val_docs (count, or fraction if < 1; default val_count)
    become the validation shard. Everything is written to a temp folder and moved into place at the end.
    Holds the documents in memory: fine for a few GB of text."""
    files = _input_files(paths, TEXT_SUFFIXES + JSONL_SUFFIXES + (".parquet",))
    out = Path(out) if out else pretrain_dir()
    _check_out(out, force)
    with replacing_dir(out) as tmp:
        docs = []
        for f in files:
            docs.extend(read_documents(f))
        if len(docs) < 2:
            raise UserError(f"only {len(docs)} document(s) in {', '.join(map(str, files))}: need at least 2 "
                            f"(one to train on, one to validate)")
        random.Random(seed).shuffle(docs)
        shards = write_shards(docs, tmp, shard_chars, val_docs)
        atomic_write_json(tmp / "source.json", {"source": "import", "files": [str(f) for f in files],
                                                "docs": len(docs), "shards": len(shards), "seed": seed})
    return [out / p.name for p in shards]


def import_chat(paths, out=None, force=False):
    """jsonl conversations -> out (default data/sft)/<name>.jsonl, validated like the tokenizer renders them.
    Lines in our format must be valid as `sft --data` reads them (else UserError naming the line: SFT reads
    data/sft/ that way); ShareGPT lines ({"conversations"}) and preference pairs are converted leniently, and the
    ones that cannot be are skipped and counted. Returns {written path: (kept, skipped)}."""
    from picochat.tasks.chat import conversation, to_messages
    files = _input_files(paths, JSONL_SUFFIXES)
    out = Path(out) if out else sft_dir()
    targets = {}
    for f in files:
        name = f.name.removesuffix(".gz").removesuffix(".jsonl") + ".jsonl"
        if name in targets:
            raise UserError(f"{f} and {targets[name]} would both become {out / name}: rename one")
        if (out / name).exists() and not force:
            raise UserError(f"{out / name} already exists: pass --force to replace it")
        targets[name] = f
    results, staged = {}, []
    for name, f in targets.items():
        lines, skipped = [], 0
        for n, obj in iter_jsonl(f):
            if "messages" in obj:
                msgs = conversation(obj, f"{f} line {n}")["messages"]
            else:
                msgs, why = to_messages(obj.get("conversations", obj.get("chosen")))
                if msgs is None:
                    skipped += 1
                    continue
            lines.append(json.dumps({"messages": msgs}, ensure_ascii=False))
        if not lines:
            raise UserError(f"{f}: no usable conversations (expected {{\"messages\": [...]}} per line)")
        staged.append((out / name, ("\n".join(lines) + "\n").encode()))
        results[out / name] = (len(lines), skipped)
    for path, data in staged:  # everything validated before the first byte is written
        atomic_write_bytes(path, data)
    return results


# ---- CLI ----------------------------------------------------------------------------------------------------
def add_parser(sub):
    p = sub.add_parser("data", help="download, import or generate training data",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="action", metavar="<action>", required=True)

    d = dsub.add_parser("download", help="pretraining shards and chat/eval sets from the Hugging Face hub",
                        description="Resumable, verified, parallel downloads into $PICOCHAT_HOME/data. "
                                    "Run it again after an interruption to resume.")
    d.add_argument("-n", "--num-shards", type=int, default=8,
                   help="training shards (~250M characters each); the validation shard comes on top")
    d.add_argument("--source", default="climbmix", choices=list(PRETRAIN_SOURCES),
                   help="climbmix: karpathy/climbmix-400b-shuffle (6,543 shards); "
                        "fineweb-edu: karpathy/fineweb-edu-100b-shuffle (1,823 shards)")
    d.add_argument("--what", default="pretrain,sft,eval",
                   help="comma list: pretrain (shards), sft (SmolTalk), eval (GSM8K, ARC, MMLU, HumanEval, "
                        "CORE bundle, word list)")
    d.add_argument("--workers", type=int, default=8, help="parallel downloads")
    d.add_argument("--endpoint", default="", help="hub URL (default $PICOCHAT_HF_ENDPOINT or https://huggingface.co)")
    d.set_defaults(func=download_cli)

    i = dsub.add_parser("import", help="your own text (txt, jsonl, parquet) -> pretraining shards",
                        description="Documents: a .txt file is split at runs of 2+ blank lines, and a document "
                                    "over 20k characters (a book) is cut into ~10k-character chunks at paragraph "
                                    "boundaries; a "
                                    ".jsonl needs a 'text' field per line; a .parquet a 'text' column. Folders "
                                    "are searched recursively. With --chat, .jsonl conversations go to data/sft/.")
    i.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    i.add_argument("--out", default="",
                   help="output folder (default $PICOCHAT_HOME/data/pretrain, or data/sft with --chat)")
    i.add_argument("--chat", action="store_true",
                   help='jsonl of {"messages": [...]} (or ShareGPT) conversations for SFT')
    i.add_argument("--shard-chars", type=int, default=SHARD_CHARS, help="characters per shard")
    i.add_argument("--val-docs", type=float, default=None,
                   help="documents held out as the validation shard: a count, or a fraction if < 1 "
                        "(default 1%%, at least 1,024, when there are >= 5,120 documents; else 10%%)")
    i.add_argument("--seed", type=int, default=42, help="seed of the document shuffle")
    i.add_argument("--force", action="store_true", help="replace what the output folder already holds")
    i.set_defaults(func=import_cli)

    from picochat import demo
    demo.add_parser(dsub)


def download_cli(args):
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = [w for w in what if w not in ("pretrain", "sft", "eval")]
    if bad:
        raise UserError(f"--what {','.join(bad)}: pick from pretrain, sft, eval")
    endpoint = args.endpoint or None
    if "pretrain" in what:
        paths = download_pretrain(args.num_shards, args.source, endpoint, args.workers)
        print(f"{len(paths)} shards in {pretrain_dir()} (the last one, {paths[-1].name}, is validation)")
    names = [n for w in what if w in WHAT_SETS for n in WHAT_SETS[w]]
    if names:
        out = download_sets(names, endpoint, args.workers)
        print(f"{', '.join(names)} in {out}")
    return 0


def import_cli(args):
    if args.chat:
        results = import_chat(args.paths, args.out or None, args.force)
        for path, (kept, skipped) in results.items():
            print(f"{path}: {kept:,} conversations" + (f" ({skipped:,} skipped: unusable turns)" if skipped else ""))
        return 0
    val = args.val_docs
    if val is not None and val >= 1:
        val = int(val)
    t0 = time.time()
    paths = import_text(args.paths, args.out or None, shard_chars=args.shard_chars, val_docs=val, seed=args.seed,
                        force=args.force)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"{len(paths)} shards ({mb:.1f} MB) in {paths[0].parent} in {time.time() - t0:.1f}s; "
          f"{paths[-1].name} is the validation shard")
    return 0
