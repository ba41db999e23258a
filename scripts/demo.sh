#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: for now the kernel benchmark on this
# machine's device, which prints a table and writes JSON under benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python benchmarks/bench_kernels.py "$@"
