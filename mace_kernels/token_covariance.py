"""token_covariance: fused sum_t w_t x_t x_t^T and sum_t w_t y_t x_t^T, segmented by concept.

These d x d statistics are all the closed-form steps of MACE need from the text embeddings:
C_oo = sum e_o e_o^T and C_no = sum e_n e_o^T for refinement, C_i for each concept in fusion,
and the preservation caches. Segmenting by concept id gives C_i for hundreds of concepts in
one call; the token axis is streamed, so memory does not grow with the number of tokens.
"""

from __future__ import annotations

import torch

from ._backend import OPS_NAMESPACE, accumulation_dtype, cpp_ops, implementation
from ._segmented_outer import segmented_outer, sort_by_segment
from ._triton import triton
from ._utils import shape_of

# Tokens converted to the accumulation dtype at a time by the reference (bounds its memory).
_REFERENCE_CHUNK = 16384


def token_covariance(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    weights: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of outer products over selected tokens.

    Args:
        x: (N, d) token embeddings (fp16, bf16, fp32 or fp64).
        y: optional (N, e) second embeddings of the same tokens (same dtype as x).
        mask: optional (N,) bool; False tokens are skipped.
        segment_ids: optional (N,) integer ids in [0, num_segments); one output per segment.
        num_segments: number of segments (required with segment_ids).
        weights: optional (N,) per-token weights w_t.

    Returns:
        ``(cxx, cyx)``: cxx = sum_t w_t x_t x_t^T, shape (S, d, d), or (d, d) without
        segments; cyx = sum_t w_t y_t x_t^T, shape (S, e, d) or (e, d), or None without y.
        float64 for float64 input, float32 otherwise.

    Runs the custom op ``torch.ops.mace.token_covariance``, which resolves ``backend`` itself
    when it runs (so ``MACE_KERNELS_BACKEND`` and the Triton fallback act at run time, also
    in a compiled graph); this function only checks shapes and wraps the op's two tensors.
    """
    _check_inputs(x, y, mask, segment_ids, num_segments, weights)
    # The op takes every tensor on x's device: ids and masks often come from the host.
    aux = [None if t is None else t.to(x.device) for t in (mask, segment_ids, weights)]
    cxx, cyx = _token_covariance_op(x, y, aux[0], aux[1], num_segments, aux[2], "auto" if backend is None else backend)
    if y is None:
        cyx = None
    if segment_ids is None:
        cxx = cxx[0]
        cyx = None if cyx is None else cyx[0]
    return cxx, cyx


def _check_inputs(x, y, mask, segment_ids, num_segments, weights) -> int:
    """Every check that needs no tensor values (so fake tensors pass it too); the segment count S."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"token_covariance: x must be a (N, d) tensor, got {shape_of(x)}")
    if not x.is_floating_point():
        raise TypeError(f"token_covariance: x must be floating point, got {x.dtype}")
    n, _ = x.shape
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != n:
            raise ValueError(f"token_covariance: y must be ({n}, e) like x's rows, got {shape_of(y)}")
        if y.dtype != x.dtype:
            raise TypeError(f"token_covariance: x and y must share a dtype, got {x.dtype} and {y.dtype}")
        if y.device != x.device:
            raise ValueError(f"token_covariance: x and y are on {x.device} and {y.device}")
    if segment_ids is not None:
        if (not isinstance(segment_ids, torch.Tensor) or segment_ids.shape != (n,)
                or segment_ids.dtype not in (torch.int64, torch.int32)):
            raise ValueError(
                f"token_covariance: segment_ids must be ({n},) int64, got "
                f"{shape_of(segment_ids)} {getattr(segment_ids, 'dtype', '')}"
            )
        if num_segments is None:
            raise ValueError("token_covariance: segment_ids needs num_segments")
        if num_segments < 1:
            raise ValueError(f"token_covariance: num_segments must be >= 1, got {num_segments}")
        S = int(num_segments)
    else:
        if num_segments not in (None, 1):
            raise ValueError("token_covariance: num_segments given without segment_ids")
        S = 1
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != (n,) or mask.dtype != torch.bool):
        raise ValueError(f"token_covariance: mask must be ({n},) bool, got {shape_of(mask)} {getattr(mask, 'dtype', '')}")
    if weights is not None and (not isinstance(weights, torch.Tensor) or weights.shape != (n,)
                                or not weights.is_floating_point()):
        raise ValueError(f"token_covariance: weights must be ({n},) float, got {shape_of(weights)}")
    return S


def _canonical_inputs(x, y, mask, segment_ids, num_segments, weights):
    """Validate (values too) and fold mask + segments into one id vector where -1 means 'skip'."""
    S = _check_inputs(x, y, mask, segment_ids, num_segments, weights)
    n = x.shape[0]
    seg = None
    if segment_ids is not None:
        seg = segment_ids.to(device=x.device, dtype=torch.int64)
        if n:
            lo, hi = int(seg.min()), int(seg.max())
            if lo < 0 or hi >= S:
                bad = int(((seg < 0) | (seg >= S)).sum())
                raise ValueError(f"token_covariance: {bad} segment ids outside [0, {S}) (min {lo}, max {hi})")
    if mask is not None:
        mask = mask.to(x.device)
        base = seg if seg is not None else torch.zeros(n, dtype=torch.int64, device=x.device)
        seg = torch.where(mask, base, torch.full_like(base, -1))
    w = None
    if weights is not None:
        w = weights.to(device=x.device, dtype=accumulation_dtype(x.dtype)).contiguous()
    return x.contiguous(), None if y is None else y.contiguous(), seg, w, S


# ----------------------------------------------------------------------------- custom op
# Tensors only, so the optional cyx is an (S, 0, d) tensor without y, and the unsegmented
# result keeps its segment axis of 1; token_covariance() turns both back.


@torch.library.custom_op(f"{OPS_NAMESPACE}::token_covariance", mutates_args=())
def _token_covariance_op(
    x: torch.Tensor,
    y: torch.Tensor | None,
    mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    num_segments: int | None,
    weights: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cxx (S, d, d), cyx (S, e, d) or (S, 0, d)) in the accumulation dtype; backend "auto" or a name."""
    x, y, seg, w, S = _canonical_inputs(x, y, mask, segment_ids, num_segments, weights)
    run = implementation("token_covariance", _IMPLEMENTATIONS, backend, x.device)
    cxx, cyx = run(x, y, seg, w, S)
    if cyx is None:
        cyx = cxx.new_zeros((S, 0, x.shape[1]))
    # Contiguous like the fake outputs (a backend may hand back a strided view).
    return cxx.contiguous(), cyx.contiguous()


@_token_covariance_op.register_fake
def _token_covariance_fake(x, y, mask, segment_ids, num_segments, weights, backend):
    S = _check_inputs(x, y, mask, segment_ids, num_segments, weights)
    acc = accumulation_dtype(x.dtype)
    d, e = x.shape[1], 0 if y is None else y.shape[1]
    return x.new_empty((S, d, d), dtype=acc), x.new_empty((S, e, d), dtype=acc)


# ----------------------------------------------------------------------------- torch reference


def _covariance_torch(x, y, seg, w, S):
    """Straightforward reference: stream token chunks, loop over segments in Python."""
    acc = accumulation_dtype(x.dtype)
    n, d = x.shape
    cxx = x.new_zeros((S, d, d), dtype=acc)
    cyx = x.new_zeros((S, y.shape[1], d), dtype=acc) if y is not None else None
    for start in range(0, n, _REFERENCE_CHUNK):
        rows = slice(start, start + _REFERENCE_CHUNK)
        xc = x[rows].to(acc)
        xw = xc * w[rows, None] if w is not None else xc
        yc = y[rows].to(acc) if y is not None else None
        if seg is None:
            groups = [(0, slice(None))]
        else:
            sc = seg[rows]
            groups = [(s, sc == s) for s in range(S)]
        for s, sel in groups:
            xs, xws = xc[sel], xw[sel]
            if xs.shape[0] == 0:
                continue
            cxx[s] += xws.T @ xs
            if yc is not None:
                cyx[s] += yc[sel].T @ xws
    # BLAS does not promise a bitwise-symmetric x^T x; every backend returns one.
    cxx = (cxx + cxx.mT) / 2
    return cxx, cyx


# ----------------------------------------------------------------------------- C++


def _covariance_cpp(x, y, seg, w, S):
    cxx, cyx = cpp_ops().covariance(x, y, seg, w, S, True)
    return cxx, (cyx if y is not None else None)


# ----------------------------------------------------------------------------- Triton


def _covariance_triton(x, y, seg, w, S):
    assert triton is not None
    acc = accumulation_dtype(x.dtype)
    n = x.shape[0]
    perm, offsets = sort_by_segment(seg, S, n, x.device)
    max_len = int((offsets[1:] - offsets[:-1]).max()) if n else 0
    kw = dict(acc=acc, perm=perm, weights=w, max_len=max_len)
    cxx = segmented_outer(x, x, offsets, symmetric=True, **kw)
    cyx = segmented_outer(y, x, offsets, **kw) if y is not None else None
    return cxx, cyx


_IMPLEMENTATIONS = {"torch": _covariance_torch, "cpp": _covariance_cpp, "triton": _covariance_triton}
