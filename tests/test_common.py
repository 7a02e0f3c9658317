"""picochat.common: replacing a folder as a whole."""
import os

import pytest

from picochat.common import replacing_dir, umask


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
