#!/usr/bin/env bash
# On a CUDA machine that already has torch and triton: build nothing (the C++ backend is for
# CPUs), check the Triton kernels against the torch reference on the GPU, then benchmark.
# Results go to $OUT (or benchmarks/results/) for committing under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MACE_KERNELS_NO_EXTENSION=1 PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 benchmarks/gpu_check.py 2>&1 | tee "$out/gpu_check.txt"
python3 benchmarks/bench_kernels.py --device cuda --out "$out/kernels-gpu.json" 2>&1 | tee "$out/kernels-gpu.txt"
