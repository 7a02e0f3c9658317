"""picochat.data: downloads against a misbehaving local server, import, and the readers on real files."""
import gzip
import hashlib
import io
import json
import random
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat import data
from picochat.cli import main
from picochat.common import UserError

@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PICOCHAT_HF_ENDPOINT", raising=False)
    return tmp_path / "home"


# ---- a local hub that misbehaves on purpose -------------------------------------------------------------------
class Hub:
    """Serves files[path] with Range support. Per path, one-shot faults: 'drop' (send part of the body, then cut
    the connection), 'error' (HTTP 500), 'corrupt' (same length, wrong bytes); 'always-corrupt' never heals."""

    def __init__(self):
        self.files, self.headers, self.faults, self.log = {}, {}, {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self.send_response(200 if self.path in hub.files else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                rng = self.headers.get("Range")
                body = hub.files.get(self.path)
                pending = hub.faults.get(self.path) or [None]
                fault = pending[0]
                if fault not in (None, "always-corrupt"):
                    pending.pop(0)
                if body is None:
                    hub.log.append((self.path, rng, 404))
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "error":
                    hub.log.append((self.path, rng, 500))
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault in ("corrupt", "always-corrupt"):
                    body = bytes(b ^ 0x5A for b in body)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                status = 206 if rng else 200
                hub.log.append((self.path, rng, status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) - start))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                for k, v in hub.headers.get(self.path, {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if fault == "drop":
                    self.wfile.write(body[start:start + (len(body) - start) * 6 // 10])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def add(self, path, body, faults=(), headers=None):
        self.files[path] = body
        if faults:
            self.faults[path] = list(faults)
        if headers:
            self.headers[path] = headers
        return self.url + path


@pytest.fixture
def hub():
    h = Hub()
    yield h
    h.server.shutdown()
    h.server.server_close()


def parquet_bytes(n_docs=3000, seed=0):
    """A real shard-format parquet file of random (incompressible) text, a few MB."""
    rng = random.Random(seed)
    texts = ["".join(rng.choice("abcdefghij klmnopqrstuvwxyz") for _ in range(rng.randint(200, 1200)))
             for _ in range(n_docs)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=1024, compression="zstd")
    return buf.getvalue()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- download -----------------------------------------------------------------------------------------------
def test_dropped_connection_resumes_with_range(hub, tmp_path):
    body = parquet_bytes()
    assert len(body) > 1_000_000
    url = hub.add("/datasets/x/y/resolve/main/shard_00000.parquet", body, faults=["drop"])
    dest = tmp_path / "shard_00000.parquet"
    data.download_file(url, dest, kind="parquet", backoff=0, chunk_size=64 * 1024)
    assert dest.read_bytes() == body
    assert not (tmp_path / "shard_00000.parquet.partial").exists()
    (p1, r1, s1), (p2, r2, s2) = hub.log
    assert r1 is None and s1 == 200
    # the second request asks only for what is missing
    assert s2 == 206 and r2.startswith("bytes=") and int(r2[6:].rstrip("-")) > 0


def test_server_error_is_retried(hub, tmp_path):
    body = parquet_bytes(200)
    url = hub.add("/f.parquet", body, faults=["error", "error"])
    dest = tmp_path / "f.parquet"
    data.download_file(url, dest, kind="parquet", backoff=0)
    assert dest.read_bytes() == body
    assert [s for _, _, s in hub.log] == [500, 500, 200]


def test_corrupt_parquet_is_fetched_again(hub, tmp_path):
    body = parquet_bytes(200)
    url = hub.add("/f.parquet", body, faults=["corrupt"])
    dest = tmp_path / "f.parquet"
    data.download_file(url, dest, kind="parquet", backoff=0)
    assert dest.read_bytes() == body
    assert len(hub.log) == 2


def test_checksum_from_hub_header(hub, tmp_path):
    body = b'{"text": "hello"}\n' * 1000
    sha = hashlib.sha256(body).hexdigest()
    url = hub.add("/f.jsonl", body, faults=["corrupt"], headers={"X-Linked-Etag": f'"{sha}"'})
    dest = tmp_path / "f.jsonl"
    data.download_file(url, dest, backoff=0)  # no kind: only the served sha256 can catch the corruption
    assert dest.read_bytes() == body and len(hub.log) == 2


def test_corruption_that_never_heals_leaves_nothing(hub, tmp_path):
    url = hub.add("/f.parquet", parquet_bytes(100), faults=["always-corrupt"])
    dest = tmp_path / "f.parquet"
    with pytest.raises(UserError, match="after 2 retries"):
        data.download_file(url, dest, kind="parquet", backoff=0, retries=2)
    assert list(tmp_path.iterdir()) == []


def test_404_is_a_clear_error(hub, tmp_path):
    with pytest.raises(UserError, match="not found"):
        data.download_file(hub.url + "/nope.parquet", tmp_path / "x.parquet", backoff=0)


def test_no_server_names_the_host(tmp_path, capsys):
    port = free_port()
    with pytest.raises(UserError) as e:
        data.download_file(f"http://127.0.0.1:{port}/f.parquet", tmp_path / "f.parquet", backoff=0, retries=1)
    assert f"127.0.0.1:{port}" in str(e.value) and "picochat data demo" in str(e.value)
    # through the CLI: one line, exit code 2, and fast (no minutes of retries)
    rc = main(["data", "download", "-n", "1", "--what", "pretrain", "--endpoint", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"cannot reach 127.0.0.1:{port}" in err and "picochat data import PATH" in err
    assert not (tmp_path / "home" / "data").exists()  # nothing written


def test_download_pretrain_layout_and_rerun(hub, home, capsys):
    repo, total = data.PRETRAIN_SOURCES["climbmix"]
    bodies = {i: parquet_bytes(50, seed=i) for i in (0, 1, total - 1)}
    for i, b in bodies.items():
        hub.add(f"/datasets/{repo}/resolve/main/shard_{i:05d}.parquet", b)
    assert main(["data", "download", "-n", "2", "--what", "pretrain", "--endpoint", hub.url]) == 0
    shards = sorted((home / "data" / "pretrain").glob("*.parquet"))
    assert [p.name for p in shards] == ["shard_00000.parquet", "shard_00001.parquet", f"shard_{total - 1:05d}.parquet"]
    assert shards[-1].read_bytes() == bodies[total - 1]  # the validation shard sorts last
    train, val = data.shard_files(home / "data" / "pretrain")
    assert len(train) == 2 and val == [shards[-1]]
    n = len(hub.log)
    assert main(["data", "download", "-n", "2", "--what", "pretrain", "--endpoint", hub.url]) == 0
    assert len(hub.log) == n  # everything was in place: nothing fetched again
    with pytest.raises(UserError, match="climbmix"):  # no mixing of sources in one folder
        data.download_pretrain(1, "fineweb-edu", endpoint=hub.url)


def test_download_eval_sets(hub, home, monkeypatch, tmp_path, data_root):
    gsm = data.read_gsm8k(data_root / "gsm8k" / "train.jsonl")[:20]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(gsm), buf)
    for name in ("gsm8k", "arc", "mmlu", "humaneval"):
        for repo, fn, _ in data.HF_SETS[name]:
            hub.add(f"/datasets/{repo}/resolve/main/{fn}", buf.getvalue())
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        for f in ("core.yaml", "eval_meta_data.csv", "eval_data/commonsense_reasoning/copa.jsonl"):
            z.write(data_root / "eval_bundle" / f, f"eval_bundle/{f}")
    monkeypatch.setattr(data, "EVAL_BUNDLE_URL", hub.add("/eval_bundle.zip", zbuf.getvalue()))
    words = b"apple\r\nbanana\r\n"
    monkeypatch.setattr(data, "WORDS_URL", hub.add("/words_alpha.txt", words))
    monkeypatch.setattr(data, "WORDS_SHA256", hashlib.sha256(words).hexdigest())
    assert main(["data", "download", "--what", "eval", "--endpoint", hub.url]) == 0
    ev = home / "data" / "eval"
    assert data.read_gsm8k(ev / "gsm8k" / "test.parquet") == gsm
    assert (ev / "arc" / "ARC-Challenge" / "validation.parquet").exists()
    assert data.read_words(ev / "words" / "words_alpha.txt") == ["apple", "banana"]
    tasks = data.read_core_bundle(ev / "eval_bundle")
    copa = next(t for t in tasks if t["label"] == "copa")
    assert not copa["missing"] and len(data.read_core_task(copa["path"])) == 40  # the fixture's 40 rows
    assert not (ev / "eval_bundle.zip").exists()


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
    tok = Tokenizer.train(data.iter_texts(paths[:1]), 300, max_chars=200_000)
    x, y = loader.PretrainLoader(paths[:-1], tok, batch_size=2, seq_len=64).next_batch()
    assert x.shape == (2, 64) and (x[:, 0] == tok.bos_id).all()


def test_import_webtext_parquet(home, shared_data):
    src = shared_data / "webtext" / "webtext_shared.parquet"
    assert main(["data", "import", str(src), "--shard-chars", "6000000"]) == 0
    out = home / "data" / "pretrain"
    paths = sorted(out.glob("*.parquet"))
    assert len(paths) >= 3
    assert_shard_format(paths)
    texts = list(data.iter_texts(paths))
    assert sorted(texts) == sorted(pq.read_table(src, columns=["text"]).column("text").to_pylist())
    assert pq.read_metadata(paths[-1]).num_rows == 1024  # one row group's worth held out
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    loader_batch(paths)


def test_import_tinyshakespeare(tmp_path, shared_data):
    src = shared_data / "tinyshakespeare" / "input.txt"
    paths = data.import_text([src], out=tmp_path / "shards")
    assert len(paths) >= 2
    assert_shard_format(paths)
    texts = list(data.iter_texts(paths))
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
    texts = list(data.iter_texts(paths))
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
    assert sorted(data.iter_texts(sorted(out.glob("*.parquet")))) == ["five", "four", "six"]


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
    got = data.read_jsonl(out)
    assert got == [{"messages": rows[0]["messages"]},
                   {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    bad = tmp_path / "bad.jsonl"
    stray = {"messages": [{"role": "assistant", "content": "x"}]}
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps(stray) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl line 2: message 0: role 'assistant' out of order"):
        data.import_chat([bad])
    assert not (home / "data" / "sft" / "bad.jsonl").exists()


# ---- readers on the real files --------------------------------------------------------------------------------
def test_read_conversations_sharegpt_and_hh(shared_data):
    from picochat.tokenizer import normalize_messages
    convs, skipped = data.read_conversations(shared_data / "chat_sft" / "sharegpt_en.jsonl.gz")
    assert len(convs) == 11080 and skipped == {}
    for c in convs[:2000]:
        normalize_messages(c)
    hh, skipped = data.read_conversations(shared_data / "chat_sft" / "hh_rlhf_harmless_test.jsonl.gz")
    assert len(hh) + sum(skipped.values()) == 2312 and len(hh) > 2000
    for c in hh:
        normalize_messages(c)


def test_to_messages_fixes_and_skips():
    msgs, why = data.to_messages([{"from": "system", "value": "sys"}, {"from": "gpt", "value": "stray"},
                                  {"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                  {"from": "gpt", "value": ""}, {"from": "gpt", "value": "c"},
                                  {"from": "human", "value": "dangling"}])
    assert why is None and msgs == [{"role": "system", "content": "sys"}, {"role": "user", "content": "a\n\nb"},
                                    {"role": "assistant", "content": "c"}]
    assert data.to_messages([{"from": "tool", "value": "x"}])[1] == "unknown role"
    assert data.to_messages([{"from": "human", "value": "x"}])[1] == "no user/assistant exchange"


def test_read_smoltalk_parquet(tmp_path):
    p = tmp_path / "train-00000.parquet"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             "source": "s"},
            {"messages": [{"role": "user", "content": "no answer"}], "source": "s"}]
    pq.write_table(pa.Table.from_pylist(rows), p)
    convs, skipped = data.read_smoltalk(p)
    assert convs == [{"messages": rows[0]["messages"]}] and skipped == {"no user/assistant exchange": 1}


def check_eval_readers(root, n):
    """The readers on real files under root; n: the row counts that root's files have."""
    gsm = data.read_gsm8k(root / "gsm8k" / "train.jsonl")
    assert len(gsm) == n["gsm8k"] and data.extract_answer(gsm[0]["answer"]) == "72"
    assert data.extract_answer("so\n#### 1,234") == "1234" and data.extract_answer("#### -3.50") == "-3.5"
    assert data.extract_answer("no answer") is None
    arc = data.read_arc(root / "arc" / "ARC-Challenge" / "test.jsonl")
    assert len(arc) == n["arc"] and all(0 <= r["answer"] < len(r["choices"]) for r in arc)
    mmlu = data.read_mmlu(root / "mmlu" / "all" / "test.parquet")
    assert len(mmlu) == n["mmlu"] and mmlu[0]["labels"] == ["A", "B", "C", "D"] and len({r["subject"] for r in mmlu}) == 57
    he = data.read_humaneval(root / "humaneval" / "example_problem.jsonl")
    assert he[0]["entry_point"] == "return1"
    tasks = data.read_core_bundle(root / "eval_bundle")
    assert len(tasks) == 22
    assert {t["label"] for t in tasks if not t["missing"]} >= {"hellaswag", "jeopardy"} - n["core_absent"]
    assert len([t for t in tasks if t["missing"]]) == n["core_missing"]
    hs = next(t for t in tasks if t["label"] == "hellaswag")
    assert hs["num_fewshot"] == 10 and hs["random_baseline"] == 0.25 and hs["type"] == "multiple_choice"
    assert next(t for t in tasks if t["label"] == "jeopardy")["continuation_delimiter"] == "\nAnswer: "
    assert set(data.read_core_task(hs["path"])[0]) == {"query", "choices", "gold"}
    words = data.read_words(root / "english_words" / "words_alpha.txt.gz")
    assert len(words) == n["words"] and words[0] == "a"
    return tasks


def test_read_eval_sets(data_root):
    tasks = check_eval_readers(data_root, dict(gsm8k=30, arc=30, mmlu=114, words=2468, core_missing=13,
                                               core_absent={"jeopardy"}))
    assert {t["label"] for t in tasks if not t["missing"]} == {  # the 8 task files the fixture slices
        "arc_easy", "bigbench_qa_wikidata", "winograd", "hellaswag", "hellaswag_zeroshot", "copa", "winogrande",
        "lambada_openai", "bigbench_operators"}


def test_read_eval_sets_full(shared_data):
    tasks = check_eval_readers(shared_data, dict(gsm8k=7473, arc=1172, mmlu=14042, words=370099, core_missing=2,
                                                 core_absent=set()))
    assert {t["label"] for t in tasks if t["missing"]} == {"squad", "coqa"}
    assert {len(r["choices"]) for r in data.read_arc(shared_data / "arc" / "ARC-Easy" / "train.jsonl")} >= {3, 4}
    assert data.read_words(shared_data / "english_words" / "words_alpha.txt.gz")[:2] == ["a", "aa"]  # 370,098 line breaks, no newline at the end


def check_shard_readers(folder, group_rows, val_rows):
    train, val = data.shard_files(folder)
    groups = list(data.iter_row_groups(train[0]))
    assert len(groups) > 1 and all(len(g) == group_rows for g in groups[:-1]) and 0 < len(groups[-1]) <= group_rows
    assert sum(1 for _ in data.iter_texts(val)) == val_rows
    assert data.check_parquet(train[0]) is None


def test_pretrain_readers_on_webtext_shards(data_root):
    check_shard_readers(data_root / "webtext" / "shards", 32, 100)


def test_pretrain_readers_on_full_webtext_shards(shared_data):
    check_shard_readers(shared_data / "webtext" / "shards", 1024, 1024)
    assert len(list(data.iter_row_groups(data.shard_files(shared_data / "webtext" / "shards")[0][0]))) == 8


def test_check_parquet_catches_truncation(tmp_path):
    body = parquet_bytes(100)
    p = tmp_path / "t.parquet"
    p.write_bytes(body[:-100])
    assert "PAR1" in data.check_parquet(p)
    p.write_bytes(body[:-8] + b"\x00\x00\x00\x00PAR1")
    assert "footer" in data.check_parquet(p)
