"""picochat/int8.py: per-channel quantization, our compiled kernel against F.linear with the dequantized weights
(every shape its loop has a case for, 1 and 2 threads), torch's kernel where ours cannot be built, and the build:
cached, rebuilt for a new source, and a failed or impossible build leaves nothing behind and says why in one line."""
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from picochat import int8
from picochat.decode import matmul
from picochat.int8 import INT8_KERNEL_MAX_ROWS, build_kernel, int8_matmul, quantize_int8


needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                              reason="no C compiler (cc or $CC) to build the int8 kernel with")


def dequantized(qw):
    return qw.rows().float() * qw.scale[:, None]


def test_quantize_int8_round_trip_error_per_channel():
    g = torch.Generator().manual_seed(0)
    # rows of very different scales (one all zeros, one with an outlier): the scale is per output channel
    w = torch.randn(96, 64, generator=g) * torch.logspace(-4, 1, 96)[:, None]
    w[5] = 0
    w[7, 3] = 50.0
    qw = quantize_int8(w, tiled=True)  # the kernel's layout, built or not
    q = qw.rows()
    assert qw.q.dtype == torch.int8 and q.shape == w.shape and qw.scale.shape == (96,)
    assert q.abs().max() <= 127
    assert torch.equal(q, quantize_int8(w, tiled=False).q)  # both layouts hold the same numbers
    assert qw.q.shape == (2, 64, 64) and (qw.q.transpose(1, 2).reshape(128, 64)[96:] == 0).all()  # padded tiles
    back = dequantized(qw)
    row_max = w.abs().amax(dim=1)
    # rounding to the nearest step: half a step at most, a step being max|row| / 127
    assert ((back - w).abs().amax(dim=1) <= row_max / 254 * (1 + 1e-5) + 1e-30).all()
    assert (back[5] == 0).all()
    assert (q.abs().amax(dim=1)[row_max > 0] == 127).all()  # each row uses the whole range


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_f,in_f", [(96, 64), (97, 48), (3, 33), (8, 1280), (130, 5)])
def test_kernel_computes_linear_with_the_dequantized_weights(out_f, in_f, threads):
    """Our kernel: fp32 activations, so it matches F.linear to fp32 roundoff, whatever the shape (tiles of 64
    output channels, the last one padded; any input width; rows in groups of 4 and one by one) and the thread
    count."""
    assert int8._kernel() is not None, "this machine's C compiler should build the kernel"
    g = torch.Generator().manual_seed(out_f * in_f)
    qw = quantize_int8(torch.randn(out_f, in_f, generator=g))
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 3, 6, INT8_KERNEL_MAX_ROWS):  # groups of 4 rows and the rows left over
            x = torch.randn(rows, in_f, generator=g)
            ref = F.linear(x, dequantized(qw))
            y = int8_matmul(x, qw)
            assert y.shape == ref.shape and torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
            assert torch.equal(matmul(x[None], qw)[0], y)  # the decode path's product is this one
            assert torch.equal(int8_matmul(x.view(rows, 1, in_f), qw).view(rows, -1), y)  # any leading shape
    finally:
        torch.set_num_threads(n)


def test_many_rows_dequantize_for_one_gemm():
    g = torch.Generator().manual_seed(1)
    qw = quantize_int8(torch.randn(64, 96, generator=g))
    x = torch.randn(INT8_KERNEL_MAX_ROWS + 1, 96, generator=g)
    assert torch.allclose(int8_matmul(x, qw), F.linear(x, dequantized(qw)), atol=1e-5)


def test_without_our_kernel_torch_takes_over(monkeypatch):
    """No kernel built: torch's int8 kernel for few rows (bf16 activations: ~2^-9 of each product), and widths it
    cannot take (not a multiple of 32: it has no loop tail) dequantize instead."""
    monkeypatch.setattr(int8, "_kernel", lambda: None)
    g = torch.Generator().manual_seed(2)
    qw = quantize_int8(torch.randn(96, 64, generator=g))
    for rows in (1, 3, INT8_KERNEL_MAX_ROWS):
        x = torch.randn(rows, 64, generator=g)
        ref = F.linear(x, dequantized(qw))
        y = int8_matmul(x, qw)
        assert torch.allclose(y, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
        assert not torch.allclose(y, ref, rtol=1e-6, atol=1e-6)  # bf16 activations: it really was torch's kernel
    odd = quantize_int8(torch.randn(16, 48, generator=g))
    x = torch.randn(1, 48, generator=g)
    assert torch.allclose(int8_matmul(x, odd), F.linear(x, dequantized(odd)), atol=1e-5)


@needs_cc
def test_build_is_cached_and_follows_the_source(tmp_path, monkeypatch):
    first = build_kernel(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build_kernel(tmp_path) == first and first.stat().st_mtime_ns == stamp  # built once, then reused
    edited = tmp_path / "edited.c"
    edited.write_text(int8.KERNEL_SOURCE.read_text() + "\n/* an edit */\n")
    monkeypatch.setattr(int8, "KERNEL_SOURCE", edited)
    assert build_kernel(tmp_path) != first  # another source, another build
    assert sorted(p.name.startswith("int8_linear-") for p in tmp_path.glob("*.so")) == [True, True]


@needs_cc
def test_failed_build_leaves_nothing_and_says_why(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(int8, "KERNEL_SOURCE", broken)
    with pytest.raises(subprocess.CalledProcessError) as e:
        build_kernel(tmp_path / "kernels")
    assert "error" in e.value.stderr
    assert list((tmp_path / "kernels").iterdir()) == []  # no half-written library, no temp file

    # no compiler at all: one line on stderr, and int8_matmul still answers (torch's kernel)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    int8._kernel.cache_clear()
    try:
        assert int8._kernel() is None
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no C compiler" in err and "no-such-cc" in err
        qw = quantize_int8(torch.randn(32, 64))
        x = torch.randn(1, 64)
        ref = F.linear(x, dequantized(qw))
        assert torch.allclose(int8_matmul(x, qw), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    finally:
        int8._kernel.cache_clear()
