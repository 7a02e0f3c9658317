"""picochat.download: downloads against a misbehaving local server."""
import hashlib
import io
import random
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat import core, download
from picochat.cli import main
from picochat.common import UserError
from picochat.shards import split_shards
from picochat.tasks import gsm8k, spelling


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
    download.download_file(url, dest, kind="parquet", backoff=0, chunk_size=64 * 1024)
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
    download.download_file(url, dest, kind="parquet", backoff=0)
    assert dest.read_bytes() == body
    assert [s for _, _, s in hub.log] == [500, 500, 200]


def test_corrupt_parquet_is_fetched_again(hub, tmp_path):
    body = parquet_bytes(200)
    url = hub.add("/f.parquet", body, faults=["corrupt"])
    dest = tmp_path / "f.parquet"
    download.download_file(url, dest, kind="parquet", backoff=0)
    assert dest.read_bytes() == body
    assert len(hub.log) == 2


def test_checksum_from_hub_header(hub, tmp_path):
    body = b'{"text": "hello"}\n' * 1000
    sha = hashlib.sha256(body).hexdigest()
    url = hub.add("/f.jsonl", body, faults=["corrupt"], headers={"X-Linked-Etag": f'"{sha}"'})
    dest = tmp_path / "f.jsonl"
    download.download_file(url, dest, backoff=0)  # no kind: only the served sha256 can catch the corruption
    assert dest.read_bytes() == body and len(hub.log) == 2


def test_corruption_that_never_heals_leaves_nothing(hub, tmp_path):
    url = hub.add("/f.parquet", parquet_bytes(100), faults=["always-corrupt"])
    dest = tmp_path / "f.parquet"
    with pytest.raises(UserError, match="after 2 retries"):
        download.download_file(url, dest, kind="parquet", backoff=0, retries=2)
    assert list(tmp_path.iterdir()) == []


def test_404_is_a_clear_error(hub, tmp_path):
    with pytest.raises(UserError, match="not found"):
        download.download_file(hub.url + "/nope.parquet", tmp_path / "x.parquet", backoff=0)


def test_no_server_names_the_host(tmp_path, capsys):
    port = free_port()
    with pytest.raises(UserError) as e:
        download.download_file(f"http://127.0.0.1:{port}/f.parquet", tmp_path / "f.parquet", backoff=0, retries=1)
    assert f"127.0.0.1:{port}" in str(e.value) and "picochat data demo" in str(e.value)
    # through the CLI: one line, exit code 2, and fast (no minutes of retries)
    rc = main(["data", "download", "-n", "1", "--what", "pretrain", "--endpoint", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"cannot reach 127.0.0.1:{port}" in err and "picochat data import PATH" in err
    assert not (tmp_path / "home" / "data").exists()  # nothing written


def test_download_pretrain_layout_and_rerun(hub, home, capsys):
    repo, total = download.PRETRAIN_SOURCES["climbmix"]
    bodies = {i: parquet_bytes(50, seed=i) for i in (0, 1, total - 1)}
    for i, b in bodies.items():
        hub.add(f"/datasets/{repo}/resolve/main/shard_{i:05d}.parquet", b)
    assert main(["data", "download", "-n", "2", "--what", "pretrain", "--endpoint", hub.url]) == 0
    shards = sorted((home / "data" / "pretrain").glob("*.parquet"))
    assert [p.name for p in shards] == ["shard_00000.parquet", "shard_00001.parquet", f"shard_{total - 1:05d}.parquet"]
    assert shards[-1].read_bytes() == bodies[total - 1]  # the validation shard sorts last
    train, val = split_shards(home / "data" / "pretrain")
    assert len(train) == 2 and val == [shards[-1]]
    n = len(hub.log)
    assert main(["data", "download", "-n", "2", "--what", "pretrain", "--endpoint", hub.url]) == 0
    assert len(hub.log) == n  # everything was in place: nothing fetched again
    with pytest.raises(UserError, match="climbmix"):  # no mixing of sources in one folder
        download.download_pretrain(1, "fineweb-edu", endpoint=hub.url)


def test_download_eval_sets(hub, home, monkeypatch, tmp_path, data_root):
    gsm = gsm8k.read_gsm8k(data_root / "gsm8k" / "train.jsonl")[:20]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(gsm), buf)
    for name in ("gsm8k", "arc", "mmlu", "humaneval"):
        for repo, fn, _ in download.HF_SETS[name]:
            hub.add(f"/datasets/{repo}/resolve/main/{fn}", buf.getvalue())
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        for f in ("core.yaml", "eval_meta_data.csv", "eval_data/commonsense_reasoning/copa.jsonl"):
            z.write(data_root / "eval_bundle" / f, f"eval_bundle/{f}")
    monkeypatch.setattr(download, "EVAL_BUNDLE_URL", hub.add("/eval_bundle.zip", zbuf.getvalue()))
    words = b"apple\r\nbanana\r\n"
    monkeypatch.setattr(download, "WORDS_URL", hub.add("/words_alpha.txt", words))
    monkeypatch.setattr(download, "WORDS_SHA256", hashlib.sha256(words).hexdigest())
    assert main(["data", "download", "--what", "eval", "--endpoint", hub.url]) == 0
    ev = home / "data" / "eval"
    assert gsm8k.read_gsm8k(ev / "gsm8k" / "test.parquet") == gsm
    assert (ev / "arc" / "ARC-Challenge" / "validation.parquet").exists()
    assert spelling.read_words(ev / "words" / "words_alpha.txt") == ["apple", "banana"]
    tasks = core.read_core_bundle(ev / "eval_bundle")
    copa = next(t for t in tasks if t["label"] == "copa")
    assert not copa["missing"] and len(core.read_core_task(copa["path"])) == 40  # the fixture's 40 rows
    assert not (ev / "eval_bundle.zip").exists()
