import pytest
import torch
from conftest import ALL_BACKENDS, assert_close_scaled

from mace_kernels import lora_apply

SEGMENTS = [[0, 1, 5, 30], [7], [3, 0, 0, 9, 1]]


def _problem(seg_lens, d_in, d_out, r, dtype, adapter_dtype=None):
    T, K = sum(seg_lens), len(seg_lens)
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(T, d_in).to(dtype)
    W = (torch.randn(d_out, d_in) / d_in**0.5).to(dtype)
    bias = torch.randn(d_out).to(dtype)
    A = (torch.randn(K, r, d_in) / d_in**0.5).to(adapter_dtype)
    B = torch.randn(K, d_out, r).to(adapter_dtype)
    return x, W, bias, A, B


def _dense_reference(x, W, bias, A, B, seg_lens, scale):
    """Independent reference: gather each row's adapter and contract densely (autograd)."""
    idx = torch.repeat_interleave(torch.arange(len(seg_lens)), torch.tensor(seg_lens))
    h = torch.einsum("td,trd->tr", x, A[idx])
    y = x @ W.T + bias + scale * torch.einsum("tr,tor->to", h, B[idx])
    return y


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seg_lens", SEGMENTS)
@pytest.mark.parametrize("d_in,d_out,r", [(7, 5, 1), (123, 64, 4)])
def test_forward_and_grads_match_dense_reference(backend, dtype, seg_lens, d_in, d_out, r):
    x, W, bias, A, B = _problem(seg_lens, d_in, d_out, r, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, W, bias, A, B)]
    y = lora_apply(leaves[0], leaves[1], leaves[3], leaves[4], seg_lens, scale=0.5, bias=leaves[2], backend=backend)
    assert y.shape == (sum(seg_lens), d_out) and y.dtype == dtype
    g = torch.randn_like(y.float())
    (y.float() * g).sum().backward()

    ref_leaves = [t.double().requires_grad_() for t in (x, W, bias, A, B)]
    y_ref = _dense_reference(*ref_leaves, seg_lens, 0.5)
    (y_ref * g.double()).sum().backward()
    assert_close_scaled(y, y_ref.detach().to(dtype), dtype)
    for name, leaf, ref in zip("x W bias A B".split(), leaves, ref_leaves, strict=True):
        # Gradients are accumulated in float32 and cast to the parameter's dtype once.
        assert_close_scaled(leaf.grad, ref.grad.to(dtype), dtype, name=f"d{name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_mixed_precision_adapters(backend):
    seg_lens = [4, 0, 9]
    x, W, bias, A, B = _problem(seg_lens, 33, 20, 2, torch.bfloat16, adapter_dtype=torch.float32)
    y = lora_apply(x, W, A, B, seg_lens, scale=2.0, bias=bias, backend=backend)
    ref = _dense_reference(x.double(), W.double(), bias.double(), A.double(), B.double(), seg_lens, 2.0)
    assert_close_scaled(y, ref.to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradcheck_float64(backend):
    seg_lens = [2, 0, 1, 3]
    x, W, bias, A, B = _problem(seg_lens, 5, 4, 2, torch.float64)
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    W.requires_grad_()
    bias.requires_grad_()

    def f(x, W, A, B, bias):
        return lora_apply(x, W, A, B, seg_lens, scale=0.7, bias=bias, backend=backend)

    assert torch.autograd.gradcheck(f, (x, W, A, B, bias), eps=1e-6, atol=1e-8)


def test_bad_inputs():
    x, W, bias, A, B = _problem([2, 3], 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="seg_lens sum to 4, but x has 5 rows"):
        lora_apply(x, W, A, B, [2, 2])
    with pytest.raises(ValueError, match="seg_lens must hold 2"):
        lora_apply(x, W, A, B, [5])
    with pytest.raises(ValueError, match=">= 0"):
        lora_apply(x, W, A, B, [6, -1])
    with pytest.raises(ValueError, match=r"B must be \(2, 6, 2\)"):
        lora_apply(x, W, A, B[:, :5], [2, 3])
    with pytest.raises(ValueError, match="weight must be"):
        lora_apply(x, W[:, :7], A, B, [2, 3])
    with pytest.raises(TypeError, match="x's dtype"):
        lora_apply(x, W.double(), A, B, [2, 3])
