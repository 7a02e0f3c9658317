import json
import re

import pytest
from PIL import Image

from picochat.cli import main
from picochat.common import home_dir
from picochat.report import stage_cost


def write_jsonl(path, rows, extra=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)


@pytest.fixture
def fake_run():
    run = home_dir() / "runs" / "r"
    base, sft = run / "base", run / "sft"
    write_jsonl(base / "metrics.jsonl",
                [{"step": s, "loss": 8 - s / 20, "lr_mult": 1.0, "tok_per_sec": 1e5, "mfu": 0.4, "dt": 0.1}
                 for s in range(1, 61)] + [{"step": s, "val_bpb": 2.5 - s / 100} for s in (0, 30, 60)],
                extra="{not json\n")  # a torn last line (a killed run) is skipped, not fatal
    (base / "summary.json").write_text(json.dumps({"stage": "base", "step": 60, "val_bpb": 1.9, "num_params": 123456,
                                                   "tokens": 60 * 8192, "train_seconds": 3600.0, "device": "cuda:0",
                                                   "tokens_per_sec": 5457.263, "mfu": 0.41234,
                                                   "world_size": 8, "config": {"n_layer": 4}}))
    (base / "eval_base.json").write_text(json.dumps({
        "step": 60, "val_bpb": 1.9, "core": 0.05, "core_label": "CORE (2/3 tasks)", "core_missing": ["squad"],
        "core_num_tasks": 3, "core_num_scored": 2,
        "core_tasks": {"copa": {"type": "multiple_choice", "num_fewshot": 0, "correct": 6, "total": 10,
                                "accuracy": 0.6, "baseline": 0.5, "centered": 0.2},
                       "jeopardy": {"type": "language_modeling", "num_fewshot": 10, "correct": 0, "total": 10,
                                    "accuracy": 0.0, "baseline": 0.0, "centered": -0.1}}}))
    write_jsonl(sft / "metrics.jsonl", [{"step": s, "loss": 2 - s / 50} for s in range(1, 21)] +
                [{"step": 20, "val_loss": 1.5}])
    (sft / "summary.json").write_text(json.dumps({"stage": "sft", "step": 20, "train_seconds": 120.0,
                                                  "device": "cpu", "world_size": 1, "val_loss": 1.5}))
    (run / "speedrun.json").write_text(json.dumps({"data": 5.0, "pretrain": 3600.0, "sft": 120.0}))
    (sft / "eval_chat.json").write_text(json.dumps({"step": 20, "chatcore": 0.1, "chatcore_label": "ChatCORE (2 tasks)",
        "tasks": {"ARC-Easy": {"total": 40, "accuracy": 0.325, "pass@1": 0.325, "baseline": 0.25, "centered": 0.1},
                  "DemoProblems": {"total": 20, "accuracy": 0.1, "pass@1": 0.1, "baseline": 0.0, "centered": 0.1}}}))
    return run


def test_report_card_renders(fake_run, capsys):
    assert main(["report", "--run", "r", "--price", "2.5"]) == 0
    out_dir = fake_run / "report"
    md = (out_dir / "report.md").read_text()
    links = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", md)
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", md)
    assert len(images) >= 4  # base curves, CORE bars, sft curves, chat bars
    for link in links:
        assert (out_dir / link).is_file(), link
    for img in images:
        with Image.open(out_dir / img) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
    assert "CORE (2/3 tasks)" in md and "squad" in md and "ChatCORE" in md
    assert "## Reinforcement learning\n\nnot run" in md
    assert "| device | cuda:0 x 8 |" in md and "| device | cpu x 1 |" in md  # SFT's too
    assert "| tokens_per_sec | 5,457 |" in md and "| mfu | 0.4123 |" in md  # readable numbers
    assert "| rl | not run |" in md
    assert "python / torch / picochat" in md and "git commit" in md and "GPU" in md
    report = json.loads((out_dir / "report.json").read_text())
    base, sft, rl = (report["stages"][s] for s in ("base", "sft", "rl"))
    assert base["status"] == "done" and base["core"] == 0.05 and base["val_bpb"] == 1.9
    assert base["start_val_bpb"] == 2.5  # the first validation, before training
    assert report["speedrun_seconds"]["pretrain"] == 3600.0 and "| **total** | 1h02m" in md
    assert base["cost_usd"] == pytest.approx(8 * 1.0 * 2.5) and base["gpus"] == 8
    assert sft["cost_usd"] is None and "no GPU cost" in sft["cost_note"] and sft["chatcore"] == 0.1
    assert sft["chat"] == {"ARC-Easy": 0.325, "DemoProblems": 0.1}
    assert rl["status"] == "not run"
    assert report["total_cost_usd"] == pytest.approx(20.0) and report["total_train_seconds"] == pytest.approx(3720)
    assert report["hardware"]["cpu_cores"] >= 1 and report["versions"]["torch"]
    assert "report card:" in capsys.readouterr().out


def test_report_of_an_empty_run_and_of_no_run(capsys):
    (home_dir() / "runs" / "empty").mkdir(parents=True)
    assert main(["report", "--run", "empty"]) == 0
    report = json.loads((home_dir() / "runs" / "empty" / "report" / "report.json").read_text())
    assert all(s["status"] == "not run" for s in report["stages"].values()) and report["total_cost_usd"] is None
    md = (home_dir() / "runs" / "empty" / "report" / "report.md").read_text()
    assert md.count("not run") >= 6 and "![" not in md
    assert main(["report", "--run", "nope"]) == 2
    assert "no run folder" in capsys.readouterr().err


def test_stage_cost():
    assert stage_cost({"train_seconds": 7200, "device": "cuda:0", "world_size": 8}, 2.5)[2] == pytest.approx(40.0)
    assert stage_cost({"train_seconds": 7200, "device": "cpu"}, 2.5)[2] is None
    assert stage_cost({"device": "cuda"}, 2.5) == (None, None, None, "wall time unknown")
    assert stage_cost(None, 2.5)[2] is None


def test_partial_stage_with_many_metrics():
    run = home_dir() / "runs" / "p"
    write_jsonl(run / "rl" / "metrics.jsonl",
                [{"step": s, "reward": s / 10, "trained_replies": 16, "sample_seconds": 1.5, "lr_mult": 1.0,
                  "pg_loss": -s / 100} for s in range(1, 11)] + [{"step": 10, "accuracy": 0.3, "eval_problems": 50}])
    assert main(["report", "--run", "p"]) == 0
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["stages"]["rl"]["status"] == "partial" and report["stages"]["base"]["status"] == "not run"
    from picochat.report import curve_keys, gather
    train, val, other = curve_keys(gather(run)["rl"]["metrics"])
    assert train == [] and val == [] and other == ["reward", "pg_loss", "accuracy"]  # bookkeeping left out
    md = (run / "report" / "report.md").read_text()
    assert "![rl curves](curves_rl.png)" in md
    with Image.open(run / "report" / "curves_rl.png") as im:
        assert im.size[0] > 1000  # three panels side by side


@pytest.mark.parametrize("task,title", [("demo", "Reinforcement learning (the demo's word problems)"),
                                        ("gsm8k", "Reinforcement learning (GSM8K)")])
def test_rl_section_names_its_task(task, title):
    run = home_dir() / "runs" / "t"
    (run / "rl").mkdir(parents=True)
    (run / "rl" / "summary.json").write_text(json.dumps({"stage": "rl", "task": task, "step": 5, "device": "cpu"}))
    assert main(["report", "--run", "t"]) == 0
    assert f"## {title}\n" in (run / "report" / "report.md").read_text()
