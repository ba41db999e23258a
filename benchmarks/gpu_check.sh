#!/usr/bin/env bash
# On a CUDA machine that already has torch and triton: build nothing (the C++ backend is for
# CPUs), check the Triton kernels against the torch reference on the GPU, then benchmark.
# Results go to $OUT (or benchmarks/results/) for committing under benchmarks/results/.
#
# Each step has its own time limit (seconds; GPU_CHECK_LIMIT_SCALE multiplies them), so a step
# that hangs leaves the others' results; the whole script stays within about 12 minutes.
# A machine without network access that lacks some of the package's Python dependencies
# (diffusers; open-clip-torch, whose CLIP vocabulary file the builtin models' tokenizer reads;
# or one of their own dependencies) can take them as wheels (benchmarks/gpu_wheels.py downloads
# them): MACE_WHEELS=FOLDER installs each FOLDER/*.whl whose distribution is missing here or
# older (no dependency resolution, no index) into a private folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MACE_KERNELS_NO_EXTENSION=1 PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
scale="${GPU_CHECK_LIMIT_SCALE:-1}"
status=0

step() {  # step SECONDS LOG COMMAND...: run with a limit, output to the terminal and to LOG
    local limit log rc
    limit=$(python3 -c "print(max(1, round($1 * $scale)))")
    log=$2
    shift 2
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "TIMED OUT after ${limit}s: $*" | tee -a "$log"
    fi
    [ "$rc" -eq 0 ] || status=1
}

if [ -n "${MACE_WHEELS:-}" ]; then
    site=$(mktemp -d)
    # A distribution this machine has at the same or a newer version keeps its own install.
    mapfile -t wheels < <(python3 benchmarks/gpu_wheels.py select "$MACE_WHEELS")
    echo "MACE_WHEELS: installing ${#wheels[@]} wheel(s): ${wheels[*]##*/}"
    if [ "${#wheels[@]}" -gt 0 ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]}" \
            && export PYTHONPATH="$PYTHONPATH:$site"
    fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
step 240 "$out/gpu_check.txt" python3 benchmarks/gpu_check.py
step 150 "$out/kernels-gpu.txt" python3 benchmarks/bench_kernels.py --device cuda --out "$out/kernels-gpu.json"
# The whole workflow on the GPU: `mace erase` of 10 glyph-world concepts (and 1 vs 2 ranks under
# torchrun when the machine has two GPUs). It needs the package's Python dependencies
# (diffusers, transformers, open-clip-torch's vocabulary); a machine without them says so.
# Python's exit status decides (an import may warn on stderr and still work).
if imported=$(python3 -c "import yaml, mace.erase, mace.stages.cache, mace.utils.tokenizer as t; t.clip_bpe_path()" 2>&1); then
    gpus=$(nvidia-smi -L | wc -l)
    procs=1; [ "$gpus" -ge 2 ] && procs=1,2
    step 150 "$out/erase_scaling-gpu.txt" python3 benchmarks/bench_erase_scaling.py --device cuda --sizes 10 \
        --processes "$procs" --out "$out/erase_scaling-gpu.json"
    # SD 1.4's real shapes (random weights, built from configs): cache, then every erase stage.
    step 200 "$out/real_shapes-gpu.txt" python3 benchmarks/bench_real_shapes.py --device cuda \
        --out "$out/real_shapes-sd14-shapes-cuda.json"
else
    echo "mace erase on the GPU skipped: the package does not import here ($(tail -n 1 <<<"$imported")); see MACE_WHEELS" \
        | tee "$out/erase_scaling-gpu.txt"
    status=1
fi
exit "$status"
