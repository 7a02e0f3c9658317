import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from picochat.common import UserError
from picochat.loader import PretrainLoader
from picochat.shards import list_shards, split_shards
from picochat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(webtext_tokenizer):
    return Tokenizer.load(webtext_tokenizer)


def write_shards(folder, docs, per_group=8, n_shards=2):
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = (len(docs) + n_shards - 1) // n_shards
    for s in range(n_shards):
        pq.write_table(pa.table({"text": docs[s * per_shard:(s + 1) * per_shard]}), folder / f"shard_{s:05d}.parquet",
                       row_group_size=per_group)
    return folder


def test_rows_start_with_bos_and_are_documents(tmp_path, tok):
    docs = [f"document number {i} " + "word " * (i % 37) for i in range(200)]
    train, _ = split_shards(write_shards(tmp_path / "d", docs))
    loader = PretrainLoader(train, tok, 4, 32, buffer_docs=20)
    encoded = {tuple(ids) for ids in tok.encode(docs, prepend_bos=True)}
    for _ in range(10):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 32)
        assert (x[:, 0] == tok.bos_id).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], 1).tolist():
            # split at BOS: every piece is a whole document, except possibly the last (cropped to fill)
            starts = [i for i, t in enumerate(row) if t == tok.bos_id] + [len(row)]
            pieces = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
            assert all(p in encoded for p in pieces[:-1])
            assert any(e[:len(pieces[-1])] == pieces[-1] for e in encoded)


def test_state_resume_is_exact(tmp_path, tok):
    docs = [("lorem ipsum " * (i % 50)) + str(i) for i in range(300)]
    train, _ = split_shards(write_shards(tmp_path / "d", docs))
    a = PretrainLoader(train, tok, 2, 40, buffer_docs=30)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(150)]  # crosses an epoch boundary
    b = PretrainLoader(train, tok, 2, 40, buffer_docs=30)
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next_batch()[0]) for e in expected)
    assert a.epoch >= 1


def test_ranks_read_disjoint_row_groups(tmp_path, tok):
    docs = [f"doc {i}" for i in range(64)]
    train, _ = split_shards(write_shards(tmp_path / "d", docs, per_group=4))
    r0 = PretrainLoader(train, tok, 1, 8, rank=0, world=2)
    r1 = PretrainLoader(train, tok, 1, 8, rank=1, world=2)
    assert set(r0.groups).isdisjoint(r1.groups) and len(r0.groups) + len(r1.groups) == 8


def test_bad_data_folders(tmp_path, tok):
    with pytest.raises(UserError, match="does not exist"):
        list_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="at least 2"):
        list_shards(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"content": ["x"]}), bad / f"s{i}.parquet")
    with pytest.raises(UserError, match="no 'text' column"):
        PretrainLoader(split_shards(bad)[0], tok, 1, 8)
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(2):
        (junk / f"s{i}.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="not a readable parquet"):
        PretrainLoader(split_shards(junk)[0], tok, 1, 8)
