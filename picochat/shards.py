"""The data folder's layout and the file formats every stage reads: pretraining shards (write and read),
jsonl and parquet records.

Layout under $PICOCHAT_HOME/data (the demo curriculum mirrors it under data/demo/):
    pretrain/shard_00000.parquet ...  one `text` column, row groups of 1,024 documents, zstd;
                                      the last shard (by name) is the validation shard
    sft/*.jsonl                       conversations, one {"messages": [{"role", "content"}, ...]} per line
    eval/<name>/...                   chat and eval sets as published: smoltalk, gsm8k, arc, mmlu, humaneval,
                                      eval_bundle (CORE), words
"""
import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from picochat.common import UserError, atomic_save, home_dir

ROW_GROUP_DOCS = 1024          # documents per parquet row group: the unit the loader shards across ranks
SHARD_CHARS = 250_000_000      # characters per shard, as in the published shards


# ---- paths --------------------------------------------------------------------------------------------------
def data_dir(demo=False) -> Path:
    return home_dir() / "data" / ("demo" if demo else "")


def pretrain_dir(demo=False) -> Path:
    return data_dir(demo) / "pretrain"


def sft_dir(demo=False) -> Path:
    return data_dir(demo) / "sft"


def eval_dir(demo=False) -> Path:
    return data_dir(demo) / "eval"


def list_shards(folder):
    """Sorted parquet shards in folder; the last one is the validation shard."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist: run `picochat data demo`, `picochat data import PATH` "
                        f"or `picochat data download` first")
    files = sorted(folder.glob("*.parquet"))
    if len(files) < 2:
        raise UserError(f"data folder {folder} has {len(files)} parquet shard(s); pretraining needs at least 2 "
                        f"(the last one is held out for validation): run `picochat data demo`, "
                        f"`picochat data import PATH` or `picochat data download`")
    return files


def split_shards(folder):
    """(train shards, [validation shard]) of a shard folder, sorted by name."""
    files = list_shards(folder)
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
    pf = open_parquet(path, column="text")
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


def open_parquet(path, column=None):
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


def read_text(path):
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
    for n, line in enumerate(read_text(path).split("\n"), 1):
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
        return open_parquet(path).read().to_pylist()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl(path)
    raise UserError(f"{path}: unknown format (expected .jsonl, .jsonl.gz or .parquet)")
