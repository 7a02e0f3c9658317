import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.cli import main
from picochat.pretrain import derive_hparams, scaling_params

TINY = ["--depth", "2", "--head-dim", "32", "--seq-len", "64", "--device-batch-size", "4",
        "--total-batch-size", "512", "--eval-tokens", "2048", "--log-every", "5"]


@pytest.fixture
def setup(tmp_path, webtext_tokenizer, data_root):
    home = tmp_path / "home"
    shutil.copytree(webtext_tokenizer, home / "runs" / "t" / "tokenizer")
    return home, data_root / "webtext" / "shards"


def run_cli(home, *args):
    env = dict(os.environ, PICOCHAT_HOME=str(home), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "picochat", *args], env=env, capture_output=True, text=True, timeout=600)


def losses(path):
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_bpb")) for r in rows]


def test_derived_hyperparameters():
    d12 = derive_hparams(12, 32768)
    assert d12["total_batch_size"] == 2 ** 19 and abs(d12["lr_scale"] - 1) < 1e-12
    assert abs(d12["weight_decay"] - 0.28) < 1e-12
    assert d12["tokens"] == int(10.5 * scaling_params(12, 32768))
    d20, d26 = derive_hparams(20, 32768), derive_hparams(26, 32768)
    assert d20["total_batch_size"] == 2 ** 20 and d26["total_batch_size"] == 2 ** 20
    assert d20["weight_decay"] < 0.28 and d20["tokens"] > d12["tokens"]
    assert scaling_params(20, 32768) == 20 * 12 * 1280 ** 2 + 1280 * 32768


def test_mfu_peak_keeps_the_best_measurement(monkeypatch):
    """A start on a busy machine measures a low matmul peak: it must not replace the better one on record
    (every MFU after it would be inflated)."""
    import torch
    from picochat import common
    cpu = torch.device("cpu")
    for measured, expected in ((100e9, 100e9), (40e9, 100e9), (120e9, 120e9), (50e9, 120e9)):
        monkeypatch.setattr(common, "measure_matmul_flops", lambda *a, **k: measured)
        assert common.peak_flops(cpu) == expected


def test_loss_falls_on_webtext(setup):
    home, data = setup
    # LRs scale with sqrt(batch / 2^19); at this tiny batch, raise the base LRs to move in 40 steps
    r = run_cli(home, "pretrain", "--run", "t", "--data", str(data), *TINY, "--num-iterations", "40",
                "--eval-every", "40", "--save-every", "40", "--matrix-lr", "0.3", "--embedding-lr", "3",
                "--unembedding-lr", "0.1")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in (home / "runs/t/base/metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "loss" in r]
    bpb = [r["val_bpb"] for r in rows if "val_bpb" in r]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.5
    assert bpb[-1] < bpb[0] - 0.3
    summary = json.loads((home / "runs/t/base/summary.json").read_text())
    assert summary["val_bpb"] == bpb[-1]


def test_kill_9_and_resume_is_bit_identical(setup, tmp_path):
    home, data = setup
    args = ["pretrain", "--run", "t", "--data", str(data), *TINY, "--num-iterations", "12", "--eval-every", "4",
            "--save-every", "3"]
    ref = run_cli(home, *args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    env = dict(os.environ, PICOCHAT_HOME=str(home), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "picochat", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "meta_000006.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "meta_000012.json").exists(), "the run finished before it could be killed"
    resumed = run_cli(home, *args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stdout
    assert losses(out / "metrics.jsonl") == losses(tmp_path / "ref" / "metrics.jsonl")


def test_truncated_checkpoint_is_detected(setup, tmp_path):
    home, data = setup
    args = ["pretrain", "--run", "t", "--data", str(data), *TINY, "--num-iterations", "4", "--eval-every", "0",
            "--save-every", "2", "--out", str(tmp_path / "c")]
    assert run_cli(home, *args).returncode == 0
    weights = tmp_path / "c" / "model_000004.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    r = run_cli(home, *args, "--num-iterations", "6", "--resume")
    assert r.returncode == 2
    assert "truncated" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "c" / "model_000002.safetensors").exists()  # nothing else was touched


def test_bad_inputs_give_one_clear_line(setup, tmp_path, capsys):
    home, data = setup
    cases = [
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--data", str(tmp_path)], "at least 2"),
        (["--depth", "0"], "--depth must be at least 1"),
        (["--total-batch-size", "1000"], "not a multiple"),
        (["--window-pattern", "SXL"], "window-pattern"),
        (["--tokenizer", str(tmp_path / "none")], "no tokenizer"),
        (["--flex-attention", "--window-pattern", "SL"], "--flex-attention needs a CUDA GPU"),
    ]
    notext = tmp_path / "notext"
    notext.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"body": ["x"]}), notext / f"shard_{i:05d}.parquet")
    cases.append((["--data", str(notext)], "no 'text' column"))
    for extra, msg in cases:
        argv = ["pretrain", "--run", "t", "--data", str(data), *TINY, "--num-iterations", "1", *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and len(err.splitlines()) == 1, (extra, err)
