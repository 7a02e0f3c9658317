"""Data pipeline throughput; prints one JSON line.

- download: one ~80 MB file from a local http.server (Range-capable), fetched by picochat.download.download_file
  (with and without its sha256 check; always fsynced) and by `curl` in the same run, interleaved; best of
  --repeats each; ratio = ours / curl throughput.
- import: `picochat data import` of shared/data/webtext (parquet) -> shards, in MB/s of UTF-8 text.
- demo: `picochat data demo` at scale 1, in seconds and M characters/s.

    python bench/data.py [--mb 80] [--repeats 3]
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq

from picochat import data, demo, download

ROOT = Path(__file__).resolve().parents[1]
WEBTEXT = next((p for p in (ROOT.parent / "shared" / "data" / "webtext" / "webtext_shared.parquet",
                            Path("/work/shared/data/webtext/webtext_shared.parquet")) if p.exists()), None)


def serve(body):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            rng = self.headers.get("Range")
            start = int(rng.split("=")[1].split("-")[0]) if rng else 0
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(body) - start))
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            view = memoryview(body)
            for i in range(start, len(body), 1 << 20):
                self.wfile.write(view[i:i + (1 << 20)])

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/file.bin"


def best_of(n, fn):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=80, help="size of the downloaded file")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="picochat-bench-data-"))
    result = {"bench": "data", "cpus": os.cpu_count()}
    try:
        body = os.urandom(args.mb * 1_000_000)
        sha = hashlib.sha256(body).hexdigest()
        server, url = serve(body)
        download.SCHEMES = ("https", "http")  # the local server speaks plain http, which downloads refuse
        mb = len(body) / 1e6

        def ours(check=True):
            dest = tmp / "ours.bin"
            dest.unlink(missing_ok=True)
            download.download_file(url, dest, sha256=sha if check else None)

        def curl():
            dest = tmp / "curl.bin"
            subprocess.run(["curl", "-sSf", "-o", str(dest), url], check=True)

        # interleaved, so both see the same machine state
        t_ours, t_raw, t_curl = [], [], []
        for _ in range(args.repeats):
            t_ours.append(best_of(1, ours))
            t_raw.append(best_of(1, lambda: ours(False)))
            t_curl.append(best_of(1, curl))
        t_ours, t_raw, t_curl = min(t_ours), min(t_raw), min(t_curl)
        assert (tmp / "ours.bin").read_bytes() == body and (tmp / "curl.bin").read_bytes() == body
        server.shutdown()
        # ours fsyncs the file and (first figure) hashes it; curl does neither
        result.update(download_mb=round(mb, 1), download_mb_s=round(mb / t_ours, 1),
                      download_nocheck_mb_s=round(mb / t_raw, 1), curl_mb_s=round(mb / t_curl, 1),
                      download_vs_curl=round(t_curl / t_ours, 3), nocheck_vs_curl=round(t_curl / t_raw, 3))

        if WEBTEXT is not None:
            texts = pq.read_table(WEBTEXT, columns=["text"]).column("text").to_pylist()
            text_mb = sum(len(t.encode()) for t in texts) / 1e6
            n = 0

            def imp():
                nonlocal n
                n += 1
                data.import_text([WEBTEXT], out=tmp / f"import{n}")

            t_imp = best_of(args.repeats, imp)
            result.update(import_text_mb=round(text_mb, 1), import_mb_s=round(text_mb / t_imp, 1))

        t0 = time.perf_counter()
        counts = demo.generate(tmp / "demo", seed=0, scale=1.0)
        t_demo = time.perf_counter() - t0
        result.update(demo_s=round(t_demo, 2), demo_mchars_s=round(counts["pretrain_chars"] / 1e6 / t_demo, 1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
