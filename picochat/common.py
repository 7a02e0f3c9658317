"""Shared plumbing: paths, devices and dtypes, distributed init, clear user errors, atomic writes."""
import math
import os
import shutil
import sys
import json
import time
import errno
import functools
import hashlib
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch


class UserError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line, no traceback."""


def home_dir() -> Path:
    """Everything picochat writes lives under PICOCHAT_HOME (default ~/.cache/picochat)."""
    return Path(os.environ.get("PICOCHAT_HOME", Path.home() / ".cache" / "picochat")).expanduser()


def pick_run(run: str = "") -> str:
    """The run a command works on: `run` when the user named one, else the run trained most recently (the one
    with the newest checkpoint of any stage), announced on stderr so the user knows which model they got."""
    if run:
        return run
    runs = home_dir() / "runs"
    metas = [(m.stat().st_mtime, m.parent.parent.name) for m in runs.glob("*/*/meta_*.json")]
    if not metas:
        raise UserError(f"no trained run in {runs}: train one first (`picochat speedrun`), or name one with --run")
    name = max(metas)[1]
    others = sorted({n for _, n in metas} - {name})
    print(f"run {name!r}: the most recently trained" + (f" (others: {', '.join(others)}; pick one with --run)"
                                                       if others else ""), file=sys.stderr, flush=True)
    return name


def autodetect_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@functools.cache
def cpu_has_bf16_units(cpuinfo="/proc/cpuinfo") -> bool:
    """True on x86 CPUs that multiply bf16 in hardware (AVX512-BF16: AMD Zen 4 and newer, Intel Cooper Lake and
    newer; AMX: Intel Sapphire Rapids and newer), read from Linux's /proc/cpuinfo; False anywhere else."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(device_type: str) -> torch.dtype:
    """The dtype the model's matmuls run in (autocast; weights and optimizer state stay fp32): bf16 on GPUs that
    have it, fp32 on CPUs. PICOCHAT_DTYPE (float32 or bfloat16) overrides: bfloat16 on a CPU with bf16 units
    pretrains faster at the same bits per byte, but the demo's fine-tuned model came out weaker from a bf16 base
    (dev/LOG.md, session 13), so fp32 stays the CPU default. On a CPU without those units bf16 is emulated, far
    slower than fp32: a warning says so."""
    choice = os.environ.get("PICOCHAT_DTYPE", "")
    if choice:
        if choice not in DTYPES:
            raise UserError(f"PICOCHAT_DTYPE={choice!r}: use one of {', '.join(DTYPES)} (or unset it: the "
                            "device's choice)")
        if choice == "bfloat16" and device_type == "cpu" and not cpu_has_bf16_units():
            warnings.warn("PICOCHAT_DTYPE=bfloat16 on a CPU without bf16 units (AVX512-BF16 or AMX): its bf16 "
                          "matmuls are emulated, far slower than fp32", stacklevel=2)
        return DTYPES[choice]
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast_for(device):
    """The context to run the model in on device, as a zero-argument callable (`with autocast():`): autocast to
    compute_dtype where that is bf16; where it is fp32, autocast switched off, so the model computes in fp32
    even inside an outer autocast."""
    dtype = compute_dtype(device.type)
    if dtype == torch.float32:
        return lambda: torch.autocast(device.type, enabled=False)
    return lambda: torch.autocast(device.type, dtype=dtype)


def dist_info():
    """(is_distributed, rank, local_rank, world_size) from the torchrun environment."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


# torch >= 2.9 reads the first; the others are its older, device-specific names
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")


def init_runtime(device_type: str = ""):
    """Pick the device, join the process group under torchrun, seed nothing (callers seed).
    Returns (ddp, rank, local_rank, world_size, device).

    Unless the user configured the CUDA allocator (PYTORCH_ALLOC_CONF, or the older PYTORCH_CUDA_ALLOC_CONF),
    sets PYTORCH_ALLOC_CONF=expandable_segments:True: the caching allocator then grows segments in place
    instead of fragmenting memory across the changing shapes of training, evaluation and generation. torch
    reads it when CUDA is first used, so it is set here, first; a user's setting under either name wins."""
    if not any(os.environ.get(k) for k in ALLOC_CONF_VARS):
        os.environ[ALLOC_CONF_VARS[0]] = "expandable_segments:True"
    device_type = device_type or autodetect_device()
    ddp, rank, local_rank, world = dist_info()
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise_on_rank0(UserError("--device cuda but no CUDA GPU is visible: drop --device or use --device cpu"))
        # every rank of a node checks the node's count before any rank joins the group, so a bad
        # --nproc_per_node fails on all of them at once instead of leaving some waiting in the rendezvous
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)) if ddp else 1
        if per_node > torch.cuda.device_count():
            raise_on_rank0(UserError(f"{per_node} processes per node but only {torch.cuda.device_count()} GPUs "
                                     f"are visible: lower --nproc_per_node to {torch.cuda.device_count()}"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    if ddp and not torch.distributed.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
    return ddp, rank, local_rank, world, device


def raise_on_rank0(error: UserError, wait: float = 20.0):
    """For an error that every rank detects alike (bad flags, a bad checkpoint): rank 0 raises it, so the
    CLI prints one line; the other ranks wait quietly, because torchrun stops them as soon as rank 0 exits.
    A rank still alive after `wait` seconds saw an error rank 0 did not, and raises it with its rank."""
    rank = dist_info()[1]
    if rank == 0:
        raise error
    time.sleep(wait)
    raise UserError(f"[rank {rank}] {error}")


def print0(*args, **kwargs):
    if dist_info()[1] == 0:
        print(*args, **kwargs, flush=True)


def umask() -> int:
    """The process's umask (what a new file's permissions leave out), read without changing it: from
    /proc/self/status where Linux shows it, since the portable way (set it, then set it back) leaves a moment
    in which another thread creates its files with no umask at all."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _atomic_path(path):
    """Yields a temp path in path's folder to write; then fsyncs it, gives it the usual permissions, renames it
    to path and fsyncs the folder, so that once this returns the file survives a crash whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # the rename is durable only once the folder's entry is on disk


def _fsync_dir(folder):
    """Flush a folder's entries (a rename or a deletion in it) to disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a platform that cannot open folders
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # filesystems without folder fsync
            raise
    finally:
        os.close(fd)


class _HashingWriter:
    """A binary file that hashes what is written through it."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data):
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def atomic_write_stream(path, write_fn) -> str:
    """Like atomic_write_bytes for writers of a binary file object (torch.save(obj, f), ...): write_fn(f) writes
    the whole file through f, in order. Returns the sha256 (hex) of what was written, hashed as it went by."""
    with _atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        write_fn(writer)
    return writer.sha256.hexdigest()


def file_sha256(path) -> str:
    """The sha256 (hex) of a file's content, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path, data: bytes) -> str:
    """Write to a temp file in the same folder, fsync, rename: a reader never sees half a file, and a crash
    leaves the old file or the new one. Returns the sha256 (hex) of data."""
    return atomic_write_stream(path, lambda f: f.write(data))


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def metrics_logger(path, step, rank, redone=(), *, mirror=None):
    """A function that appends one record to a stage's metrics.jsonl (on rank 0), and passes it to mirror (a
    tracking.tracker) when one is given. A run resumed at `step` first drops the records past it, and at it those
    with a key in `redone` (what the resumed run measures there again), so the curve has no duplicates."""
    if rank == 0:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        keep = [r for r in records
                if r.get("step", 0) < step or r.get("step", 0) == step and not set(redone) & r.keys()] if step else []
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def log(record):
        if rank == 0:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if mirror is not None:
                mirror(record)
    return log


def vars_json(args):
    """A run's argparse flags as JSON-safe values, for checkpoints and summaries."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def atomic_save(path, save_fn):
    """Like atomic_write_bytes for writers that want a path (safetensors.save_file, pq.write_table, ...)."""
    with _atomic_path(path) as tmp:
        save_fn(tmp)


@contextmanager
def replacing_dir(out):
    """`with replacing_dir(out) as tmp:` build a folder's new contents in tmp, a fresh folder beside out (same
    filesystem, usual permissions). When the block ends without an error tmp is renamed to out (an older out is
    renamed aside first, then deleted), so a reader finds the old folder or the new one, never a mix; when it
    raises, out is left as it was. Either way no temporary folder is left behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(out.parent)  # as for a file: the rename is durable only once the parent's entry is on disk
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# Dense (not 2:4 sparse) bf16 tensor-core peaks in FLOP/s with fp32 accumulation (what a bf16 matmul in
# PyTorch uses; GeForce cards run it at half their fp16-accumulate rate), from NVIDIA's datasheets. The name
# is matched as a substring of torch.cuda.get_device_name(), longest key first ("H100 PCIe" before "H100").
GPU_PEAK_FLOPS = {
    "B200": 2250e12, "B100": 1750e12, "H200": 989e12, "H200 NVL": 836e12, "GH200": 989e12,
    "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H800": 989e12, "H800 PCIe": 756e12,
    "A100": 312e12, "A800": 312e12, "A40": 149.7e12, "A10": 125e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "RTX 5090": 209.5e12, "RTX 4090": 165.2e12, "RTX 3090": 71e12, "RTX A6000": 154.8e12,
    "RTX 6000 Ada": 364.2e12,
    "A10G": None,  # AWS's A10 variant: no published figure, so it is measured like any unknown GPU
}
# fp32 peaks (TF32 tensor cores where they exist: half the bf16 rate) differ from bf16/2 only on cards
# without bf16 and TF32, which then compute in plain fp32
GPU_PEAK_FLOPS_FP32 = {"V100": 15.7e12, "T4": 8.1e12}


def gpu_peak_flops(name: str, dtype=torch.bfloat16):
    """Peak FLOP/s of a GPU from its name, or None when it is not in the tables."""
    if dtype != torch.bfloat16:
        for key in sorted(GPU_PEAK_FLOPS_FP32, key=len, reverse=True):
            if key in name:
                return GPU_PEAK_FLOPS_FP32[key]
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            flops = GPU_PEAK_FLOPS[key]
            return flops if flops is None or dtype == torch.bfloat16 else flops / 2
    return None


def measure_matmul_flops(device, dtype=torch.float32, n=1024, seconds=1.0):
    """Achievable matmul FLOP/s on this device and dtype, measured (the honest MFU denominator on CPUs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(4):
            a @ b
        iters += 4
        sync()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def peak_flops(device, dtype=torch.float32):
    """Peak FLOP/s for MFU: a table for known GPUs, a measured matmul peak elsewhere (the best per machine)."""
    if device.type == "cuda":
        flops = gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
        return flops if flops is not None else measure_matmul_flops(device, dtype, n=4096)
    # measured on every start (1 s) and the best kept: a machine busy with other work measures low, and a low
    # peak would inflate every MFU after it
    cache = home_dir() / f"matmul_peak_{device.type}_{str(dtype).split('.')[-1]}_{torch.get_num_threads()}t.json"
    try:
        best = json.loads(cache.read_text())["flops"]
    except (OSError, ValueError, KeyError):
        best = 0.0
    flops = measure_matmul_flops(device, dtype)
    if flops > best:
        try:
            atomic_write_json(cache, {"flops": flops})
        except OSError:
            pass
    return max(flops, best)


def fmt(v, digits=4):
    """A number as people read it: 5,457 tokens/s, 412.3 s, 0.1523 bpb."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 100 else f"{v:.{digits}f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def format_duration(seconds):
    seconds = int(max(0, seconds))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
