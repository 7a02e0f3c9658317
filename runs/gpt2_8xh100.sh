#!/usr/bin/env bash
# The GPT-2-tier run: depth 24 (1.38B parameters with value embeddings, 730M in the scaled matrices), 7.66B
# tokens, aiming at GPT-2's CORE (0.2565), on one node of 8 H100s.
#
# Expected (estimated from FLOPs, not yet measured by picochat on GPUs): 4.775e9 FLOPs/token x 7.66B tokens =
# 3.7e19 FLOPs, about 2.9 h of pretraining at 45% MFU on 8 H100s; about 3.6 h in all, about $72 at
# $2.5/GPU-hour. The reference's 2026 version reaches CORE 0.2565 in 1.65 h of pretraining.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -e .
.venv/bin/picochat speedrun --preset gpt2 --run gpt2 "$@"
