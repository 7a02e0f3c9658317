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
def allow_http(monkeypatch):
    """The local servers speak plain http, which downloads refuse (test_only_https_is_fetched): allow it here."""
    monkeypatch.setattr(download, "SCHEMES", ("https", "http"))


@pytest.fixture
def hub(allow_http):
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


def test_no_server_names_the_host(tmp_path, capsys, allow_http):
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
        hub.add(f"/datasets/{repo}/resolve/{download.HF_REVISIONS[repo]}/shard_{i:05d}.parquet", b)
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
            hub.add(f"/datasets/{repo}/resolve/{download.HF_REVISIONS[repo]}/{fn}", buf.getvalue())
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        for f in ("core.yaml", "eval_meta_data.csv", "eval_data/commonsense_reasoning/copa.jsonl"):
            z.write(data_root / "eval_bundle" / f, f"eval_bundle/{f}")
    monkeypatch.setattr(download, "EVAL_BUNDLE_URL", hub.add("/eval_bundle.zip", zbuf.getvalue()))
    monkeypatch.setattr(download, "EVAL_BUNDLE_SHA256", hashlib.sha256(zbuf.getvalue()).hexdigest())
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


# ---- what is fetched, and where it goes -----------------------------------------------------------------------
class _Hop:
    """A stand-in for a requests response: its url and the redirects that led to it."""

    def __init__(self, url, history=()):
        self.url, self.history, self.status_code, self.headers = url, list(history), 200, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_only_https_is_fetched(tmp_path, home, capsys):
    for url in ("http://127.0.0.1:1/f.parquet", "ftp://example.com/f.parquet", "file:///etc/passwd",
                "example.com/f.parquet"):
        with pytest.raises(UserError, match="only https URLs are fetched"):
            download.download_file(url, tmp_path / "f.parquet", backoff=0, retries=1)
    assert [p for p in tmp_path.iterdir() if p != home] == []  # nothing written
    rc = main(["data", "download", "-n", "1", "--what", "pretrain", "--endpoint", "http://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert rc == 2 and "only https URLs are fetched" in err and "--endpoint" in err
    assert not (home / "data").exists()
    download.check_url("https://huggingface.co/datasets/x")  # the default endpoint passes

    class RedirectedToHttp:  # a hub that redirects to a plain-http mirror
        def get(self, url, **kw):
            return _Hop("http://mirror.example/f.parquet", history=[_Hop(url)])

    with pytest.raises(UserError, match="refusing to download http://mirror.example"):
        download.download_file("https://hub.example/f.parquet", tmp_path / "g.parquet", session=RedirectedToHttp(),
                               backoff=0, retries=1)
    assert not (tmp_path / "g.parquet").exists() and not (tmp_path / "g.parquet.partial").exists()


def test_hub_urls_carry_the_pinned_revision():
    for name, files in download.HF_SETS.items():
        for repo, fn, _ in files:
            url = download.hf_url(repo, fn)
            assert url == f"https://huggingface.co/datasets/{repo}/resolve/{download.HF_REVISIONS[repo]}/{fn}"
    for repo, _ in download.PRETRAIN_SOURCES.values():
        assert f"/resolve/{download.HF_REVISIONS[repo]}/" in download.hf_url(repo, "shard_00000.parquet")
    with pytest.raises(KeyError):  # a new dataset must be given a revision
        download.hf_url("someone/unpinned", "x.parquet")


def test_symlink_at_partial_is_not_followed(hub, tmp_path, monkeypatch):
    url = hub.add("/f.parquet", parquet_bytes(50))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    dest = tmp_path / "d" / "f.parquet"
    dest.parent.mkdir()
    (dest.parent / "f.parquet.partial").symlink_to(victim)
    with pytest.raises(UserError, match="symlink"):
        download.download_file(url, dest, kind="parquet", backoff=0)
    assert victim.read_text() == "precious" and not dest.exists()
    # planted between the check and the open: O_NOFOLLOW still refuses it
    monkeypatch.setattr(download, "_partial_size", lambda partial: 0)
    with pytest.raises(UserError, match="symlink"):
        download.download_file(url, dest, kind="parquet", backoff=0)
    assert victim.read_text() == "precious" and not dest.exists()
    assert (dest.parent / "f.parquet.partial").is_symlink()  # left for the user to look at


def test_wrong_sha256_is_refused_and_not_installed(hub, tmp_path):
    body = parquet_bytes(50)
    url = hub.add("/f.parquet", body)
    dest = tmp_path / "f.parquet"
    with pytest.raises(UserError, match="sha256 mismatch"):
        download.download_file(url, dest, sha256="0" * 64, kind="parquet", backoff=0, retries=1)
    assert [p for p in tmp_path.iterdir() if p != tmp_path / "home"] == []  # no dest, no .partial
    # a file already in place that does not match its pinned sha256 is fetched again
    dest.write_bytes(b"not it")
    download.download_all([(url, dest, hashlib.sha256(body).hexdigest(), None)], workers=1, backoff=0)
    assert dest.read_bytes() == body


def test_zip_bomb_is_refused_and_leaves_nothing(hub, home, monkeypatch, data_root):
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for f in ("core.yaml", "eval_meta_data.csv"):
            z.write(data_root / "eval_bundle" / f, f"eval_bundle/{f}")
        z.writestr("eval_bundle/eval_data/filler.jsonl", b"\0" * (8 << 20))  # 8 MB of zeros in a few KB
    assert len(zbuf.getvalue()) < 100_000
    monkeypatch.setattr(download, "EVAL_BUNDLE_URL", hub.add("/eval_bundle.zip", zbuf.getvalue()))
    monkeypatch.setattr(download, "EVAL_BUNDLE_SHA256", hashlib.sha256(zbuf.getvalue()).hexdigest())
    monkeypatch.setattr(download, "MAX_UNZIPPED_BYTES", 4 << 20)
    with pytest.raises(UserError, match="over the cap"):
        download.download_sets(["eval_bundle"])
    ev = home / "data" / "eval"
    assert list(ev.iterdir()) == []  # no bundle, no half-unzipped folder, and no zip: a rerun fetches it again
    monkeypatch.setattr(download, "MAX_UNZIPPED_BYTES", 16 << 20)
    download.download_sets(["eval_bundle"])
    assert (ev / "eval_bundle" / "core.yaml").is_file() and sorted(p.name for p in ev.iterdir()) == ["eval_bundle"]
