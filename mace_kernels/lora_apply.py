"""lora_apply: y = x W^T + b + scale * (x A_k^T) B_k^T, each row segment k with its own LoRA.

Segmented multi-LoRA matmul (the SGMV of Punica, vLLM's lora_shrink / lora_expand): rows of a
batch are grouped in consecutive segments, one per concept, so the LoRAs of many concepts
train in one batched UNet pass. Forward is shrink (x_k A_k^T, T x r) then expand (. B_k^T);
the backward pass uses the same two primitives plus a segmented outer product:

    dh_k = g_k B_k,   dx = g W + scale * dh_k A_k,
    dA_k = scale * dh_k^T x_k,   dB_k = scale * g_k^T h_k,   dW = g^T x,   db = sum g.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._backend import accumulation_dtype, cpp_ops, implementation
from ._grouped_matmul import grouped_matmul
from ._segmented_outer import segmented_outer
from ._utils import shape_of


def lora_apply(
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_lens: torch.Tensor | Sequence[int],
    *,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Segmented multi-LoRA linear layer, differentiable in x, A, B (and weight, bias).

    Args:
        x: (T, d_in) rows, grouped in K consecutive segments of lengths ``seg_lens``.
        weight: (d_out, d_in) frozen base weight, bias: optional (d_out,).
        A: (K, r, d_in) LoRA down weights, B: (K, d_out, r) LoRA up weights.
        seg_lens: K non-negative lengths summing to T (a CPU tensor or a list).
        scale: LoRA scale (alpha / r).

    Returns:
        (T, d_out) in x's dtype; the LoRA term is accumulated in float32 (float64 for
        float64 input).
    """
    seg_lens = _canonical_inputs(x, weight, A, B, seg_lens, bias)
    primitives = implementation("lora_apply", _PRIMITIVES, backend, x.device)
    return _LoraApply.apply(x, weight, A, B, bias, seg_lens, float(scale), primitives)


def _canonical_inputs(x, weight, A, B, seg_lens, bias) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"lora_apply: x must be (T, d_in), got {shape_of(x)}")
    T, d_in = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != d_in:
        raise ValueError(f"lora_apply: weight must be (d_out, {d_in}), got {shape_of(weight)}")
    d_out = weight.shape[0]
    if not isinstance(A, torch.Tensor) or A.dim() != 3 or A.shape[2] != d_in:
        raise ValueError(f"lora_apply: A must be (K, r, {d_in}), got {shape_of(A)}")
    K, r = A.shape[0], A.shape[1]
    if not isinstance(B, torch.Tensor) or B.shape != (K, d_out, r):
        raise ValueError(f"lora_apply: B must be ({K}, {d_out}, {r}) to match A and weight, got {shape_of(B)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (d_out,)):
        raise ValueError(f"lora_apply: bias must be ({d_out},), got {shape_of(bias)}")
    for name, t in (("x", x), ("weight", weight), ("A", A), ("B", B), ("bias", bias)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"lora_apply: {name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"lora_apply: {name} is on {t.device}, x on {x.device}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"lora_apply: weight and bias must have x's dtype {x.dtype}, got {weight.dtype}")
    lens = torch.as_tensor(seg_lens).to("cpu")
    if lens.dim() != 1 or lens.shape[0] != K or lens.is_floating_point():
        raise ValueError(f"lora_apply: seg_lens must hold {K} integer lengths (one per adapter), got {shape_of(lens)}")
    lens = lens.to(torch.int64)
    if bool((lens < 0).any()):
        raise ValueError(f"lora_apply: seg_lens must be >= 0, got {lens.tolist()}")
    if int(lens.sum()) != T:
        raise ValueError(f"lora_apply: seg_lens sum to {int(lens.sum())}, but x has {T} rows")
    return lens


class _LoraApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, A, B, bias, seg_lens, scale, primitives):
        shrink, expand, _ = primitives
        x = x.contiguous()
        acc = accumulation_dtype(x.dtype)
        h = shrink(x, A, seg_lens)  # (T, r)
        y = F.linear(x, weight, bias).to(acc).contiguous()
        expand(y, h, B, seg_lens, scale)
        ctx.save_for_backward(x, weight, A, B, h, seg_lens)
        ctx.scale, ctx.primitives = scale, primitives
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, A, B, h, seg_lens = ctx.saved_tensors
        scale = ctx.scale
        shrink, expand, outer = ctx.primitives
        acc = h.dtype
        g = g.contiguous()
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dx = dw = da = db = dbias = None
        dh = shrink(g, B.transpose(1, 2), seg_lens) if (need_x or need_a) else None  # g_k B_k
        if need_x:
            dx = (g @ weight).to(acc).contiguous()
            expand(dx, dh, A.transpose(1, 2), seg_lens, scale)  # + scale * dh_k A_k
            dx = dx.to(x.dtype)
        if need_a:
            da = (outer(dh, x, seg_lens) * scale).to(A.dtype)
        if need_b:
            db = (outer(g, h, seg_lens) * scale).to(B.dtype)
        if need_w:
            dw = (g.to(acc).T @ x.to(acc)).to(weight.dtype)
        if need_bias:
            dbias = g.to(acc).sum(0).to(g.dtype)
        return dx, dw, da, db, dbias, None, None, None


# Each backend provides shrink(x, A, seg_lens) -> x_k A_k^T (T, r) in the accumulation dtype,
# expand(out, h, B, seg_lens, scale): out_k += scale * h_k B_k^T in place, and
# outer(z, x, seg_lens) -> z_k^T x_k (K, e, d) in x's accumulation dtype.


def _shrink_torch(x, A, seg_lens):
    """Reference: a Python loop over segments."""
    acc = accumulation_dtype(x.dtype)
    h = torch.zeros((x.shape[0], A.shape[1]), dtype=acc, device=x.device)
    start = 0
    for k, n in enumerate(seg_lens.tolist()):
        if n:
            h[start:start + n] = x[start:start + n].to(acc) @ A[k].to(acc).T
        start += n
    return h


def _expand_torch(out, h, B, seg_lens, scale):
    start = 0
    for k, n in enumerate(seg_lens.tolist()):
        if n:
            out[start:start + n] += scale * (h[start:start + n] @ B[k].to(out.dtype).T)
        start += n


def _outer_torch(z, x, seg_lens):
    acc = accumulation_dtype(x.dtype)
    out = torch.zeros((seg_lens.shape[0], z.shape[1], x.shape[1]), dtype=acc, device=x.device)
    start = 0
    for k, n in enumerate(seg_lens.tolist()):
        if n:
            out[k] = z[start:start + n].to(acc).T @ x[start:start + n].to(acc)
        start += n
    return out


def _shrink_cpp(x, A, seg_lens):
    return cpp_ops().sgmv_shrink(x, A, seg_lens)


def _expand_cpp(out, h, B, seg_lens, scale):
    cpp_ops().sgmv_expand(out, h, B, seg_lens, scale)


def _outer_cpp(z, x, seg_lens):
    seg_ids = torch.repeat_interleave(torch.arange(seg_lens.shape[0]), seg_lens)
    return cpp_ops().covariance(x, z, seg_ids, None, seg_lens.shape[0], False)[1]


def _offsets(seg_lens):
    offsets = torch.zeros(seg_lens.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(seg_lens, 0)
    return offsets


def _shrink_triton(x, A, seg_lens):
    h = torch.empty((x.shape[0], A.shape[1]), dtype=accumulation_dtype(x.dtype), device=x.device)
    # A_k^T is a free strided view: the kernel reads b[g][k, n] = A[g, n, k].
    return grouped_matmul(x, A.transpose(1, 2), _offsets(seg_lens), h)


def _expand_triton(out, h, B, seg_lens, scale):
    grouped_matmul(h, B.transpose(1, 2), _offsets(seg_lens), out, alpha=scale, accumulate=True)


def _outer_triton(z, x, seg_lens):
    # Segments are consecutive rows: no permutation to read them through.
    offsets = _offsets(seg_lens).to(x.device)
    max_len = int(seg_lens.max()) if seg_lens.numel() and x.shape[0] else 0
    return segmented_outer(z.contiguous(), x.contiguous(), offsets, acc=accumulation_dtype(x.dtype), max_len=max_len)


_PRIMITIVES = {
    "torch": (_shrink_torch, _expand_torch, _outer_torch),
    "cpp": (_shrink_cpp, _expand_cpp, _outer_cpp),
    "triton": (_shrink_triton, _expand_triton, _outer_triton),
}
