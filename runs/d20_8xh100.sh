#!/usr/bin/env bash
# The "$100" run: depth 20 (897M parameters with value embeddings, 435M of them in the scaled matrices),
# 4.57B tokens of FineWeb-Edu, then SFT, RL on GSM8K and the evals, on one node of 8 H100s.
#
# Expected (estimated from FLOPs, not yet measured by picochat on GPUs): pretraining 2.886e9 FLOPs/token x
# 4.57B tokens = 1.3e19 FLOPs, about 1.0 h at 45% MFU on 8 x 989 TFLOP/s; with the download, tokenizer, evals,
# SFT and RL about 1.7 h, about $34 at $2.5/GPU-hour (8 GPUs x 1.7 h).
# The reference (nanochat's d20, 561M params) reports CORE 0.22, ARC-Easy 0.39, HumanEval 0.085, GSM8K 0.076
# after RL for ~$100: those are the figures to meet or beat. Compare yours in runs/d20/report/report.md.
#
# `picochat speedrun` starts torchrun itself when it sees 8 GPUs; the lines it runs are printed in the log
# and by `picochat speedrun --preset d20 --dry-run`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -e .          # on a GPU machine pip brings torch's CUDA build
.venv/bin/picochat speedrun --preset d20 --run d20 "$@"
