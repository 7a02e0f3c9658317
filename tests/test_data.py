"""picochat.data: `picochat data import` of text and conversations."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat import data, shards
from picochat.cli import main
from picochat.common import UserError


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PICOCHAT_HF_ENDPOINT", raising=False)
    return tmp_path / "home"


# ---- import ---------------------------------------------------------------------------------------------------


def assert_shard_format(paths):
    for p in paths:
        pf = pq.ParquetFile(p)
        assert pf.schema_arrow.names == ["text"]
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        assert all(s == 1024 for s in sizes[:-1]) and 0 < sizes[-1] <= 1024
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"


def loader_batch(paths):
    """Pull a batch through the real PretrainLoader when it exists."""
    loader = pytest.importorskip("picochat.loader")
    from picochat.tokenizer import Tokenizer
    tok = Tokenizer.train(shards.iter_texts(paths[:1]), 300, max_chars=200_000)
    x, y = loader.PretrainLoader(paths[:-1], tok, batch_size=2, seq_len=64).next_batch()
    assert x.shape == (2, 64) and (x[:, 0] == tok.bos_id).all()


def test_import_webtext_parquet(home, shared_data):
    src = shared_data / "webtext" / "webtext_shared.parquet"
    assert main(["data", "import", str(src), "--shard-chars", "6000000"]) == 0
    out = home / "data" / "pretrain"
    paths = sorted(out.glob("*.parquet"))
    assert len(paths) >= 3
    assert_shard_format(paths)
    texts = list(shards.iter_texts(paths))
    assert sorted(texts) == sorted(pq.read_table(src, columns=["text"]).column("text").to_pylist())
    assert pq.read_metadata(paths[-1]).num_rows == 1024  # one row group's worth held out
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    loader_batch(paths)


def test_import_tinyshakespeare(tmp_path, shared_data):
    src = shared_data / "tinyshakespeare" / "input.txt"
    paths = data.import_text([src], out=tmp_path / "shards")
    assert len(paths) >= 2
    assert_shard_format(paths)
    texts = list(shards.iter_texts(paths))
    assert 50 < len(texts) < 500 and max(map(len, texts)) < 12_000
    assert sorted(" ".join(texts).split()) == sorted(src.read_text().split())  # every word kept, once
    # deterministic: same input and seed -> same bytes
    again = data.import_text([src], out=tmp_path / "again")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    loader_batch(paths)


def test_split_text_rules():
    assert data.split_text("doc one\npara\n\n\n\ndoc two\n\n\ndoc three") == ["doc one\npara", "doc two", "doc three"]
    long = "\n\n".join(f"paragraph {i} " + "x" * 990 for i in range(30))
    chunks = data.split_text(long)
    assert len(chunks) == 4 and all(c.startswith("paragraph") and len(c) <= 10_000 for c in chunks)
    assert "\n\n".join(chunks) == long


def test_import_jsonl_and_txt_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}", "id": i}) + "\n" for i in range(30)))
    (src / "b.txt").write_text("first\n\n\nsecond\n\n\nthird")
    with gzip.open(src / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    paths = data.import_text([src], out=tmp_path / "out", val_docs=0.1)
    texts = list(shards.iter_texts(paths))
    assert sorted(texts) == sorted([f"doc {i}" for i in range(30)] + ["first", "second", "third", "zipped"])
    assert pq.read_metadata(paths[-1]).num_rows == 3


@pytest.mark.parametrize("name,content,match", [
    ("junk.txt", b"hello\nworld\n\x00\x01\x02binary", r"junk\.txt line 3: binary data"),
    ("latin.txt", b"ok\ncaf\xe9\n", r"latin\.txt line 2: not UTF-8"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', r"bad\.jsonl line 3: not valid JSON"),
    ("notext.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"notext\.jsonl line 2: no 'text' string field"),
    ("fake.parquet", b"PAR1 this is not parquet PAR1", r"fake\.parquet: not a readable parquet file"),
])
def test_import_malformed_names_file_and_line(tmp_path, name, content, match, capsys):
    good = tmp_path / "good.txt"
    good.write_text("one\n\n\ntwo\n\n\nthree")
    bad = tmp_path / name
    bad.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        data.import_text([good, bad], out=out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert main(["data", "import", str(good), str(bad), "--out", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_import_parquet_without_text_column(tmp_path):
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), p)
    with pytest.raises(UserError, match=r"x\.parquet: no 'text' column \(it has: body\)"):
        data.import_text([p], out=tmp_path / "out")


def test_import_keeps_existing_output_unless_forced(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("one\n\n\ntwo\n\n\nthree")
    out = tmp_path / "out"
    first = data.import_text([src], out=out)
    before = {p.name: p.read_bytes() for p in first}
    src.write_text("four\n\n\nfive\n\n\nsix")
    with pytest.raises(UserError, match="--force"):
        data.import_text([src], out=out)
    assert {p.name: p.read_bytes() for p in first} == before
    data.import_text([src], out=out, force=True)
    assert sorted(shards.iter_texts(sorted(out.glob("*.parquet")))) == ["five", "four", "six"]


def test_import_tiny_input_errors(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("just one short document")
    with pytest.raises(UserError, match="at least 2"):
        data.import_text([src], out=tmp_path / "out")
    with pytest.raises(UserError, match="no such file"):
        data.import_text([tmp_path / "missing.txt"], out=tmp_path / "out")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(UserError, match="unsupported file type"):
        data.import_text([tmp_path / "a.csv"], out=tmp_path / "out")


def test_import_chat(tmp_path, home):
    good = tmp_path / "mychat.jsonl"
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]},
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            {"conversations": [{"from": "gpt", "value": "only the assistant"}]}]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "import", "--chat", str(good)]) == 0
    out = home / "data" / "sft" / "mychat.jsonl"
    got = shards.read_jsonl(out)
    assert got == [{"messages": rows[0]["messages"]},
                   {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    bad = tmp_path / "bad.jsonl"
    stray = {"messages": [{"role": "assistant", "content": "x"}]}
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps(stray) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl line 2: message 0: role 'assistant' out of order"):
        data.import_chat([bad])
    assert not (home / "data" / "sft" / "bad.jsonl").exists()
    # checked as SFT reads data/sft/: a conversation must end with the assistant's reply
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": rows[0]["messages"][:2]}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl line 2: the last message is the user's"):
        data.import_chat([bad])
    assert not (home / "data" / "sft" / "bad.jsonl").exists()
