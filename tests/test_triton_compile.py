"""The Triton kernels compile for a GPU (sm_90) without one, and the GPU check reports each case.

The rest of the suite runs the kernels in Triton's interpreter, which never takes the GPU tile
configs, the fp16/bf16 tensor-core dot or the atomic token split. Here the real compiler builds
every kernel specialization that benchmarks/gpu_check.py's cases reach, down to a cubin.
"""

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

# Every compile-time switch of each kernel; each must be compiled both ways.
SWITCHES = {
    "_outer_kernel": ("HAS_W", "HAS_PERM", "ATOMIC", "NATIVE_DOT", "ACC_F64"),
    "_grouped_matmul_kernel": ("HAS_SECOND", "ACCUMULATE", "NATIVE_DOT", "ACC_F64"),
    "_trsm_kernel": ("ACC_F64",),
}


@pytest.mark.slow
def test_every_kernel_specialization_compiles_for_sm90(tmp_path):
    out = tmp_path / "compiled.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_triton_kernels.py"), "--arch", "90",
                           "--json", str(out)], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["failures"] == [] and result["over_shared_memory"] == []
    compiled = result["compiled"]
    for kernel, switches in SWITCHES.items():
        mine = [k for k in compiled if k["kernel"] == kernel]
        assert mine, f"{kernel} was never compiled"
        for switch in switches:
            assert {k["constexprs"][switch] for k in mine} == {False, True}, f"{kernel}: {switch} not compiled both ways"
        assert all(k["arch"] == 90 and k["cubin_bytes"] > 0 and 0 < k["shared_bytes"] <= 232448 for k in mine)
    # The tensor-core dot is compiled for both half types, each with both operands in that type.
    native = [k for k in compiled if k["constexprs"].get("NATIVE_DOT")]
    assert {t for k in native for t in k["pointer_types"]} >= {"*fp16", "*bf16"}
    # Each op's cases reached the compiler (fp16 LoRA gradients failed here before the fix).
    cases = {k["case"].split()[0] for k in compiled}
    assert cases == {"token_covariance", "closed_form_edit", "fuse_loras", "lora_apply", "spd_solve"}
    assert any(k["case"].startswith("lora_apply fwd+bwd float16") and k["kernel"] == "_outer_kernel" for k in compiled)


def test_compile_script_refuses_the_interpreter_and_unknown_targets():
    script = str(ROOT / "scripts" / "compile_triton_kernels.py")
    interpreted = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "TRITON_INTERPRET": "1"})
    assert interpreted.returncode == 2 and "unset TRITON_INTERPRET" in interpreted.stderr
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    unknown = subprocess.run([sys.executable, script, "--arch", "75"], capture_output=True, text=True, timeout=120, env=env)
    assert unknown.returncode == 2 and "--arch: choose among" in unknown.stderr and "Traceback" not in unknown.stderr


def test_gpu_check_reports_every_case_and_goes_on_after_a_failure():
    def raises(backend):
        if backend == "triton":
            raise RuntimeError("PassManager::run failed\nmore detail")
        return torch.zeros(2)

    cases = [
        gpu_check.KernelCase("raises", torch.float32, raises),
        gpu_check.KernelCase("differs", torch.float32, lambda b: torch.ones(2) * (1.0 if b == "torch" else 1.01)),
        gpu_check.KernelCase("agrees", torch.float32, lambda b: torch.ones(3)),
    ]
    printed = io.StringIO()
    with redirect_stdout(printed):
        ok = gpu_check.run_cases(cases)
    lines = printed.getvalue().splitlines()
    assert not ok and len(lines) == 3
    assert lines[0].startswith("ERR raises") and lines[0].endswith("RuntimeError: PassManager::run failed")
    assert lines[1].startswith("BAD differs") and "1.00e-02" in lines[1]
    assert lines[2].startswith("ok  agrees")
    with redirect_stdout(io.StringIO()):
        assert gpu_check.run_cases(cases[2:])


def test_gpu_check_cases_cover_every_op_and_dtype():
    names = [c.name for c in gpu_check.kernel_cases("meta")]
    for op in ("token_covariance", "closed_form_edit", "fuse_loras", "lora_apply", "spd_solve"):
        for dtype in ("float32", "float64") + (() if op == "spd_solve" else ("float16", "bfloat16")):
            assert any(n.startswith(op) and dtype in n for n in names), (op, dtype)
