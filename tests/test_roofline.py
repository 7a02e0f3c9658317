"""bench/roofline.py prices with what bench/gpu_check.py measured on a GPU (--measured) in place of its published
constants. The tracer installs CUDA's autocast policy in the dispatcher, so it runs in a subprocess."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEAK = 989.4e12
# a config whose matmuls are compute-bound on an H100: width 1024, 8 x 1024 tokens per micro-batch, vocab 4096
C, TOKENS, V = 1024, 8 * 1024, 4096
FLAGS = ["--depth", "1", "--aspect-ratio", "1024", "--head-dim", "128", "--seq-len", "1024", "--device-batch-size",
         "8", "--vocab-size", str(V), "--world-size", "1", "--fused"]


def gpu_check_line(gemm_eff):
    """A gpu_check.jsonl micro line as bench/gpu_check.py writes it, for this config's matmul shapes (M, N, K):
    the block linears (forward, input and weight gradients) and the lm_head (one chunk: the whole micro-batch)."""
    shapes = []
    for n_out, n_in in ((C, C), (4 * C, C), (C, 4 * C)):
        shapes += [(TOKENS, n_out, n_in), (TOKENS, n_in, n_out), (n_out, n_in, TOKENS)]
    shapes += [(V, TOKENS, C), (TOKENS, C, V), (V, C, TOKENS)]
    roofline = {"gemm": [{"mnk": list(s), "tflops": gemm_eff * PEAK / 1e12} for s in shapes],
                "copy_gbps": 0.5 * 3350, "kernel_us": 8.0, "device": "NVIDIA H100 80GB HBM3"}
    B, T, H, D = 4, 2048, 10, 128  # full causal SDPA at 20% of peak: 3.5 x 4 B H D x T(T+1)/2 FLOPs
    sdpa_ms = 1e3 * 3.5 * 4 * B * H * D * (T * (T + 1) // 2) / (0.2 * PEAK)
    return json.dumps({"section": "micro", "n": 3, "ok": True, "attn_shape": [B, T, H, D, T // 4],
                       "sdpa_full": {"ms": sdpa_ms}, "fa3_window": "not installed", "roofline": roofline})


def roofline(*args):
    return subprocess.run([sys.executable, "bench/roofline.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_measured_figures_price_the_step(tmp_path):
    path = tmp_path / "gpu_check.jsonl"
    path.write_text(json.dumps({"section": "environment", "n": 1, "ok": True}) + "\n" + gpu_check_line(0.4) + "\n")
    r = roofline(*FLAGS, "--measured", str(path))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[0])
    measured = out["assumptions"]["measured"]
    # every block and lm_head product found its shape; only Muon's small Newton-Schulz products did not
    assert measured["matmul_flops_at_measured_shapes"] > 0.9, measured
    assert out["assumptions"]["bw_eff"] == pytest.approx(0.5) and out["assumptions"]["launch_us"] == pytest.approx(8)
    assert out["assumptions"]["attention_eff"]["flash2"] == pytest.approx(0.2)
    # the block GEMMs at 40% of peak, where the published --mm-eff is 80%: at least twice the time that would give
    block = out["groups"]["block GEMMs"]
    assert block["ms"] >= 1e3 * block["flops"] / (0.4 * PEAK)
    assert block["ms"] > 1.9 * 1e3 * block["flops"] / (0.8 * PEAK)
    assert "priced with the figures measured in" in r.stderr


def test_a_file_without_measured_figures_is_refused(tmp_path):
    path = tmp_path / "gpu_check.jsonl"
    path.write_text(json.dumps({"section": "micro", "n": 3, "ok": False, "skipped": "estimate 75s > 10s left"}) + "\n")
    r = roofline(*FLAGS, "--measured", str(path))
    assert r.returncode != 0 and "no micro section with roofline figures" in r.stderr
    path.write_text("not json\n")
    r = roofline(*FLAGS, "--measured", str(path))
    assert r.returncode != 0 and "cannot read it as gpu_check.jsonl" in r.stderr
