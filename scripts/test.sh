#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite, Triton kernels included (on the CPU
# through TRITON_INTERPRET=1, set by tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check mace_kernels mace tests benchmarks setup.py
python -m pytest tests -q "$@"
