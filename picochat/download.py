"""Downloads for `picochat data download`: pretraining shards and the chat and eval sets, from the Hugging Face
hub (and the CORE bundle and word list from where they are published).

Downloads are resumable (HTTP Range into a .partial file), retried with exponential backoff on dropped
connections and 5xx, and renamed into place only after the size and a checksum (the hub's sha256 ETag) or the
parquet footer check out, so a file under its final name is always whole.

What is fetched is pinned where it can be: each hub dataset is read at a fixed revision (HF_REVISIONS, in the
URL), the word list and the CORE bundle by their sha256. Only https URLs are
fetched, redirects included; a .partial file is never opened through a symlink; the CORE bundle is refused
if it would unzip to more than MAX_UNZIPPED_BYTES.
"""
import errno
import hashlib
import json
import os
import random
import re
import stat
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from urllib.parse import urlsplit

from picochat.common import UserError, atomic_write_json, replacing_dir
from picochat.shards import check_parquet, eval_dir, pretrain_dir

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
# the revision each hub dataset is read at: a commit sha where one is known, else the branch "main" (then the
# hub's sha256 ETag still checks each file, but the files may change between downloads). The three shas are the
# ones several public projects pin for these datasets; they were not fetched from here (no network)
HF_REVISIONS = {
    "karpathy/climbmix-400b-shuffle": "main",
    "karpathy/fineweb-edu-100b-shuffle": "main",
    "HuggingFaceTB/smol-smoltalk": "main",
    "openai/gsm8k": "740312add88f781978c0658806c59bc2815b9866",
    "allenai/ai2_arc": "210d026faf9955653af8916fad021475a3f00453",
    "cais/mmlu": "c30699e8356da336a370243923dbaf21066bb9fe",
    "openai/openai_humaneval": "main",
}
WHAT_SETS = {"sft": ["smoltalk"], "eval": ["gsm8k", "arc", "mmlu", "humaneval", "eval_bundle", "words"]}
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# the zip's sha256: the value several public projects pin for this URL (not downloaded here: no network); a
# mismatch is retried, then stops the download naming both digests
EVAL_BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
MAX_UNZIPPED_BYTES = 2 << 30  # the CORE bundle unzips to well under this; a zip that claims more is refused
SCHEMES = ("https",)  # URL schemes that may be fetched (tests widen it to reach their local http server)
# pinned to a commit so the checksum holds
WORDS_URL = ("https://raw.githubusercontent.com/dwyl/english-words/20f5cc9b3f0ccc8ce45d814c532b7c2031bba31c/"
             "words_alpha.txt")
WORDS_SHA256 = "2d8cf2326673fa0c179bdc3a58053872d16bff5352331580955ae62101f6a34d"
OFFLINE_HINT = ("use `picochat data import PATH` for text you have, or `picochat data demo` for the offline "
                "demo curriculum")


class _Retry(Exception):
    """A failure worth trying again (5xx, short body, bad checksum)."""


def hf_url(repo, filename, endpoint=None):
    endpoint = (endpoint or os.environ.get("PICOCHAT_HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
    return f"{endpoint}/datasets/{repo}/resolve/{HF_REVISIONS[repo]}/{filename}"


def check_url(url):
    """A UserError unless url is one we may fetch from (https: the bytes cannot be swapped on the way)."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise UserError(f"refusing to download {url}: only {' and '.join(SCHEMES)} URLs are fetched, "
                        f"not {scheme or 'a URL without a scheme'} (for --endpoint or $PICOCHAT_HF_ENDPOINT give an "
                        f"https:// URL)")


def offline_error(url):
    return UserError(f"cannot reach {urlsplit(url).netloc} (no network?): {OFFLINE_HINT}")


def check_reachable(url, timeout=10):
    """Fail fast, in one line, when a host cannot be reached at all (rather than after minutes of retries)."""
    import requests
    check_url(url)
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


def _partial_size(partial):
    """Bytes already in a .partial file (0 if there is none); a UserError if something else sits at its path."""
    try:
        st = os.lstat(partial)
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{partial} is a symlink or not a plain file: refusing to write through it; "
                        f"delete it and run the command again")
    return st.st_size


def _open_partial(partial, mode):
    """open(partial, mode) for mode rb, wb or ab, but never through a symlink (O_NOFOLLOW)."""
    flags = {"rb": os.O_RDONLY, "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
             "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND}[mode] | os.O_NOFOLLOW
    try:
        fd = os.open(partial, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{partial} is a symlink: refusing to write through it; delete it and run the "
                            f"command again") from None
        raise
    return os.fdopen(fd, mode)


def download_file(url, dest, sha256=None, kind=None, *, session=None, progress=None, retries=6, backoff=1.0,
                  timeout=(10, 60), stop=None, chunk_size=1 << 20):
    """Fetch url to dest, resumably and verified. Bytes go to dest.partial (continued with an HTTP Range request
    after a dropped connection); once the size matches Content-Length and the content checks out (sha256 given
    or served by the hub, else the parquet footer / zip CRCs for kind='parquet'/'zip'), it is renamed to dest.
    A corrupt result is deleted and fetched again. Connection errors, 5xx and 429 are retried with exponential
    backoff (backoff * 2^k seconds)."""
    import requests
    import urllib3
    check_url(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")  # not *.parquet: never mistaken for a shard
    session = session or requests.Session()
    attempt, connected, shown, total_known = 0, False, 0, False
    while True:
        try:
            have = _partial_size(partial)
            headers = {"Accept-Encoding": "identity"}  # the bytes on disk must be the bytes Content-Length counts
            if have:
                headers["Range"] = f"bytes={have}-"
            with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
                connected = True
                for hop in list(r.history) + [r]:  # a redirect must not leave https either
                    check_url(hop.url)
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
                            with _open_partial(partial, "rb") as f:
                                for block in iter(lambda: f.read(1 << 20), b""):
                                    hasher.update(block)
                    with _open_partial(partial, mode) as f:
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
    """jobs: [(url, dest, sha256 or None, kind or None)]. Files already in place (and whole, for parquet; with
    the given sha256, when there is one) are skipped; the rest are fetched by a thread pool with one shared
    progress bar. Returns the paths."""
    import requests
    for url, *_ in jobs:
        check_url(url)
    todo = []
    for url, dest, sha, kind in jobs:
        dest = Path(dest)
        if dest.exists() and (kind != "parquet" or check_parquet(dest) is None) and \
                (sha is None or _verify(dest, sha, None) is None):
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
        jobs.append((EVAL_BUNDLE_URL, out / "eval_bundle.zip", EVAL_BUNDLE_SHA256, "zip"))
    download_all(jobs, workers, desc="chat and eval sets", **kw)
    if "eval_bundle" in names and not (bundle / "core.yaml").exists():
        _unzip_bundle(out / "eval_bundle.zip", bundle)
    return out


def _unzip_bundle(zip_path, dest, max_bytes=None):
    """Unzip the CORE bundle and swap the folder holding its core.yaml in at dest. A zip that is unsafe (paths
    outside the folder), would unzip to more than max_bytes (default MAX_UNZIPPED_BYTES) or is not the bundle
    is deleted, so that the next run fetches it again, and nothing is left of its contents."""
    try:
        with replacing_dir(dest) as tmp, tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.",
                                                                     suffix=".unzip") as raw:
            root = _unzip(zip_path, Path(raw), MAX_UNZIPPED_BYTES if max_bytes is None else max_bytes)
            while not (root / "core.yaml").exists():  # the zip has the files inside an eval_bundle/ folder
                subs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith("__")]
                if len(subs) != 1:
                    raise UserError(f"{zip_path}: no core.yaml inside: not the CORE eval bundle")
                root = subs[0]
            for f in root.iterdir():
                os.replace(f, tmp / f.name)
    except (UserError, zipfile.BadZipFile):
        zip_path.unlink(missing_ok=True)
        raise
    zip_path.unlink()


def _unzip(zip_path, folder, max_bytes):
    """Extract zip_path into folder, refusing paths that would land outside it and more than max_bytes in all
    (counted as declared, and again as written: a member cannot inflate past what it declares)."""
    with zipfile.ZipFile(zip_path) as z:
        members = z.infolist()
        for m in members:
            if m.filename.startswith("/") or ".." in Path(m.filename).parts:
                raise UserError(f"{zip_path}: unsafe path {m.filename!r} in the archive")
        declared = sum(m.file_size for m in members)
        if declared > max_bytes:
            raise UserError(f"{zip_path}: would unzip to {declared:,} bytes, over the cap of {max_bytes:,}: "
                            f"not the CORE eval bundle")
        written = 0
        for m in members:
            target = folder / m.filename
            if m.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(m) as src, open(target, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    written += len(block)
                    if written > max_bytes:
                        raise UserError(f"{zip_path}: unzips to more than its members declare (over "
                                        f"{max_bytes:,} bytes): not the CORE eval bundle")
                    dst.write(block)
    return folder
