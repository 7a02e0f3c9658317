"""int8 weights for CPU decoding: one scale per output channel, and the matrix product that reads them as they are.

    w = quantize_int8(weight)   # Int8Weight: int8 q in our kernel's tiles or (out, in), scale (out,) fp32
    y = int8_matmul(x, w)       # ~ F.linear(x, weight), in x's dtype

A decode step streams every weight from memory once, so int8 (a quarter of fp32's bytes) is worth what the product
reads per second. torch ships no fast CPU product for fp32 activations and int8 weights, so a few rows go through our
own (picochat/int8_linear.c), compiled on first use with the system's C compiler for the machine it runs on, cached
under PICOCHAT_HOME/kernels and called through ctypes (which releases the GIL, as torch's ops do). Where no compiler
works, one line says so and torch's int8 kernel (aten._weight_int8pack_mm, bf16 activations) takes its place;
many rows (prefill, scoring) dequantize W once for MKL's gemm either way. The figures behind each threshold:
dev/LOG.md.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from picochat.common import home_dir

KERNEL_SOURCE = Path(__file__).with_name("int8_linear.c")
KERNEL_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
INT8_KERNEL_MAX_ROWS = 64  # up to this many rows an int8 kernel (ours or torch's); above, dequantizing once for
                           # MKL's gemm is faster (the crossover at d20 shapes)


class Int8Weight(NamedTuple):
    """A matrix W (out, in) as int8 with one scale per output channel: W ~ rows() * scale[:, None]."""
    q: torch.Tensor  # int8: (out, in), or for our kernel tiles of 64 output channels (ceil(out / 64), in, 64)
    scale: torch.Tensor  # (out,) fp32, contiguous
    kernel_scale: torch.Tensor  # the same scales in bf16, the dtype torch's kernel takes them in

    def rows(self):
        """The int8 matrix as (out, in), whichever layout q has."""
        if self.q.dim() == 2:
            return self.q
        return self.q.transpose(1, 2).reshape(-1, self.q.shape[1])[:self.scale.shape[0]]


def quantize_int8(w, *, tiled=None):
    """Per-output-channel symmetric int8 weights (InferenceModel with dtype=torch.int8): each row of w (out, in)
    is scaled so that its largest |value| becomes 127, then rounded. What holds: q in [-127, 127], and
    |W - q * scale| <= scale / 2 = max|row| / 254 elementwise; a row of zeros stays zeros. tiled (default: where
    our kernel is built) lays q out in the kernel's tiles (see int8_linear.c); else q is (out, in)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127).to(torch.int8)
    if tiled is None:
        tiled = w.device.type == "cpu" and _kernel() is not None
    if tiled:
        padded = torch.zeros(-(-q.shape[0] // 64) * 64, q.shape[1], dtype=torch.int8)
        padded[:q.shape[0]] = q
        q = padded.view(-1, 64, q.shape[1]).transpose(1, 2)
    return Int8Weight(q.contiguous(), scale.contiguous(), scale.to(torch.bfloat16))


def int8_matmul(x, w):
    """F.linear(x, W) for w = quantize_int8(W), in x's dtype, by the fastest path for the layout and the rows:
    - tiled weights, up to INT8_KERNEL_MAX_ROWS rows (decode steps, the scheduler's batches): our kernel, fp32
      activations;
    - (out, in) weights (no kernel built), up to INT8_KERNEL_MAX_ROWS rows whose width is a multiple of 32 (it has
      no loop tail): torch's kernel, with x rounded to bf16 (its x86 code is vectorized for bf16 only);
    - more rows: W dequantized, then one gemm."""
    rows = x.numel() // x.shape[-1]
    out = w.scale.shape[0]
    if w.q.dim() == 3 and rows <= INT8_KERNEL_MAX_ROWS:
        a = x.reshape(rows, x.shape[-1]).float().contiguous()
        y = torch.empty(rows, out)
        _kernel()(a.data_ptr(), w.q.data_ptr(), w.scale.data_ptr(), y.data_ptr(), rows, out, x.shape[-1],
                  torch.get_num_threads())
        return y.to(x.dtype).view(*x.shape[:-1], out)
    if w.q.dim() == 2 and rows <= INT8_KERNEL_MAX_ROWS and x.shape[-1] % 32 == 0:
        a = x.reshape(rows, x.shape[-1]).to(torch.bfloat16).contiguous()  # the kernel assumes rows of width `in`
        y = torch.ops.aten._weight_int8pack_mm(a, w.q, w.kernel_scale)
        return y.to(x.dtype).view(*x.shape[:-1], out)
    return F.linear(x, w.rows().to(x.dtype)) * w.scale.to(x.dtype)


@functools.cache
def _kernel():
    """int8_linear from the compiled kernel, or None (after one line on stderr) where it cannot be built."""
    try:
        lib = ctypes.CDLL(str(build_kernel()))
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines() or ["?"]
        print(f"int8: our int8 kernel could not be built ({detail[-1][:200]}); decoding with "
              "torch's slower one (set CC to a working C compiler to fix)", file=sys.stderr, flush=True)
        return None
    f = lib.int8_linear
    f.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    f.restype = None
    return f


def build_kernel(folder=None):
    """Path of int8_linear.c compiled for this machine, built once into folder (default PICOCHAT_HOME/kernels)
    and reused. The file name hashes the source, the compiler, its flags and the CPU's feature flags, so an edit, a
    new compiler or another machine sharing the folder gets its own build. Raises OSError (no compiler) or
    subprocess.CalledProcessError (a failed build); the build is written beside its final name and renamed in,
    so a half-written library is never loaded."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler: {cc!r} is not on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\n".join([KERNEL_SOURCE.read_text(), cc, version, *KERNEL_FLAGS, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    folder = Path(folder) if folder is not None else home_dir() / "kernels"
    path = folder / f"int8_linear-{key}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".int8_linear-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cc, *KERNEL_FLAGS, "-o", tmp, str(KERNEL_SOURCE)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode:
            raise subprocess.CalledProcessError(done.returncode, cc, stderr=done.stderr)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _cpu_flags():
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""
