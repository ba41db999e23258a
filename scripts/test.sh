#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite, Triton kernels included (on the CPU
# through TRITON_INTERPRET=1, set by tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report test opens report.html in headless Chromium (Debian's package).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check mace_kernels mace tests benchmarks scripts setup.py
python -m pytest tests -q "$@"
