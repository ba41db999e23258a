import importlib
import warnings

import pytest
import torch
from conftest import ALL_BACKENDS

import mace_kernels
from mace_kernels._backend import interpreter_conflict, select_backend

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


@pytest.mark.parametrize("triton_version, numpy_version, conflict", [
    ("3.6.0", "2.4.6", True),       # torch 2.11 pins Triton 3.6: its interpreter int()s arrays
    ("3.5.1", "2.5.0rc1", True),
    ("3.6.0", "2.3.5", False),      # NumPy before 2.4 only warns
    ("3.7.0", "2.4.0", False),      # Triton 3.7's interpreter squeezes first
    ("3.9.0+git8a1b2c3", "2.4.6", False),
])
def test_interpreter_conflict_names_both_versions(triton_version, numpy_version, conflict):
    message = interpreter_conflict(triton_version, numpy_version)
    assert (message is not None) == conflict
    if conflict:
        assert f"Triton {triton_version}" in message and f"NumPy {numpy_version}" in message
        assert "triton>=3.7 or numpy<2.4" in message


def test_default_on_cpu_is_cpp():
    assert select_backend(None, torch.device("cpu"))[0] == "cpp"


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("MACE_KERNELS_BACKEND", "torch")
    assert select_backend(None, torch.device("cpu"))[0] == "torch"
    # An explicit argument wins over the environment.
    assert select_backend("cpp", torch.device("cpu"))[0] == "cpp"


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend backend='cuda'"):
        mace_kernels.token_covariance(torch.randn(3, 4), backend="cuda")
    monkeypatch.setenv("MACE_KERNELS_BACKEND", "tritn")
    with pytest.raises(ValueError, match=r"MACE_KERNELS_BACKEND='tritn'"):
        mace_kernels.token_covariance(torch.randn(3, 4))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        select_backend("triton", torch.device("cpu"))[0]


def test_cpp_refuses_cuda_tensors():
    with pytest.raises(ValueError, match="CPU tensors only"):
        select_backend("cpp", torch.device("cuda"))[0]


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


@pytest.fixture
def triton_by_default(monkeypatch):
    """Make Triton the default on the CPU (the interpreter runs it), as it is on CUDA, with a
    clean record of failed kernels."""
    from mace_kernels import _backend

    monkeypatch.setattr(_backend, "_default_backend", lambda device: "triton")
    monkeypatch.setattr(_backend, "_TRITON_FAILURES", {})
    return _backend


def _broken(op, table, monkeypatch, calls):
    """Replace the op's Triton entry by one that fails as a compile error would."""

    def fail(*args, **kwargs):
        calls.append(op)
        raise RuntimeError("PassManager::run failed\nmore compiler output")

    entry = table["triton"]
    monkeypatch.setitem(table, "triton", tuple(fail for _ in entry) if isinstance(entry, tuple) else fail)


def test_a_failing_default_triton_kernel_falls_back_to_torch(triton_by_default, monkeypatch):
    """Every op: a default Triton kernel that fails gives the torch result, one warning naming
    the op and the error, and later calls go straight to torch."""
    failed: list[str] = []
    for op, table_name in DISPATCH_TABLES.items():
        _broken(op, getattr(importlib.import_module(f"mace_kernels.{op}"), table_name), monkeypatch, failed)
    x = torch.randn(7, 5, dtype=torch.float64)
    with pytest.warns(mace_kernels.TritonFallbackWarning) as record:
        first, _ = mace_kernels.token_covariance(x)
        _call_every_op()
    torch.testing.assert_close(first, x.T @ x)
    messages = [str(w.message) for w in record]
    assert len(messages) == len(DISPATCH_TABLES), messages
    for op in DISPATCH_TABLES:
        (line,) = [m for m in messages if m.startswith(f"mace_kernels.{op}:")]
        assert "RuntimeError: PassManager::run failed" in line and "more compiler output" not in line
    assert set(mace_kernels.triton_failures()) == set(DISPATCH_TABLES)
    # The Triton kernels were tried once each (lora_apply's forward: its first primitive).
    assert sorted(failed) == sorted(DISPATCH_TABLES), failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        got, _ = mace_kernels.token_covariance(x)
    torch.testing.assert_close(got, x.T @ x)
    assert failed.count("token_covariance") == 1


def test_lora_apply_falls_back_with_the_same_values_and_gradients(triton_by_default, monkeypatch):
    module = importlib.import_module("mace_kernels.lora_apply")

    failed: list[str] = []
    _broken("lora_apply", module._PRIMITIVES, monkeypatch, failed)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    A = torch.randn(3, 2, 6, generator=g, dtype=torch.float64)
    B = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)

    def run(backend):
        leaves = [t.clone().requires_grad_() for t in (x, A, B)]
        y = mace_kernels.lora_apply(leaves[0], W, leaves[1], leaves[2], [4, 0, 5], scale=0.5, backend=backend)
        y.pow(2).sum().backward()
        return [y.detach()] + [t.grad for t in leaves]

    with pytest.warns(mace_kernels.TritonFallbackWarning, match="mace_kernels.lora_apply"):
        fallen = run(None)
    for got, want in zip(fallen, run("torch"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_named_triton_backend_never_falls_back(triton_by_default, monkeypatch):
    """Asked for by name (argument or environment), a failing kernel raises: benchmarks want to know."""
    module = importlib.import_module("mace_kernels.token_covariance")

    _broken("token_covariance", module._IMPLEMENTATIONS, monkeypatch, [])
    with pytest.raises(RuntimeError, match="PassManager"):
        mace_kernels.token_covariance(torch.randn(4, 3), backend="triton")
    monkeypatch.setenv("MACE_KERNELS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="PassManager"):
        mace_kernels.token_covariance(torch.randn(4, 3))
    assert mace_kernels.triton_failures() == {}


def test_a_working_default_triton_kernel_is_used(triton_by_default, monkeypatch):
    calls = _record_dispatch(monkeypatch)
    mace_kernels.token_covariance(torch.randn(6, 3))
    assert [(op, backend) for op, backend, _ in calls] == [("token_covariance", "triton")]
    assert mace_kernels.triton_failures() == {}
