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
# The whole workflow on the GPU: `mace erase` of 10 glyph-world concepts (and 1 vs 2 ranks under
# torchrun when the machine has two GPUs). It needs the package's Python dependencies
# (diffusers, transformers); a machine without them says so and stops here.
if python3 -c "import diffusers, transformers, safetensors, yaml" 2>/dev/null; then
    gpus=$(nvidia-smi -L | wc -l)
    procs=1; [ "$gpus" -ge 2 ] && procs=1,2
    python3 benchmarks/bench_erase_scaling.py --device cuda --sizes 10 --processes "$procs" \
        --out "$out/erase_scaling-gpu.json" 2>&1 | tee "$out/erase_scaling-gpu.txt"
else
    echo "mace erase on the GPU skipped: diffusers/transformers/pyyaml are not installed here" | tee "$out/erase_scaling-gpu.txt"
fi
