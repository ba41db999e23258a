"""The five ops are registered torch custom ops (torch.ops.mace.*) with fake implementations.

``torch.library.opcheck`` checks each registration against its real kernel (schema, fake
tensor shapes and dtypes, autograd registration where there is one), and a function calling
the public ops compiles with ``fullgraph=True``: a graph break would fail the test.
"""

import pytest
import torch
from torch.library import opcheck

from mace_kernels import closed_form_edit, fuse_loras, lora_apply, spd_solve, token_covariance
from mace_kernels._backend import OPS_NAMESPACE

OPS = getattr(torch.ops, OPS_NAMESPACE)
# opcheck's fake-tensor and schema checks; the autograd checks where the op has a backward.
CHECKS = ("test_schema", "test_faketensor", "test_autograd_registration")


def _spd(d: int, batch: tuple[int, ...] = (), dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, d, d + 3, generator=g, dtype=dtype)
    return a @ a.transpose(-1, -2) + 0.5 * torch.eye(d, dtype=dtype)


def test_every_op_is_registered_under_the_namespace():
    for name in ("token_covariance", "closed_form_edit", "fuse_loras", "lora_apply", "spd_solve"):
        assert hasattr(OPS, name), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_y", [False, True])
def test_opcheck_token_covariance(dtype, with_y):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 7, generator=g, dtype=dtype)
    y = torch.randn(13, 5, generator=g, dtype=dtype) if with_y else None
    seg = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 1, 2, 0, 1, 1])
    opcheck(OPS.token_covariance.default, (x, y, None, seg, 3, None, "torch"), test_utils=CHECKS)


def test_opcheck_closed_form_edit():
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(5, 9, generator=g), torch.randn(3, 9, generator=g)]
    opcheck(OPS.closed_form_edit.default, (weights, torch.randn(9, 9, generator=g), "torch"), test_utils=CHECKS)


@pytest.mark.parametrize("with_base", [False, True])
def test_opcheck_fuse_loras(with_base):
    g = torch.Generator().manual_seed(3)
    n, r, d = 3, 2, 6
    A = [torch.randn(n, r, d, generator=g), torch.randn(n, r, d, generator=g)]
    B = [torch.randn(n, 5, r, generator=g), torch.randn(n, 4, r, generator=g)]
    C = _spd(d, (n,), seed=3)
    base = [torch.randn(5, d, generator=g), torch.randn(4, d, generator=g)] if with_base else []
    T = _spd(d, seed=4) if with_base else None
    opcheck(OPS.fuse_loras.default, (A, B, C, base, T, "torch"), test_utils=CHECKS)


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_lora_apply_with_its_backward(with_bias):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 6, generator=g, requires_grad=True)
    weight = torch.randn(5, 6, generator=g, requires_grad=True)
    A = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    B = torch.randn(2, 5, 3, generator=g, requires_grad=True)
    bias = torch.randn(5, generator=g, requires_grad=True) if with_bias else None
    opcheck(OPS.lora_apply.default, (x, weight, A, B, bias, [3, 4], 0.5, "torch"), test_utils=CHECKS)


def test_lora_apply_gradients_match_the_unfused_expression():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: lora_apply(*t, [3, 4], scale=0.5, backend="torch"), (x, weight, A, B)
    )


@pytest.mark.parametrize("batch", [(), (2,)])
def test_opcheck_spd_solve(batch):
    g = torch.Generator().manual_seed(6)
    M = _spd(5, batch)
    R = torch.randn(*batch, 3, 5, generator=g)
    opcheck(OPS.spd_solve.default, (M, R, None, 1e-2, "torch"), test_utils=CHECKS)


def test_the_public_ops_compile_without_a_graph_break():
    """MACE's fusion step as one function: covariance, solve, fused LoRAs, packed edit, LoRA apply."""

    def step(x, y, A, B, W, xs):
        cov, cross = token_covariance(x, y, backend="torch")
        M = cov + torch.eye(x.shape[1])
        T = spd_solve(M, cross, backend="torch")
        fused = fuse_loras([A], [B], M.expand(A.shape[0], -1, -1), backend="torch")
        edited = closed_form_edit([W], M / M.diagonal().sum(), backend="torch")
        out = lora_apply(xs, W, A, B, [2, xs.shape[0] - 2], scale=0.3, backend="torch")
        return T, fused[0], edited[0], out

    g = torch.Generator().manual_seed(7)
    args = (torch.randn(11, 6, generator=g), torch.randn(11, 4, generator=g),
            torch.randn(2, 3, 6, generator=g), torch.randn(2, 5, 3, generator=g),
            torch.randn(5, 6, generator=g), torch.randn(7, 6, generator=g))
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*args), step(*args), strict=True):
        torch.testing.assert_close(got, want)
