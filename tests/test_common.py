"""picochat.common: atomic writes of files and folders, the umask, the autocast factory."""
import hashlib
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch

from picochat import common
from picochat.common import (atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_stream,
                             replacing_dir, umask)


def _fsyncs(monkeypatch):
    """Record, for every fsync, whether it was of a folder and the folder's entries at that moment."""
    seen, real = [], os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        seen.append(sorted(os.listdir(fd)) if stat.S_ISDIR(st.st_mode) else None)
        real(fd)
    monkeypatch.setattr(common.os, "fsync", fsync)
    return seen


@pytest.mark.parametrize("write", [
    lambda p: atomic_write_bytes(p, b"hello"),
    lambda p: atomic_write_json(p, {"a": 1}),
    lambda p: atomic_write_stream(p, lambda f: torch.save({"x": torch.ones(3)}, f)),
    lambda p: atomic_save(p, lambda tmp: Path(tmp).write_bytes(b"x")),
])
def test_atomic_writes_fsync_the_file_then_the_folder_after_the_rename(tmp_path, monkeypatch, write):
    """Each atomic write fsyncs its data, then (once the file has its final name) its folder, so the rename itself
    survives a crash; no temp file is left behind."""
    seen = _fsyncs(monkeypatch)
    write(tmp_path / "f.bin")
    assert seen[0] is None  # the file's data first
    assert seen[-1] == ["f.bin"]  # then the folder, holding the renamed file and no temp file
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_returns_the_sha256_of_what_it_wrote(tmp_path):
    """The digest is computed while writing and matches the file on disk (a torch.save writes through the stream)."""
    assert atomic_write_bytes(tmp_path / "a", b"abc") == hashlib.sha256(b"abc").hexdigest()
    digest = atomic_write_stream(tmp_path / "t.pt", lambda f: torch.save({"w": torch.randn(1000, 50), "n": 3}, f))
    assert digest == hashlib.sha256((tmp_path / "t.pt").read_bytes()).hexdigest()
    assert torch.load(tmp_path / "t.pt", weights_only=True)["n"] == 3


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def broken(f):
        f.write(b"half of the new")
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        atomic_write_stream(path, broken)

    def broken_save(tmp):
        with open(tmp, "wb") as f:
            broken(f)
    with pytest.raises(RuntimeError):
        atomic_save(path, broken_save)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_writes_give_the_usual_permissions(tmp_path):
    """mkstemp makes 0600 files; the written file gets what the umask allows, like a plain open() would."""
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a", b"x")
        atomic_save(tmp_path / "b", lambda tmp: Path(tmp).write_bytes(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o644


def test_autocast_for_runs_fp32_devices_in_fp32_even_inside_an_outer_autocast():
    """One factory for every stage and eval: bf16 autocast where compute_dtype says bf16; elsewhere autocast off."""
    autocast = common.autocast_for(torch.device("cpu"))  # compute_dtype("cpu") is fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast():
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    if common.compute_dtype("cuda") == torch.bfloat16:
        with common.autocast_for(torch.device("cuda"))():
            assert torch.get_autocast_dtype("cuda") == torch.bfloat16 and torch.is_autocast_enabled("cuda")


def test_compute_dtype_fp32_on_cpus_unless_asked_and_bf16_units_read_from_cpuinfo(monkeypatch, tmp_path):
    """fp32 on CPUs by default; PICOCHAT_DTYPE overrides, with a warning where the CPU has no bf16 units (read from
    /proc/cpuinfo's flags line), and a wrong value names itself."""
    zen4, older = tmp_path / "zen4", tmp_path / "older"  # two files: the answer is cached per file
    zen4.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 fma\n\nprocessor\t: 1\n")
    assert common.cpu_has_bf16_units(zen4)
    older.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\nbugs\t\t: amx_bf16\n")
    assert not common.cpu_has_bf16_units(older)  # the flag must be in the flags line
    assert not common.cpu_has_bf16_units(tmp_path / "absent")
    monkeypatch.delenv("PICOCHAT_DTYPE", raising=False)
    assert common.compute_dtype("cpu") == common.compute_dtype("mps") == torch.float32
    monkeypatch.setenv("PICOCHAT_DTYPE", "bfloat16")
    monkeypatch.setattr(common, "cpu_has_bf16_units", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert common.compute_dtype("cpu") == torch.bfloat16
        with common.autocast_for(torch.device("cpu"))():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setattr(common, "cpu_has_bf16_units", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        assert common.compute_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("PICOCHAT_DTYPE", "float32")
    assert common.compute_dtype("cpu") == torch.float32
    monkeypatch.setenv("PICOCHAT_DTYPE", "fp16")
    with pytest.raises(common.UserError, match="PICOCHAT_DTYPE='fp16'"):
        common.compute_dtype("cpu")


def test_current_umask_reads_without_changing_it(monkeypatch):
    """From /proc where Linux shows it (the umask never changes, not even for a moment), else by setting it back."""
    calls = []
    real = os.umask
    monkeypatch.setattr(common.os, "umask", lambda m: calls.append(m) or real(m))
    old = real(0o027)
    try:
        assert common.umask() == 0o027
        if Path("/proc/self/status").exists():
            assert calls == []
        monkeypatch.setattr(common, "Path", lambda p: Path("/nonexistent/status"))  # no /proc
        assert common.umask() == 0o027 and calls
        assert real(0o027) == 0o027
    finally:
        real(old)


def test_replacing_dir_swaps_in_the_new_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with replacing_dir(out) as tmp:
        assert tmp.parent == tmp_path and not (tmp / "old.txt").exists()
        assert (tmp.stat().st_mode & 0o777) == 0o777 & ~umask()  # not mkdtemp's 0700
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").read_text() == "old"  # untouched until the block ends
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old folder left


def test_replacing_dir_on_error_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with replacing_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("stop")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with replacing_dir(tmp_path / "a" / "fresh") as tmp:  # the parent is made, an absent out is fine
        (tmp / "x").write_text("x")
    assert (tmp_path / "a" / "fresh" / "x").read_text() == "x" and os.listdir(tmp_path / "a") == ["fresh"]


def test_replacing_dir_fsyncs_the_parent_after_the_rename(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    seen = _fsyncs(monkeypatch)
    with replacing_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert seen[-1] == ["out"]  # the parent, once the new folder has its name and the old one is gone
