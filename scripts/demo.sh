#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: MACE erasure of three concepts from the
# glyph-world model that ships with the package (builtin:world), on the CPU, no downloads:
# prepare -> refine -> LoRAs -> fuse -> report, then the evaluation (Acc_e, Acc_g, Acc_s, H_o).
# Extra arguments go to `mace erase` (e.g. --set max_train_steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mace cache --model builtin:world --prompts configs/world_keep_prompts.txt --out outputs/world/keep.safetensors
mace erase configs/world_erase.yaml "$@"
mace eval --config configs/world_erase.yaml --out outputs/world/eval --images-per-concept 5 --quiet
