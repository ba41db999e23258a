#!/usr/bin/env bash
# Creates .venv (once), installs the pinned requirements and builds mace_kernels with its C++
# extension in place. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check -r requirements/dev.txt
# open-clip-torch only provides the CLIP BPE vocabulary file; --no-deps keeps torchvision out.
python -m pip install -q --disable-pip-version-check --no-deps open-clip-torch==3.3.0
python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
python -c "import mace_kernels, json; print('mace_kernels backends:', json.dumps({k: v['available'] for k, v in mace_kernels.backends().items()}))"
