#!/usr/bin/env bash
# One GPU: depth 12 (GPT-1 size; 286M parameters with value embeddings, 110M in the scaled matrices),
# 1.16B tokens. Gradient accumulation keeps the 524,288-token batch of the 8-GPU runs, so the result does not
# depend on the GPU count, only the time does.
#
# Expected (estimated from FLOPs, not yet measured by picochat): 7.6e8 FLOPs/token x 1.16B tokens = 8.8e17
# FLOPs, about 0.55 h of pretraining at 45% MFU on one H100 (about 3 h on an RTX 4090); about 1 h in all on an
# H100, about $2.5. Smaller GPUs: add --device-batch-size auto to the pretrain stage (picochat pretrain
# --device-batch-size auto finds the largest micro-batch that fits) or --activation-checkpointing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -e .
.venv/bin/picochat speedrun --preset d12 --run d12 "$@"
