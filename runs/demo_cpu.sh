#!/usr/bin/env bash
# No GPU, no network: the demo preset on the synthetic curriculum that `picochat data demo` writes (prose,
# word problems with calculator steps, spelling, identity). A depth-4 model, 4M parameters.
# Measured on a 2-core CPU: 25 minutes (the README's table; dev/LOG.md). It ends with the report card's checks.
# Bring your own text instead: runs/demo_cpu.sh --data path/to/texts (txt, jsonl or parquet).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e .    # the CPU wheel
.venv/bin/picochat speedrun --preset demo "$@"
