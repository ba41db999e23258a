#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: MACE erasure of three concepts from the
# builtin small model on the CPU (no downloads): prepare -> refine -> LoRAs -> fuse -> report.
# Extra arguments go to `mace erase` (e.g. --set max_train_steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mace erase configs/demo_tiny.yaml "$@"
