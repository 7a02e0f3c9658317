"""picochat.shards: reading pretraining shards, and spotting broken ones."""
import io
import random

import pyarrow as pa
import pyarrow.parquet as pq

from picochat import shards


def parquet_bytes(n_docs=3000, seed=0):
    """A real shard-format parquet file of random (incompressible) text, a few MB."""
    rng = random.Random(seed)
    texts = ["".join(rng.choice("abcdefghij klmnopqrstuvwxyz") for _ in range(rng.randint(200, 1200)))
             for _ in range(n_docs)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=1024, compression="zstd")
    return buf.getvalue()


def check_shard_readers(folder, group_rows, val_rows):
    train, val = shards.split_shards(folder)
    groups = list(shards.iter_row_groups(train[0]))
    assert len(groups) > 1 and all(len(g) == group_rows for g in groups[:-1]) and 0 < len(groups[-1]) <= group_rows
    assert sum(1 for _ in shards.iter_texts(val)) == val_rows
    assert shards.check_parquet(train[0]) is None


def test_pretrain_readers_on_webtext_shards(data_root):
    check_shard_readers(data_root / "webtext" / "shards", 32, 100)


def test_pretrain_readers_on_full_webtext_shards(shared_data):
    check_shard_readers(shared_data / "webtext" / "shards", 1024, 1024)
    assert len(list(shards.iter_row_groups(shards.split_shards(shared_data / "webtext" / "shards")[0][0]))) == 8


def test_check_parquet_catches_truncation(tmp_path):
    body = parquet_bytes(100)
    p = tmp_path / "t.parquet"
    p.write_bytes(body[:-100])
    assert "PAR1" in shards.check_parquet(p)
    p.write_bytes(body[:-8] + b"\x00\x00\x00\x00PAR1")
    assert "footer" in shards.check_parquet(p)
