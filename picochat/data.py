"""`picochat data`: get text to train on, and read every data format the other stages use.

    picochat data download [-n 8] [--source climbmix|fineweb-edu] [--what pretrain,sft,eval]
    picochat data import PATH... [--chat]       your own txt / jsonl / parquet -> standard shards
    picochat data demo [--seed 0] [--scale 1]   the offline synthetic curriculum (picochat/demo.py)

Layout under $PICOCHAT_HOME/data (the demo curriculum mirrors it under data/demo/):
    pretrain/shard_00000.parquet ...  one `text` column, row groups of 1,024 documents, zstd;
                                      the last shard (by name) is the validation shard
    sft/*.jsonl                       conversations, one {"messages": [{"role", "content"}, ...]} per line
    eval/<name>/...                   chat and eval sets as published: smoltalk, gsm8k, arc, mmlu, humaneval,
                                      eval_bundle (CORE), words

Downloads are resumable (HTTP Range into a .partial file), retried with exponential backoff on dropped
connections and 5xx, and renamed into place only after the size and a checksum (the hub's sha256 ETag) or the
parquet footer check out, so a file under its final name is always whole.
"""
import argparse
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from picochat.common import UserError, atomic_save, atomic_write_bytes, atomic_write_json, home_dir

ROW_GROUP_DOCS = 1024          # documents per parquet row group: the unit the loader shards across ranks
SHARD_CHARS = 250_000_000      # characters per shard, as in the published shards
PRETRAIN_SOURCES = {           # name -> (HF dataset repo, number of shards; the last one is validation)
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6543),
    "fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1823),
}
HF_ENDPOINT = "https://huggingface.co"
# chat and eval sets: name -> [(HF dataset repo, file in the repo, path under data/eval/<name>/)]
HF_SETS = {
    "smoltalk": [("HuggingFaceTB/smol-smoltalk", f"data/train-{i:05d}-of-00004.parquet", f"train-{i:05d}.parquet")
                 for i in range(4)] +
                [("HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet", "test.parquet")],
    "gsm8k": [("openai/gsm8k", f"main/{s}-00000-of-00001.parquet", f"{s}.parquet") for s in ("train", "test")],
    "arc": [("allenai/ai2_arc", f"{c}/{s}-00000-of-00001.parquet", f"{c}/{s}.parquet")
            for c in ("ARC-Easy", "ARC-Challenge") for s in ("train", "validation", "test")],
    "mmlu": [("cais/mmlu", f"all/{s}-00000-of-00001.parquet", f"all/{s}.parquet")
             for s in ("dev", "validation", "test", "auxiliary_train")],
    "humaneval": [("openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet", "test.parquet")],
}
WHAT_SETS = {"sft": ["smoltalk"], "eval": ["gsm8k", "arc", "mmlu", "humaneval", "eval_bundle", "words"]}
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# pinned to a commit so the checksum holds
WORDS_URL = ("https://raw.githubusercontent.com/dwyl/english-words/20f5cc9b3f0ccc8ce45d814c532b7c2031bba31c/"
             "words_alpha.txt")
WORDS_SHA256 = "2d8cf2326673fa0c179bdc3a58053872d16bff5352331580955ae62101f6a34d"
OFFLINE_HINT = ("use `picochat data import PATH` for text you have, or `picochat data demo` for the offline "
                "demo curriculum")


# ---- paths --------------------------------------------------------------------------------------------------
def data_dir(demo=False) -> Path:
    return home_dir() / "data" / ("demo" if demo else "")


def pretrain_dir(demo=False) -> Path:
    return data_dir(demo) / "pretrain"


def sft_dir(demo=False) -> Path:
    return data_dir(demo) / "sft"


def eval_dir(demo=False) -> Path:
    return data_dir(demo) / "eval"


def shard_files(folder):
    """(train shards, [validation shard]) of a shard folder, sorted by name; the last one is validation."""
    files = sorted(Path(folder).glob("*.parquet"))
    if len(files) < 2:
        raise UserError(f"{folder} has {len(files)} parquet shard(s), need at least 2 (the last is validation): "
                        f"run `picochat data demo`, `picochat data import PATH` or `picochat data download`")
    return files[:-1], files[-1:]


# ---- pretraining shards: writing and reading ----------------------------------------------------------------
def write_shard(path, texts):
    """One shard: a `text` column in row groups of 1,024 documents, zstd. Atomic, and byte-identical for the
    same texts (no timestamps in parquet metadata)."""
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    atomic_save(path, lambda tmp: pq.write_table(table, tmp, row_group_size=ROW_GROUP_DOCS, compression="zstd",
                                                 use_dictionary=False, write_statistics=False))


def val_count(n_docs):
    """Documents held out for validation by default: 1%, but at least one whole row group (1,024) once there
    are 5,120 documents; below that a tenth (at least one), so even a tiny corpus yields a train shard and a
    validation shard."""
    if n_docs < 2:
        raise UserError(f"only {n_docs} document(s): need at least 2 (one to train on, one to validate)")
    if n_docs >= 5 * ROW_GROUP_DOCS:
        return max(ROW_GROUP_DOCS, n_docs // 100)
    return max(1, n_docs // 10)


def write_shards(docs, folder, shard_chars=SHARD_CHARS, val_docs=None):
    """docs (already shuffled) -> folder/shard_00000.parquet ... ; the first val_docs documents become the last
    shard (validation). Returns the paths written."""
    n = len(docs)
    if val_docs is None:
        v = val_count(n)
    elif 0 < val_docs < 1:
        v = max(1, round(val_docs * n))
    else:
        v = int(val_docs)
    if not 1 <= v < n:
        raise UserError(f"cannot hold out {v} of {n} documents for validation: pick --val-docs between 1 and {n - 1}")
    val, train = docs[:v], docs[v:]
    groups, cur, chars = [], [], 0
    for d in train:
        cur.append(d)
        chars += len(d)
        if chars >= shard_chars:
            groups.append(cur)
            cur, chars = [], 0
    if cur:
        groups.append(cur)
    groups.append(val)
    folder = Path(folder)
    paths = [folder / f"shard_{i:05d}.parquet" for i in range(len(groups))]
    for p, g in zip(paths, groups):
        write_shard(p, g)
    return paths


def iter_row_groups(path):
    """Yield the texts of a pretraining shard one row group (<= 1,024 documents) at a time."""
    pf = _open_parquet(path, column="text")
    for i in range(pf.num_row_groups):
        yield pf.read_row_group(i, columns=["text"]).column("text").to_pylist()


def iter_texts(paths):
    """Every document of the given shards, in order."""
    for p in paths:
        for group in iter_row_groups(p):
            yield from group


def check_parquet(path):
    """None if path is a whole parquet file (PAR1 magic at both ends, readable footer), else what is wrong."""
    path = Path(path)
    size = path.stat().st_size
    if size < 12:
        return f"only {size} bytes"
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-4, os.SEEK_END)
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        return "no PAR1 magic at both ends (truncated, or not parquet)"
    try:
        pq.read_metadata(path)
    except Exception as e:
        return f"unreadable parquet footer ({e.__class__.__name__}: {e})"
    return None


def _open_parquet(path, column=None):
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable parquet file ({e.__class__.__name__}: {e}); "
                        f"delete it and download or import it again") from None
    if column and column not in pf.schema_arrow.names:
        raise UserError(f"{path}: no '{column}' column (it has: {', '.join(pf.schema_arrow.names)}); "
                        f"rename the column holding the documents to '{column}'")
    return pf


# ---- generic readers ----------------------------------------------------------------------------------------
def _read_bytes(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise UserError(f"{path}: not a valid gzip file ({e}); fetch it again") from None
    return data


def _line_of(data, offset):
    return data.count(b"\n", 0, offset) + 1


def _read_text(path):
    """A UTF-8 text file (optionally .gz), with the line of the first bad byte in the error."""
    data = _read_bytes(path)
    nul = data.find(b"\x00")
    if nul >= 0:
        raise UserError(f"{path} line {_line_of(data, nul)}: binary data (a NUL byte), not text; "
                        f"pass .txt, .jsonl or .parquet files")
    try:
        return data.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} line {_line_of(data, e.start)}: not UTF-8 text (byte {e.start}); "
                        f"convert the file to UTF-8 or leave it out") from None


def iter_jsonl(path):
    """(line number, object) for every non-blank line of a .jsonl or .jsonl.gz file."""
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                            f"fix or delete that line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def read_jsonl(path):
    return [obj for _, obj in iter_jsonl(path)]


def read_records(path):
    """Rows of a .jsonl / .jsonl.gz / .parquet file as a list of dicts (HF sets come as parquet, ours as jsonl)."""
    name = Path(path).name
    if name.endswith(".parquet"):
        return _open_parquet(path).read().to_pylist()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl(path)
    raise UserError(f"{path}: unknown format (expected .jsonl, .jsonl.gz or .parquet)")


# ---- readers of the real sources ----------------------------------------------------------------------------
ROLE_MAP = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
            "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}


def to_messages(turns):
    """ShareGPT-ish turns ({role|from, content|value}) -> our messages, or (None, reason) if it cannot be fixed.
    Fixes what is safe: renames roles, drops empty turns, merges consecutive turns of one role, drops a leading
    assistant turn and a trailing user turn (nothing to learn from them). Returns (messages, reason)."""
    if not isinstance(turns, list):
        return None, "no list of turns"
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            return None, "turn is not an object"
        role = ROLE_MAP.get(str(t.get("role", t.get("from", ""))).lower())
        text = t.get("content", t.get("value"))
        if role is None:
            return None, "unknown role"
        if not isinstance(text, str):
            return None, "content is not a string"
        if not text.strip():
            continue
        if role == "system":
            if out:
                return None, "system turn in the middle"
            out.append({"role": "system", "content": text})
        elif out and out[-1]["role"] == role:
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + text}
        else:
            out.append({"role": role, "content": text})
    first = 1 if out and out[0]["role"] == "system" else 0
    while len(out) > first and out[first]["role"] == "assistant":
        del out[first]
    if out and out[-1]["role"] != "assistant":
        out.pop()
    if len(out) - first < 2:
        return None, "no user/assistant exchange"
    return out, None


def read_conversations(path):
    """Chat data -> ([{"messages": [...]}], skipped): our own format, ShareGPT ({"conversations": [{"from",
    "value"}]}), or preference pairs ({"chosen": [...]}, the chosen side). skipped counts the rows left out,
    by reason. Works on .jsonl, .jsonl.gz and .parquet (a `messages` column, e.g. SmolTalk)."""
    convs, skipped = [], {}
    for row in read_records(path):
        turns = row.get("messages", row.get("conversations", row.get("chosen")))
        msgs, why = to_messages(turns)
        if msgs is None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        conv = {"messages": msgs}
        if "id" in row:
            conv["id"] = row["id"]
        convs.append(conv)
    return convs, skipped


def read_smoltalk(path):
    """SmolTalk parquet (a `messages` column of [{role, content}]) -> ([{"messages"}], skipped)."""
    return read_conversations(path)


_ANSWER_RE = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def extract_answer(text):
    """The final answer of a GSM8K-style solution: the number after '####', commas removed; None if absent."""
    m = _ANSWER_RE.search(text or "")
    if m is None:
        return None
    ans = m.group(1).replace(",", "")
    if "." in ans:
        ans = ans.rstrip("0").rstrip(".") or "0"
    return ans


def read_gsm8k(path):
    """GSM8K rows {"question", "answer"} (answer = worked solution with <<expr=result>> and '#### N')."""
    rows = read_records(path)
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("question"), str) or extract_answer(r.get("answer")) is None:
            raise UserError(f"{path} row {i}: expected a 'question' and an 'answer' ending in '#### <number>'")
    return rows


def _mc(path, i, question, choices, labels, answer, **extra):
    if not (isinstance(question, str) and isinstance(choices, list) and len(choices) >= 2 and
            len(labels) == len(choices) and isinstance(answer, int) and 0 <= answer < len(choices)):
        raise UserError(f"{path} row {i}: not a multiple-choice question with a valid answer")
    return {"question": question, "choices": choices, "labels": labels, "answer": answer, **extra}


def read_arc(path):
    """ARC (HF ai2_arc schema) -> [{"id", "question", "choices": [str], "labels": [str], "answer": index}].
    Labels stay as published (mostly A-D, sometimes 1-4; 3 or 5 choices happen)."""
    out = []
    for i, r in enumerate(read_records(path), 1):
        ch = r.get("choices") or {}
        labels = list(ch.get("label") or [])
        answer = labels.index(r.get("answerKey")) if r.get("answerKey") in labels else -1
        out.append(_mc(path, i, r.get("question"), list(ch.get("text") or []), labels, answer, id=r.get("id")))
    return out


def read_mmlu(path):
    """MMLU (HF cais/mmlu schema) -> [{"question", "subject", "choices", "labels": [A-D], "answer": index}]."""
    out = []
    for i, r in enumerate(read_records(path), 1):
        if isinstance(r.get("train"), dict):  # the auxiliary_train config nests each row under "train"
            r = r["train"]
        choices = list(r.get("choices") or [])
        out.append(_mc(path, i, r.get("question"), choices, list("ABCDEFGHIJ"[:len(choices)]), r.get("answer"),
                       subject=r.get("subject", "")))
    return out


def read_humaneval(path):
    """HumanEval rows {"task_id", "prompt", "canonical_solution", "test", "entry_point"}."""
    rows = read_records(path)
    for i, r in enumerate(rows, 1):
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(r.get(k), str)]
        if missing:
            raise UserError(f"{path} row {i}: missing {', '.join(missing)}")
    return rows


def read_core_bundle(folder):
    """The CORE eval bundle -> one dict per task of core.yaml: label, type (multiple_choice | schema |
    language_modeling), num_fewshot, continuation_delimiter (default ' '), has_categories, path of its jsonl,
    missing (True if that file is absent: score over the rest and say so) and random_baseline (a fraction:
    eval_meta_data.csv gives percent)."""
    import csv
    import yaml
    folder = Path(folder)
    if not (folder / "core.yaml").is_file():
        raise UserError(f"{folder}: no core.yaml: not a CORE eval bundle (run `picochat data download --what eval`)")
    try:
        tasks = yaml.safe_load((folder / "core.yaml").read_text())["icl_tasks"]
    except Exception as e:
        raise UserError(f"{folder / 'core.yaml'}: not the expected YAML with an icl_tasks list ({e})") from None
    baselines = {}
    with open(folder / "eval_meta_data.csv", newline="") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"]) / 100
    out = []
    for t in tasks:
        shots = t.get("num_fewshot", [0])
        path = folder / "eval_data" / t["dataset_uri"]
        out.append({"label": t["label"], "type": t["icl_task_type"],
                    "num_fewshot": int(shots[0] if isinstance(shots, list) else shots),
                    "continuation_delimiter": t.get("continuation_delimiter", " "),
                    "has_categories": bool(t.get("has_categories", False)),
                    "path": path, "missing": not path.is_file(),
                    "random_baseline": baselines.get(t["label"], 0.0)})
    return out


def read_core_task(path):
    """Rows of one CORE task file (query/choices/gold, context_options/continuation/gold, or
    context/continuation)."""
    return read_jsonl(path)


def read_words(path):
    """A word list, one word per line (.txt or .txt.gz; Windows line endings are fine)."""
    return [w for w in _read_text(path).split() if w]


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
        return split_text(_read_text(path))
    if path.name.endswith(JSONL_SUFFIXES):
        docs = []
        for n, obj in iter_jsonl(path):
            if not isinstance(obj.get("text"), str):
                raise UserError(f"{path} line {n}: no 'text' string field (keys: {', '.join(obj) or 'none'})")
            if obj["text"].strip():
                docs.append(obj["text"])
        return docs
    pf = _open_parquet(path, column="text")
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


def temp_dir_beside(out):
    """A temp folder next to out (same filesystem, so the final move is a rename), with normal permissions."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
    return tmp


def _prepare_out(out, force):
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} already has files: pass --force to replace them, or --out DIR for another folder")
    return temp_dir_beside(out)


def _install(tmp, out):
    """Swap the finished temp folder into place: readers see the old folder or the new one, never a mix."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def import_text(paths, out=None, shard_chars=SHARD_CHARS, val_docs=None, seed=42, force=False):
    """Your own text -> standard pretraining shards in out (default data/pretrain). Documents from all files are
    pooled, shuffled with a fixed seed, and the first val_docs (count, or fraction if < 1; default val_count)
    become the validation shard. Everything is written to a temp folder and moved into place at the end.
    Holds the documents in memory: fine for a few GB of text."""
    files = _input_files(paths, TEXT_SUFFIXES + JSONL_SUFFIXES + (".parquet",))
    out = Path(out) if out else pretrain_dir()
    tmp = _prepare_out(out, force)
    try:
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
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / p.name for p in shards]


def import_chat(paths, out=None, force=False):
    """jsonl conversations -> out (default data/sft)/<name>.jsonl, validated like the tokenizer renders them.
    Lines in our format must be valid (else UserError naming the line); ShareGPT lines ({"conversations"})
    are converted, and the ones that cannot be are skipped and counted. Returns {written path: (kept, skipped)}."""
    from picochat.tokenizer import normalize_messages
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
                try:
                    normalize_messages(obj)
                except UserError as e:
                    raise UserError(f"{f} line {n}: {e}") from None
                msgs = obj["messages"]
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


# ---- download -----------------------------------------------------------------------------------------------
class _Retry(Exception):
    """A failure worth trying again (5xx, short body, bad checksum)."""


def hf_url(repo, filename, endpoint=None):
    endpoint = (endpoint or os.environ.get("PICOCHAT_HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
    return f"{endpoint}/datasets/{repo}/resolve/main/{filename}"


def offline_error(url):
    return UserError(f"cannot reach {urlsplit(url).netloc} (no network?): {OFFLINE_HINT}")


def check_reachable(url, timeout=10):
    """Fail fast, in one line, when a host cannot be reached at all (rather than after minutes of retries)."""
    import requests
    try:
        requests.head(url, timeout=timeout, allow_redirects=False)
    except (requests.ConnectionError, requests.Timeout):
        raise offline_error(url) from None


class Progress:
    """One byte-counting progress bar shared by all download threads (bytes/s and ETA)."""

    def __init__(self, desc="download", disable=None):
        from tqdm import tqdm
        self.bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=disable,
                        dynamic_ncols=True)
        self.lock = threading.Lock()

    def add_total(self, n):
        with self.lock:
            self.bar.total += n
            self.bar.refresh()

    def update(self, n):
        with self.lock:
            self.bar.update(n)

    def close(self):
        self.bar.close()


def _verify(path, sha256, kind):
    """None if the downloaded file is whole, else what is wrong."""
    if sha256 is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != sha256:
            return f"sha256 mismatch (got {h.hexdigest()[:12]}..., expected {sha256[:12]}...)"
    if kind == "parquet":
        return check_parquet(path)
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()  # reads every member and checks its CRC
        except zipfile.BadZipFile as e:
            return f"not a zip file ({e})"
        return f"member {bad} fails its CRC" if bad else None
    return None


def _expected_sha256(resp):
    """The hub serves large files with the sha256 of their content as X-Linked-Etag (on the redirect)."""
    for r in list(resp.history) + [resp]:
        tag = r.headers.get("X-Linked-Etag", "").strip('"').removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            return tag
    return None


def download_file(url, dest, sha256=None, kind=None, session=None, progress=None, retries=6, backoff=1.0,
                  timeout=(10, 60), stop=None, chunk_size=1 << 20):
    """Fetch url to dest, resumably and verified. Bytes go to dest.partial (continued with an HTTP Range request
    after a dropped connection); once the size matches Content-Length and the content checks out (sha256 given
    or served by the hub, else the parquet footer / zip CRCs for kind='parquet'/'zip'), it is renamed to dest.
    A corrupt result is deleted and fetched again. Connection errors, 5xx and 429 are retried with exponential
    backoff (backoff * 2^k seconds)."""
    import requests
    import urllib3
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")  # not *.parquet: never mistaken for a shard
    session = session or requests.Session()
    attempt, connected, shown, total_known = 0, False, 0, False
    while True:
        try:
            have = partial.stat().st_size if partial.exists() else 0
            headers = {"Accept-Encoding": "identity"}  # the bytes on disk must be the bytes Content-Length counts
            if have:
                headers["Range"] = f"bytes={have}-"
            with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
                connected = True
                total, digest_checked = None, False
                if r.status_code == 416 and have:  # asked for bytes past the end: we may hold them all already
                    m = re.search(r"/(\d+)$", r.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != have:
                        partial.unlink()
                        raise _Retry(f"a {have}-byte partial file that does not match the file on the server")
                else:
                    if r.status_code == 404:
                        raise UserError(f"{url} not found (404): check the name, or {OFFLINE_HINT}")
                    if r.status_code >= 500 or r.status_code == 429:
                        raise _Retry(f"HTTP {r.status_code} {r.reason}")
                    if r.status_code >= 400:
                        raise UserError(f"{url}: HTTP {r.status_code} {r.reason}")
                    if r.status_code == 206:
                        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", ""))
                        if not m or int(m.group(1)) != have:
                            partial.unlink()
                            raise _Retry(f"bad resume (Content-Range {r.headers.get('Content-Range')!r})")
                        total = int(m.group(2)) if m.group(2) != "*" else None
                        mode = "ab"
                    else:  # 200: the whole file (the server ignored Range, or we start afresh)
                        total = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
                        mode, have = "wb", 0
                    if progress is not None:
                        if total is not None and not total_known:
                            progress.add_total(total)
                            total_known = True
                        progress.update(have - shown)
                        shown = have
                    sha256 = sha256 or _expected_sha256(r)
                    hasher = None
                    if sha256 is not None:  # hash while streaming rather than reading the file back
                        hasher = hashlib.sha256()
                        if mode == "ab":
                            with open(partial, "rb") as f:
                                for block in iter(lambda: f.read(1 << 20), b""):
                                    hasher.update(block)
                    with open(partial, mode) as f:
                        for block in r.raw.stream(chunk_size, decode_content=False):
                            if stop is not None and stop.is_set():
                                raise KeyboardInterrupt
                            f.write(block)
                            if hasher is not None:
                                hasher.update(block)
                            if progress is not None:
                                progress.update(len(block))
                                shown += len(block)
                        f.flush()
                        os.fsync(f.fileno())
                    size = partial.stat().st_size
                    if total is not None and size != total:
                        raise _Retry(f"got {size} of {total} bytes")
                    if hasher is not None and hasher.hexdigest() != sha256:
                        partial.unlink()
                        raise _Retry(f"corrupt download: sha256 mismatch (got {hasher.hexdigest()[:12]}..., "
                                     f"expected {sha256[:12]}...)")
                    digest_checked = hasher is not None
            problem = _verify(partial, None if digest_checked else sha256, kind)
            if problem:
                partial.unlink()
                raise _Retry(f"corrupt download: {problem}")
            os.replace(partial, dest)
            return dest
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.HTTPError, _Retry) as e:
            attempt += 1
            if attempt > retries:
                if not connected:
                    raise offline_error(url) from None
                raise UserError(f"could not download {url} after {retries} retries ({e}); run the same "
                                f"command again to resume") from None
            time.sleep(backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))


def download_all(jobs, workers=8, desc="download", **kw):
    """jobs: [(url, dest, sha256 or None, kind or None)]. Files already in place (and whole, for parquet) are
    skipped; the rest are fetched by a thread pool with one shared progress bar. Returns the paths."""
    import requests
    todo = []
    for url, dest, sha, kind in jobs:
        dest = Path(dest)
        if dest.exists() and (kind != "parquet" or check_parquet(dest) is None):
            continue
        if dest.exists():  # a corrupt file under the final name (e.g. copied in by hand): fetch it again
            dest.unlink()
        todo.append((url, dest, sha, kind))
    if not todo:
        return [Path(j[1]) for j in jobs]
    for host_url in {urlsplit(u).netloc: u for u, *_ in todo}.values():
        check_reachable(host_url)
    local = threading.local()
    stop = threading.Event()
    progress = Progress(f"{desc} ({len(todo)} files)")

    def one(job):
        if not hasattr(local, "session"):
            local.session = requests.Session()  # a Session per thread: they are not thread-safe
        url, dest, sha, kind = job
        return download_file(url, dest, sha, kind, session=local.session, progress=progress, stop=stop, **kw)

    pool = ThreadPoolExecutor(max(1, workers))
    try:
        for fut in as_completed([pool.submit(one, j) for j in todo]):
            fut.result()
    except BaseException:
        stop.set()  # let the other threads stop at their next block; their .partial files resume next time
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    return [Path(j[1]) for j in jobs]


def download_pretrain(n, source="climbmix", endpoint=None, workers=8, out=None, **kw):
    """The first n training shards of a published dataset plus its last shard (validation; its name sorts last)."""
    if source not in PRETRAIN_SOURCES:
        raise UserError(f"unknown --source {source!r}: pick one of {', '.join(PRETRAIN_SOURCES)}")
    repo, total = PRETRAIN_SOURCES[source]
    out = Path(out) if out else pretrain_dir()
    marker = out / "source.json"
    if marker.exists() and json.loads(marker.read_text()).get("source") != source:
        raise UserError(f"{out} holds shards from {json.loads(marker.read_text()).get('source')}, not {source}: "
                        f"move them away or pass --out DIR")
    if not marker.exists() and list(out.glob("*.parquet")):
        raise UserError(f"{out} already holds shards of unknown origin: move them away or pass --out DIR")
    ids = list(range(min(n, total - 1))) + [total - 1]
    jobs = [(hf_url(repo, f"shard_{i:05d}.parquet", endpoint), out / f"shard_{i:05d}.parquet", None, "parquet")
            for i in ids]
    check_reachable(jobs[0][0])  # offline: say so before touching the folder
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"source": source, "repo": repo})
    return download_all(jobs, workers, desc=f"{source} shards", **kw)


def download_sets(names, endpoint=None, workers=8, out=None, **kw):
    """Chat and eval sets into out (default data/eval)/<name>/, as published (parquet), plus the CORE bundle
    (unzipped) and the word list."""
    out = Path(out) if out else eval_dir()
    jobs = [(hf_url(repo, fn, endpoint), out / name / local, None, "parquet")
            for name in names if name in HF_SETS for repo, fn, local in HF_SETS[name]]
    if "words" in names:
        jobs.append((WORDS_URL, out / "words" / "words_alpha.txt", WORDS_SHA256, None))
    bundle = out / "eval_bundle"
    if "eval_bundle" in names and not (bundle / "core.yaml").exists():
        jobs.append((EVAL_BUNDLE_URL, out / "eval_bundle.zip", None, "zip"))
    download_all(jobs, workers, desc="chat and eval sets", **kw)
    if "eval_bundle" in names and not (bundle / "core.yaml").exists():
        _unzip_bundle(out / "eval_bundle.zip", bundle)
    return out


def _unzip_bundle(zip_path, dest):
    tmp = temp_dir_beside(dest)
    try:
        with zipfile.ZipFile(zip_path) as z:
            for name in z.namelist():  # refuse paths that would land outside the folder
                if name.startswith("/") or ".." in Path(name).parts:
                    raise UserError(f"{zip_path}: unsafe path {name!r} in the archive")
            z.extractall(tmp)
        root = tmp
        while not (root / "core.yaml").exists():  # the zip has the files inside an eval_bundle/ folder
            subs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith("__")]
            if len(subs) != 1:
                raise UserError(f"{zip_path}: no core.yaml inside: not the CORE eval bundle")
            root = subs[0]
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(root, dest)
        zip_path.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    paths = import_text(args.paths, args.out or None, args.shard_chars, val, args.seed, args.force)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"{len(paths)} shards ({mb:.1f} MB) in {paths[0].parent} in {time.time() - t0:.1f}s; "
          f"{paths[-1].name} is the validation shard")
    return 0
