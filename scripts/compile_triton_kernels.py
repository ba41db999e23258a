"""Compile every Triton kernel the GPU would run, for a CUDA target, on a machine without a GPU.

    python scripts/compile_triton_kernels.py                   # sm_90 (H100/H200)
    python scripts/compile_triton_kernels.py --arch 80,90 --json compiled.json

The CPU test suite runs the kernels through Triton's interpreter, which never takes the GPU
tile configs, the fp16/bf16 tensor-core dot (``native_dot``) or the token split with atomics.
This script drives the same op calls as ``benchmarks/gpu_check.py`` (its ``kernel_cases``)
through the real Triton compiler, down to PTX and ptxas's cubin for each target, with a stand-in
driver that names the target and launches nothing: a kernel that would not compile on the GPU
fails here, and each compiled kernel's shared memory is checked against the target's limit.
It cannot show that a kernel computes the right numbers; only gpu_check.py on a GPU does.

Run it in its own process without ``TRITON_INTERPRET`` (kernels defined under the interpreter
are not compiled). Exit status 1 when any case fails to compile or exceeds the shared memory.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Shared memory one block may use (bytes, opt-in maximum) per compute capability.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class CompileOnlyDriver:
    """Triton's runtime driver for a GPU that is not there: the target, device 0, stream 0."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def ptxas_resources(log: str) -> dict:
    """Registers per thread and spilled bytes from a ``ptxas -v`` report (None when absent)."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None,
            "spill_load_bytes": int(spills.group(2)) if spills else None}


def compile_cases(arch: int) -> tuple[list[dict], list[dict]]:
    """(compiled kernels, failed cases) for compute capability ``arch``."""
    import torch
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from mace_kernels import _backend

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import error_line, kernel_cases

    compiled: list[dict] = []
    launch = JITFunction.run
    ptxas_stats: dict[int, dict] = {}  # id(compiled kernel) -> registers and spills from ptxas -v

    def compile_without_launch(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        with redirect_stdout(log):  # Triton prints ptxas's -v report (knobs.nvidia.dump_ptxas_log)
            kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        if id(kernel) not in ptxas_stats:
            ptxas_stats[id(kernel)] = ptxas_resources(log.getvalue())
        meta = kernel.metadata
        names = self.arg_names
        constants = {names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k): v
                     for k, v in sorted(kernel.src.constants.items(), key=str)}
        compiled.append({"kernel": self.__name__, "case": current[0], "arch": arch, "num_warps": meta.num_warps,
                         "num_stages": meta.num_stages, "shared_bytes": meta.shared,
                         "cubin_bytes": len(kernel.asm["cubin"]), **ptxas_stats[id(kernel)],
                         "constexprs": {k: v for k, v in constants.items() if isinstance(v, (bool, int, float, str))},
                         "pointer_types": sorted({t for t in kernel.src.signature.values() if t.startswith("*")})})
        return kernel

    current = [""]
    failures: list[dict] = []
    dump_log, knobs.nvidia.dump_ptxas_log = knobs.nvidia.dump_ptxas_log, True
    previous = driver._active  # None until a real driver was asked for (none exists here)
    driver.set_active(CompileOnlyDriver(arch))
    JITFunction.run = compile_without_launch
    # The ops accept CPU tensors for the triton backend only under the interpreter; here the
    # tensors only carry dtypes and shapes to the compiler.
    select = _backend.select_backend
    _backend.select_backend = lambda backend, device: ("triton", False)
    try:
        for case in kernel_cases("cpu"):
            current[0] = case.name
            try:
                with torch.no_grad() if "fwd+bwd" not in case.name else torch.enable_grad():
                    case.run("triton")
            except Exception as exc:
                failures.append({"case": case.name, "arch": arch, "error": error_line(exc)})
    finally:
        _backend.select_backend = select
        JITFunction.run = launch
        driver._active = previous
        knobs.nvidia.dump_ptxas_log = dump_log
    return compiled, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90", help="compute capabilities, comma-separated (80, 86, 89, 90)")
    parser.add_argument("--json", type=Path, default=None, help="write the compiled kernels and failures here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: kernels defined under the interpreter are not compiled")
    try:
        arches = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch: give compute capabilities as integers, e.g. 80,90; got {args.arch!r}")
    unknown = [a for a in arches if a not in SHARED_MEMORY_LIMIT]
    if not arches or unknown:
        parser.error(f"--arch: choose among {', '.join(map(str, SHARED_MEMORY_LIMIT))}; got {args.arch!r}")
    os.environ.setdefault("MACE_KERNELS_NO_EXTENSION", "1")
    # A fresh cache: every kernel is compiled here, not read back from an earlier run.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-compile-check-")
    sys.path.insert(0, str(ROOT))
    from mace_kernels._triton import HAS_TRITON

    if not HAS_TRITON:
        print("triton is not installed: nothing to compile", file=sys.stderr)
        return 1
    start = time.perf_counter()
    compiled, failures = [], []
    for arch in arches:
        c, f = compile_cases(arch)
        compiled += c
        failures += f
    over = [k for k in compiled if k["shared_bytes"] > SHARED_MEMORY_LIMIT[k["arch"]]]
    print(f"{'arch':>4} {'kernel':<24} {'warps':>5} {'regs':>4} {'spill B':>7} {'shared B':>9} {'cubin B':>8}  constexprs")
    seen = set()
    for k in compiled:
        key = (k["arch"], k["kernel"], json.dumps(k["constexprs"], sort_keys=True), tuple(k["pointer_types"]))
        if key in seen:
            continue
        seen.add(key)
        consts = " ".join(f"{n}={v}" for n, v in k["constexprs"].items())
        print(f"{k['arch']:>4} {k['kernel']:<24} {k['num_warps']:>5} {k['registers'] or '?':>4} "
              f"{k['spill_store_bytes'] if k['spill_store_bytes'] is not None else '?':>7} {k['shared_bytes']:>9} "
              f"{k['cubin_bytes']:>8}  {' '.join(k['pointer_types'])} {consts}")
    for f in failures:
        print(f"FAILED sm_{f['arch']} {f['case']}: {f['error']}")
    for k in over:
        print(f"OVER sm_{k['arch']} {k['kernel']} ({k['case']}): {k['shared_bytes']} B of shared memory, "
              f"limit {SHARED_MEMORY_LIMIT[k['arch']]}")
    if args.json:
        import triton

        from mace.utils.atomic import write_json_atomically

        write_json_atomically(args.json, {"triton": triton.__version__, "arches": arches, "compiled": compiled,
                                          "failures": failures, "over_shared_memory": over})
    print(f"{len(seen)} distinct kernels compiled for sm_{', sm_'.join(map(str, arches))} from "
          f"{len(compiled)} launches; {len(failures)} failed, {len(over)} over shared memory "
          f"({time.perf_counter() - start:.0f} s)")
    return 1 if failures or over else 0


if __name__ == "__main__":
    sys.exit(main())
