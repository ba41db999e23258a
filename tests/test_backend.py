import importlib

import pytest
import torch
from conftest import ALL_BACKENDS

import mace_kernels
from mace_kernels._backend import resolve_backend

# Each op module's dispatch table: backend name -> implementation (or a tuple of primitives).
DISPATCH_TABLES = {
    "token_covariance": "_IMPLEMENTATIONS",
    "spd_solve": "_IMPLEMENTATIONS",
    "closed_form_edit": "_IMPLEMENTATIONS",
    "fuse_loras": "_IMPLEMENTATIONS",
    "lora_apply": "_PRIMITIVES",
}


def test_every_backend_is_available():
    """The test suite runs every backend: a missing extension must fail, not skip."""
    info = mace_kernels.backends()
    for name in ALL_BACKENDS:
        assert info[name]["available"], f"backend {name} unavailable: {info[name]['error']}"


def test_default_on_cpu_is_cpp():
    assert resolve_backend(None, torch.device("cpu")) == "cpp"


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("MACE_KERNELS_BACKEND", "torch")
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    # An explicit argument wins over the environment.
    assert resolve_backend("cpp", torch.device("cpu")) == "cpp"


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend backend='cuda'"):
        mace_kernels.token_covariance(torch.randn(3, 4), backend="cuda")
    monkeypatch.setenv("MACE_KERNELS_BACKEND", "tritn")
    with pytest.raises(ValueError, match=r"MACE_KERNELS_BACKEND='tritn'"):
        mace_kernels.token_covariance(torch.randn(3, 4))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))


def test_cpp_refuses_cuda_tensors():
    with pytest.raises(ValueError, match="CPU tensors only"):
        resolve_backend("cpp", torch.device("cuda"))


def _record_dispatch(monkeypatch) -> list[tuple[str, str, str]]:
    """Wrap every backend's implementations of every op; each call appends (op, backend, function)."""
    calls: list[tuple[str, str, str]] = []

    def recording(op, backend, fn):
        def wrapper(*args, **kwargs):
            calls.append((op, backend, fn.__name__))
            return fn(*args, **kwargs)

        return wrapper

    for op, table_name in DISPATCH_TABLES.items():
        table = getattr(importlib.import_module(f"mace_kernels.{op}"), table_name)
        assert set(table) == set(ALL_BACKENDS), op
        for backend, impl in list(table.items()):
            if isinstance(impl, tuple):
                wrapped = tuple(recording(op, backend, fn) for fn in impl)
            else:
                wrapped = recording(op, backend, impl)
            monkeypatch.setitem(table, backend, wrapped)
    return calls


def _call_every_op():
    """Each op once on tiny inputs, without backend=; lora_apply forward and backward."""
    M = torch.randn(12, 6, dtype=torch.float64)
    M = M.T @ M + torch.eye(6, dtype=torch.float64)
    mace_kernels.spd_solve(M, torch.randn(3, 6, dtype=torch.float64))
    mace_kernels.closed_form_edit([torch.randn(4, 6), torch.randn(2, 6)], torch.randn(6, 6))
    mace_kernels.fuse_loras([torch.randn(2, 1, 6)], [torch.randn(2, 3, 1)], torch.randn(2, 6, 6))
    x = torch.randn(5, 6, requires_grad=True)
    A = torch.randn(2, 1, 6, requires_grad=True)
    B = torch.randn(2, 3, 1, requires_grad=True)
    mace_kernels.lora_apply(x, torch.randn(3, 6), A, B, [2, 3]).sum().backward()


@pytest.mark.parametrize("env,expected", [("torch", "torch"), ("triton", "triton"), ("cpp", "cpp"), ("auto", "cpp")])
def test_env_var_reaches_the_ops(monkeypatch, env, expected):
    """MACE_KERNELS_BACKEND decides which implementation runs, in every op (observed, not inferred
    from the numbers, which every backend shares)."""
    calls = _record_dispatch(monkeypatch)
    x = torch.randn(50, 9)
    monkeypatch.setenv("MACE_KERNELS_BACKEND", env)
    via_env, _ = mace_kernels.token_covariance(x)
    _call_every_op()
    assert {op for op, _, _ in calls} == set(DISPATCH_TABLES), calls
    assert {backend for _, backend, _ in calls} == {expected}, calls
    # lora_apply's backward ran through the same backend's primitives (shrink, expand, outer).
    assert len({fn for op, _, fn in calls if op == "lora_apply"}) == 3, calls
    calls.clear()
    ref, _ = mace_kernels.token_covariance(x, backend="torch")
    assert [(op, backend) for op, backend, _ in calls] == [("token_covariance", "torch")]
    torch.testing.assert_close(via_env, ref, rtol=1e-5, atol=1e-5)


def test_backend_argument_wins_over_the_env_var(monkeypatch):
    calls = _record_dispatch(monkeypatch)
    monkeypatch.setenv("MACE_KERNELS_BACKEND", "triton")
    mace_kernels.token_covariance(torch.randn(5, 3), backend="torch")
    mace_kernels.closed_form_edit([torch.randn(4, 6)], torch.randn(6, 6), backend="cpp")
    assert [(op, backend) for op, backend, _ in calls] == [("token_covariance", "torch"), ("closed_form_edit", "cpp")]
