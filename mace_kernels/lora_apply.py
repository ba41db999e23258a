"""lora_apply: y = x W^T + b + scale * (x A_k^T) B_k^T, each row segment k with its own LoRA.

Segmented multi-LoRA matmul (the SGMV of Punica, vLLM's lora_shrink / lora_expand): rows of a
batch are grouped in consecutive segments, one per concept, so the LoRAs of many concepts
train in one batched UNet pass. Forward is shrink (x_k A_k^T, T x r) then expand (. B_k^T);
the backward pass uses the same two primitives plus a segmented outer product:

    dh_k = g_k B_k,   dx = g W + scale * dh_k A_k,
    dA_k = scale * dh_k^T x_k,   dB_k = scale * g_k^T h_k,   dW = g^T x,   db = sum g.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._backend import OPS_NAMESPACE, accumulation_dtype, cpp_ops, implementation
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
        seg_lens: K non-negative lengths summing to T (a list, or a CPU tensor; under
            torch.compile pass a list: a tensor's lengths are read with .tolist()).
        scale: LoRA scale (alpha / r).

    Returns:
        (T, d_out) in x's dtype; the LoRA term is accumulated in float32 (float64 for
        float64 input).

    Runs the custom op ``torch.ops.mace.lora_apply`` with its registered backward
    (``torch.ops.mace.lora_apply_backward``); both resolve ``backend`` when they run.
    """
    lens = _lengths(seg_lens)
    _check_inputs(x, weight, A, B, lens, bias)
    return _lora_apply_op(x, weight, A, B, bias, lens, float(scale), "auto" if backend is None else backend)


def _lengths(seg_lens) -> list[int]:
    """seg_lens as a list of Python ints (the op's int[] argument)."""
    if isinstance(seg_lens, torch.Tensor):
        if seg_lens.dim() != 1 or seg_lens.is_floating_point() or seg_lens.is_complex():
            raise ValueError(f"lora_apply: seg_lens must be a 1-d integer tensor or a list, got {shape_of(seg_lens)} {seg_lens.dtype}")
        return seg_lens.tolist()
    try:
        return [operator.index(n) for n in seg_lens]
    except TypeError:
        raise ValueError(f"lora_apply: seg_lens must hold integer lengths, got {seg_lens!r}") from None


def _check_inputs(x, weight, A, B, seg_lens: list[int], bias) -> None:
    """Every check (seg_lens are ints, so none reads a tensor's values: fake tensors pass too)."""
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
    if len(seg_lens) != K:
        raise ValueError(f"lora_apply: seg_lens must hold {K} integer lengths (one per adapter), got {len(seg_lens)}")
    if any(n < 0 for n in seg_lens):
        raise ValueError(f"lora_apply: seg_lens must be >= 0, got {list(seg_lens)}")
    if sum(seg_lens) != T:
        raise ValueError(f"lora_apply: seg_lens sum to {sum(seg_lens)}, but x has {T} rows")


# ----------------------------------------------------------------------------- custom ops
# Forward y = lora_apply(...); backward lora_apply_backward(...) -> (dx, dweight, dA, dB, dbias),
# a custom op of its own so that AOTAutograd traces the backward graph through it as well.
# The forward keeps nothing but its inputs: the backward recomputes h = x_k A_k^T (a shrink,
# T x d_in x r, small next to g W's T x d_out x d_in) rather than saving an extra output.


@torch.library.custom_op(f"{OPS_NAMESPACE}::lora_apply", mutates_args=())
def _lora_apply_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor | None,
    seg_lens: list[int],
    scale: float,
    backend: str,
) -> torch.Tensor:
    """y (T, d_out) in x's dtype; backend "auto" or a name."""
    _check_inputs(x, weight, A, B, seg_lens, bias)
    shrink, expand, _ = implementation("lora_apply", _PRIMITIVES, backend, x.device)
    lens = torch.tensor(seg_lens, dtype=torch.int64)
    x = x.contiguous()
    acc = accumulation_dtype(x.dtype)
    h = shrink(x, A, lens)  # (T, r)
    y = F.linear(x, weight, bias).to(acc).contiguous()
    expand(y, h, B, lens, scale)
    return y.to(x.dtype)


@_lora_apply_op.register_fake
def _lora_apply_fake(x, weight, A, B, bias, seg_lens, scale, backend):
    _check_inputs(x, weight, A, B, seg_lens, bias)
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op(f"{OPS_NAMESPACE}::lora_apply_backward", mutates_args=())
def _lora_apply_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_lens: list[int],
    scale: float,
    backend: str,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dA, dB, dbias), each in its input's dtype; an output that ``output_mask``
    (x, weight, A, B, bias) leaves out is an empty (0,) tensor."""
    shrink, expand, outer = implementation("lora_apply", _PRIMITIVES, backend, x.device)
    need_x, need_w, need_a, need_b, need_bias = output_mask
    lens = torch.tensor(seg_lens, dtype=torch.int64)
    x = x.contiguous()
    g = grad.contiguous()
    acc = accumulation_dtype(x.dtype)
    dx, dw, da, db, dbias = (g.new_empty(0, dtype=dtype) for dtype in _grad_dtypes(g, x, weight, A, B))
    dh = shrink(g, B.transpose(1, 2), lens) if (need_x or need_a) else None  # g_k B_k
    if need_x:
        dx = (g @ weight).to(acc).contiguous()
        expand(dx, dh, A.transpose(1, 2), lens, scale)  # + scale * dh_k A_k
        dx = dx.to(x.dtype)
    if need_a:
        da = (outer(dh, x, lens) * scale).to(A.dtype)
    if need_b:
        h = shrink(x, A, lens)  # x_k A_k^T, as in the forward
        db = (outer(g, h, lens) * scale).to(B.dtype)
    if need_w:
        dw = (g.to(acc).T @ x.to(acc)).to(weight.dtype)
    if need_bias:
        dbias = g.to(acc).sum(0).to(g.dtype)
    return dx.contiguous(), dw.contiguous(), da.contiguous(), db.contiguous(), dbias.contiguous()


def _grad_dtypes(grad, x, weight, A, B) -> tuple[torch.dtype, ...]:
    """The dtypes of (dx, dweight, dA, dB, dbias); bias has x's dtype, as grad does."""
    return x.dtype, weight.dtype, A.dtype, B.dtype, grad.dtype


@_lora_apply_backward_op.register_fake
def _lora_apply_backward_fake(grad, x, weight, A, B, seg_lens, scale, backend, output_mask):
    shapes = (x.shape, weight.shape, A.shape, B.shape, (weight.shape[0],))
    dtypes = _grad_dtypes(grad, x, weight, A, B)
    return tuple(grad.new_empty(shape if need else (0,), dtype=dtype)
                 for shape, need, dtype in zip(shapes, output_mask, dtypes, strict=True))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, A, B, bias, seg_lens, scale, backend = inputs
    ctx.save_for_backward(x, weight, A, B)
    ctx.seg_lens, ctx.scale, ctx.backend = seg_lens, scale, backend


def _backward(ctx, grad):
    x, weight, A, B = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = _lora_apply_backward_op(grad, x, weight, A, B, ctx.seg_lens, ctx.scale, ctx.backend, mask)
    return (*(g if need else None for g, need in zip(grads, mask, strict=True)), None, None, None)


_lora_apply_op.register_autograd(_backward, setup_context=_setup_context)


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
