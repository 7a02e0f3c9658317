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

from picochat.checkpoint import StageSummary
from picochat.cli import main
from picochat.model import derive_hparams, scaling_params

TINY = ["--depth", "2", "--head-dim", "32", "--seq-len", "64", "--device-batch-size", "4",
        "--total-batch-size", "512", "--eval-tokens", "2048", "--log-every", "5"]


@pytest.fixture
def setup(tmp_path, webtext_tokenizer, data_root):
    home = tmp_path / "home"
    shutil.copytree(webtext_tokenizer, home / "runs" / "t" / "tokenizer")
    return home, data_root / "webtext" / "shards"


def run_cli(home, *args):
    env = dict(os.environ, PICOCHAT_HOME=str(home), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "picochat", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def losses(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
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
    rows = [json.loads(line) for line in (home / "runs/t/base/metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "loss" in r]
    bpb = [r["val_bpb"] for r in rows if "val_bpb" in r]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.5
    assert bpb[-1] < bpb[0] - 0.3
    summary = json.loads((home / "runs/t/base/summary.json").read_text())
    assert summary["val_bpb"] == bpb[-1]
    assert set(summary) <= set(StageSummary.__annotations__), "summary.json keys StageSummary lacks"


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


# ---- the GPU-first habits of the step loop, checked on the CPU ---------------------------------------------------
def test_compile_is_on_by_default_for_cuda_only():
    import torch
    from picochat.pretrain import resolve_compile
    cuda, cpu, mps = torch.device("cuda", 0), torch.device("cpu"), torch.device("mps")
    assert resolve_compile(None, cuda) is True
    assert resolve_compile(None, cpu) is False and resolve_compile(None, mps) is False
    assert resolve_compile(False, cuda) is False and resolve_compile(True, cpu) is True  # a flag given wins
    import argparse
    from picochat import pretrain
    p = argparse.ArgumentParser()
    pretrain.add_parser(p.add_subparsers())
    assert p.parse_args(["pretrain"]).compile is None
    assert p.parse_args(["pretrain", "--no-compile"]).compile is False
    assert p.parse_args(["pretrain", "--compile"]).compile is True


def test_allocator_default_never_overrides_the_user(monkeypatch):
    """init_runtime asks for expandable segments unless the user configured the allocator, under either name."""
    from picochat.common import ALLOC_CONF_VARS, init_runtime
    for name in ALLOC_CONF_VARS:  # set, then removed: monkeypatch restores each as it was
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    init_runtime("cpu")
    assert os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:256")
    init_runtime("cpu")
    assert os.environ["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:256"
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    init_runtime("cpu")
    assert "PYTORCH_ALLOC_CONF" not in os.environ  # it would take precedence over the user's older name
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"


def fake_float8_class(calls):
    """A stand-in for torchao's Float8Linear (an nn.Linear subclass from a torchao module) whose forward is
    recorded in calls and adds 1000, so that a forward that goes through it shows."""
    import gc
    import torch.nn as nn

    class Float8Linear(nn.Linear):
        def forward(self, x):
            calls.append({"training": self.training, "gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count() > 0})
            return super().forward(x) + 1000.0

    Float8Linear.__module__ = "torchao.float8.float8_linear"
    return Float8Linear


def test_bf16_linears_runs_fp8_layers_as_plain_linears():
    import copy
    import torch
    import torch.nn as nn
    from picochat.model import GPT, GPTConfig
    from picochat.fastpath import bf16_linears
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(config).init_weights(seed=0)
    ref = copy.deepcopy(model)
    calls = []
    fp8 = fake_float8_class(calls)

    class Other(nn.Linear):  # an nn.Linear subclass of someone else's: not touched
        pass
    converted = [m for name, m in model.named_modules() if name.startswith("blocks.") and type(m) is nn.Linear]
    for m in converted:
        m.__class__ = fp8  # what torchao's swap amounts to: the same weights in a Float8Linear
    model.lm_head.__class__ = Other
    params = [id(p) for p in model.parameters()]
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        want = ref(x)
        assert not torch.allclose(model(x), want)
        with bf16_linears(model):
            assert all(type(m) is nn.Linear for m in converted) and type(model.lm_head) is Other
            calls.clear()
            torch.testing.assert_close(model(x), want)
            assert not calls
        assert all(type(m) is fp8 for m in converted) and not torch.allclose(model(x), want)
        with pytest.raises(RuntimeError), bf16_linears(model):
            raise RuntimeError
        assert all(type(m) is fp8 for m in converted)
    assert [id(p) for p in model.parameters()] == params and model.state_dict().keys() == ref.state_dict().keys()


def test_step_loop_prefetches_freezes_gc_and_validates_without_fp8(setup, monkeypatch, capsys):
    """In-process, on the CPU, with a stand-in for torchao's fp8 layers: (1) each step's first micro-batch is
    packed before the previous step's loss is read and logged; (2) the GC is frozen and disabled after the first
    step, and given back after the run; (3) validation never runs the fp8 layers; (4) the config line shows
    --compile as resolved (off on a CPU)."""
    import gc
    import torch.nn as nn
    from picochat import fastpath, loader as loader_module, pretrain
    home, data = setup
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    calls, events = [], []
    fp8 = fake_float8_class(calls)

    def enable_fp8(model, device):
        for name, m in model.named_modules():
            if name.startswith("blocks.") and type(m) is nn.Linear:
                m.__class__ = fp8
        return model
    monkeypatch.setattr(fastpath, "enable_fp8", enable_fp8)
    real_next = loader_module.StepLoader.next_batch
    monkeypatch.setattr(loader_module.StepLoader, "next_batch", lambda self: events.append("batch") or real_next(self))
    real_logger = pretrain.metrics_logger

    def metrics_logger(*a, **k):
        log = real_logger(*a, **k)
        return lambda rec: (events.append("loss") if "loss" in rec else None, log(rec))
    monkeypatch.setattr(pretrain, "metrics_logger", metrics_logger)
    real_forward = fp8.forward

    def forward(self, x):  # one "fwd" per training forward (all fp8 layers of it)
        if self.training and (not events or events[-1] != "fwd"):
            events.append("fwd")
        return real_forward(self, x)
    fp8.forward = forward
    assert main(["pretrain", "--run", "t", "--data", str(data), *TINY, "--num-iterations", "3", "--eval-every", "2",
                 "--save-every", "100", "--fp8", "--out", str(home / "out")]) == 0
    # 3 steps of 2 micro-batches: the next step's first batch comes before this step's loss
    assert events == ["batch", "fwd", "batch", "fwd", "batch", "loss", "fwd", "batch", "fwd", "batch", "loss",
                      "fwd", "batch", "fwd", "loss"]
    assert calls and all(c["training"] for c in calls)  # 3 validations ran, none through the fp8 layers
    per_step = len(calls) // 3
    assert all(c["gc_enabled"] and not c["frozen"] for c in calls[:per_step])
    assert all(not c["gc_enabled"] and c["frozen"] for c in calls[per_step:])
    assert gc.isenabled() and gc.get_freeze_count() == 0
    out = capsys.readouterr().out
    assert "compile False" in out and "fp8 True" in out
    assert json.loads((home / "out" / "meta_000003.json").read_text())["args"]["compile"] is False


def test_training_samples_are_greedy_engine_completions(tok, capsys):
    """--sample-every prints each prompt with its greedy completion, decoded by the engine (the stop token dropped)."""
    import torch
    from picochat.engine import Engine
    from picochat.model import GPT, GPTConfig
    from picochat.pretrain import SAMPLE_PROMPTS, sample
    model = GPT(GPTConfig.from_depth(2, vocab_size=tok.vocab_size, sequence_len=64, head_dim=32)).init_weights(seed=0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    sample(model, tok)
    lines = capsys.readouterr().out.splitlines()
    eng = Engine(model, tok, tool=False)
    expected = []
    for p in SAMPLE_PROMPTS:
        ids = tok.encode(p, prepend_bos=True)
        out = eng.generate_batch(ids, max_tokens=16, temperature=0.0)[0][0][len(ids):]
        expected.append(f"  {p!r} -> {tok.decode([t for t in out if t not in eng.stop_ids])!r}")
    assert lines == expected and any(line.split(" -> ")[1] != "''" for line in lines)


def test_init_from_continues_an_imported_model(setup, monkeypatch, capsys):
    """--init-from: the imported reference model's weights with a fresh optimizer and schedule, on new text."""
    from pathlib import Path
    from picochat.checkpoint import load_model
    home, data = setup
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    fixture = Path(__file__).parent / "fixtures" / "nanochat_ckpt" / "nov2025_d2"
    assert main(["import", str(fixture), "--run", "ref"]) == 0
    args = ["--data", str(data), "--seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
            "--eval-tokens", "2048", "--log-every", "1", "--num-iterations", "2", "--eval-every", "100"]
    # run t has another tokenizer: refused; a new run takes the model's own
    assert main(["pretrain", "--run", "t", "--init-from", "ref", *args]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    assert main(["pretrain", "--run", "c", "--init-from", "ref:base", *args[:2], "--seq-len", "256"]) == 2
    assert "exceeds the context of the --init-from model (128)" in capsys.readouterr().err
    assert main(["pretrain", "--run", "ref", "--init-from", "ref", *args]) == 2
    assert "this run's own output folder" in capsys.readouterr().err
    assert main(["pretrain", "--run", "c", "--init-from", "ref", *args]) == 0
    rows = [json.loads(line) for line in (home / "runs/c/base/metrics.jsonl").read_text().splitlines()]
    first = [r["loss"] for r in rows if "loss" in r][0]
    assert first < 5.0  # a fresh model starts at ln(512) = 6.2; the imported one has learned webtext already
    model, tok, meta = load_model(home / "runs/c/base")
    assert meta["step"] == 2 and model.config.rope_bf16 and not model.config.resid_scalars
    assert tok.hash == load_model(home / "runs/ref/base")[1].hash


def test_save_every_0_saves_only_at_the_end(setup, monkeypatch):
    home, data = setup
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    assert main(["pretrain", "--run", "t", "--data", str(data), *TINY, "--num-iterations", "3", "--eval-every", "0",
                 "--save-every", "0"]) == 0
    assert sorted(p.name for p in (home / "runs/t/base").glob("meta_*.json")) == ["meta_000003.json"]


def test_smear_and_backout_flags_train_and_are_recorded(setup, monkeypatch):
    home, data = setup
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    assert main(["pretrain", "--run", "t", "--data", str(data), *TINY, "--num-iterations", "2", "--eval-every", "0",
                 "--save-every", "0", "--smear", "--backout"]) == 0
    meta = json.loads((home / "runs/t/base/meta_000002.json").read_text())
    assert meta["config"]["smear"] and meta["config"]["backout"]
