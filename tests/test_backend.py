import pytest
import torch

import mace_kernels
from mace_kernels._backend import resolve_backend


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


def test_env_var_reaches_the_ops(monkeypatch):
    """Forcing the torch backend through the environment gives the reference's result."""
    x = torch.randn(50, 9)
    monkeypatch.setenv("MACE_KERNELS_BACKEND", "triton")
    via_env, _ = mace_kernels.token_covariance(x)
    ref, _ = mace_kernels.token_covariance(x, backend="torch")
    torch.testing.assert_close(via_env, ref, rtol=1e-5, atol=1e-5)
