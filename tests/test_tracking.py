import importlib.machinery
import importlib.util
import json
import shutil
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from picochat import tracking
from picochat.cli import main
from picochat.common import UserError, metrics_logger

TINY = ["--depth", "2", "--head-dim", "32", "--seq-len", "64", "--device-batch-size", "4",
        "--total-batch-size", "512", "--eval-tokens", "2048", "--log-every", "1"]


def scalars(folder, tag):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars(tag)]


@pytest.fixture
def home(tmp_path, webtext_tokenizer, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(webtext_tokenizer, home / "runs" / "t" / "tokenizer")
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    return home


def test_pretrain_sends_its_metrics_to_tensorboard(home, data_root):
    data = data_root / "webtext" / "shards"
    assert main(["pretrain", "--run", "t", "--data", str(data), *TINY, "--num-iterations", "4", "--eval-every", "2",
                 "--log-to", "tensorboard"]) == 0
    out = home / "runs" / "t" / "base"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    bpb = [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    assert len(loss) >= 3 and len(bpb) >= 2
    assert scalars(out / "tensorboard", "base/loss") == loss
    assert scalars(out / "tensorboard", "base/val_bpb") == bpb


def test_a_resumed_run_drops_tensorboard_events_past_its_step(tmp_path):
    first = tracking.tracker("tensorboard", out=tmp_path, run="r", stage="sft", config={"lr": 1.0}, step=0, rank=0)
    for step in range(6):
        first({"step": step, "loss": float(step), "note": "text is not a scalar", "ok": True})
    again = tracking.tracker("tensorboard", out=tmp_path, run="r", stage="sft", config={"lr": 1.0}, step=3, rank=0)
    for step in range(3, 8):
        again({"step": step, "loss": 100.0 + step})
    assert scalars(tmp_path / "tensorboard", "sft/loss") == [(0, 0.0), (1, 1.0), (2, 2.0)] + [
        (s, 100.0 + s) for s in range(3, 8)]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["sft/loss"]  # strings and bools stay in metrics.jsonl


def test_wandb_gets_one_resumable_run_per_stage(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = metrics_logger(tmp_path / "metrics.jsonl", 0, 0, mirror=tracking.tracker(
        "wandb", out=tmp_path, run="mine", stage="rl", config={"lr": 0.5}, step=0, rank=0))
    log({"step": 7, "reward": 0.25, "phase": "eval", "nan": float("nan")})
    log({"step": 8, "phase": "no numbers"})
    assert calls[0] == ("init", {"project": "picochat", "name": "mine/rl", "id": "mine-rl", "resume": "allow",
                                 "dir": str(tmp_path), "config": {"lr": 0.5}})
    assert calls[1:] == [("log", {"rl/reward": 0.25}, 7)]  # non-finite and non-numeric values are not sent
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [7, 8]


def test_only_rank_0_sends_and_none_sends_nothing(tmp_path):
    assert tracking.tracker("none", out=tmp_path, run="r", stage="sft", config={}, step=0, rank=0) is None
    assert tracking.tracker("tensorboard", out=tmp_path, run="r", stage="sft", config={}, step=0, rank=1) is None
    assert not (tmp_path / "tensorboard").exists()


def test_a_missing_library_stops_the_stage_before_it_trains(home, data_root, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="pip install wandb"):
        tracking.check_available("wandb")
    data = data_root / "webtext" / "shards"
    assert main(["pretrain", "--run", "t", "--data", str(data), *TINY, "--num-iterations", "4",
                 "--log-to", "wandb"]) == 2
    assert "--log-to wandb: the wandb package is not installed; pip install wandb" in capsys.readouterr().err
    out = home / "runs" / "t" / "base"
    assert not list(out.glob("model_*")) and not (out / "metrics.jsonl").exists()
