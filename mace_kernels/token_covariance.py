"""token_covariance: fused sum_t w_t x_t x_t^T and sum_t w_t y_t x_t^T, segmented by concept.

These d x d statistics are all the closed-form steps of MACE need from the text embeddings:
C_oo = sum e_o e_o^T and C_no = sum e_n e_o^T for refinement, C_i for each concept in fusion,
and the preservation caches. Segmenting by concept id gives C_i for hundreds of concepts in
one call; the token axis is streamed, so memory does not grow with the number of tokens.
"""

from __future__ import annotations

import torch

from ._backend import accumulation_dtype, cpp_ops, resolve_backend
from ._triton import cdiv, jit, tl, triton

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
    """
    x, y, seg, w, S = _canonical_inputs(x, y, mask, segment_ids, num_segments, weights)
    name = resolve_backend(backend, x.device)
    cxx, cyx = _IMPLEMENTATIONS[name](x, y, seg, w, S, True)
    if segment_ids is None:
        cxx = cxx[0]
        cyx = None if cyx is None else cyx[0]
    return cxx, cyx


def segmented_outer(
    y: torch.Tensor, x: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, backend: str
) -> torch.Tensor:
    """sum_{t in s} y_t x_t^T per segment, (S, e, d) — the cyx half alone (LoRA gradients)."""
    return _IMPLEMENTATIONS[backend](x, y, segment_ids, None, num_segments, False)[1]


def _canonical_inputs(x, y, mask, segment_ids, num_segments, weights):
    """Validate and fold mask + segments into one id vector where -1 means 'skip'."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"token_covariance: x must be a (N, d) tensor, got {_shape(x)}")
    if not x.is_floating_point():
        raise TypeError(f"token_covariance: x must be floating point, got {x.dtype}")
    n, _ = x.shape
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != n:
            raise ValueError(f"token_covariance: y must be ({n}, e) like x's rows, got {_shape(y)}")
        if y.dtype != x.dtype:
            raise TypeError(f"token_covariance: x and y must share a dtype, got {x.dtype} and {y.dtype}")
        if y.device != x.device:
            raise ValueError(f"token_covariance: x and y are on {x.device} and {y.device}")
        y = y.contiguous()
    seg = None
    if segment_ids is not None:
        if segment_ids.shape != (n,) or segment_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"token_covariance: segment_ids must be ({n},) int64, got "
                f"{_shape(segment_ids)} {getattr(segment_ids, 'dtype', '')}"
            )
        if num_segments is None:
            raise ValueError("token_covariance: segment_ids needs num_segments")
        if num_segments < 1:
            raise ValueError(f"token_covariance: num_segments must be >= 1, got {num_segments}")
        seg = segment_ids.to(device=x.device, dtype=torch.int64)
        if n:
            lo, hi = int(seg.min()), int(seg.max())
            if lo < 0 or hi >= num_segments:
                bad = int(((seg < 0) | (seg >= num_segments)).sum())
                raise ValueError(
                    f"token_covariance: {bad} segment ids outside [0, {num_segments}) "
                    f"(min {lo}, max {hi})"
                )
        S = int(num_segments)
    else:
        if num_segments not in (None, 1):
            raise ValueError("token_covariance: num_segments given without segment_ids")
        S = 1
    if mask is not None:
        if mask.shape != (n,) or mask.dtype != torch.bool:
            raise ValueError(f"token_covariance: mask must be ({n},) bool, got {_shape(mask)} {mask.dtype}")
        mask = mask.to(x.device)
        base = seg if seg is not None else torch.zeros(n, dtype=torch.int64, device=x.device)
        seg = torch.where(mask, base, torch.full_like(base, -1))
    w = None
    if weights is not None:
        if weights.shape != (n,) or not weights.is_floating_point():
            raise ValueError(f"token_covariance: weights must be ({n},) float, got {_shape(weights)}")
        w = weights.to(device=x.device, dtype=accumulation_dtype(x.dtype)).contiguous()
    return x.contiguous(), y, seg, w, S


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


# ----------------------------------------------------------------------------- torch reference


def _covariance_torch(x, y, seg, w, S, with_xx):
    """Straightforward reference: stream token chunks, loop over segments in Python."""
    acc = accumulation_dtype(x.dtype)
    n, d = x.shape
    cxx = x.new_zeros((S, d, d), dtype=acc) if with_xx else None
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
            if with_xx:
                cxx[s] += xws.T @ xs
            if yc is not None:
                cyx[s] += yc[sel].T @ xws
    if with_xx:  # BLAS does not promise a bitwise-symmetric x^T x; every backend returns one.
        cxx = (cxx + cxx.mT) / 2
    return cxx, cyx


# ----------------------------------------------------------------------------- C++


def _covariance_cpp(x, y, seg, w, S, with_xx):
    cxx, cyx = cpp_ops().covariance(x, y, seg, w, S, with_xx)
    return (cxx if with_xx else None), (cyx if y is not None else None)


# ----------------------------------------------------------------------------- Triton


@jit
def _outer_kernel(
    z_ptr, x_ptr, w_ptr, perm_ptr, offsets_ptr, tile_i_ptr, tile_j_ptr, out_ptr,
    E, D, stride_z, stride_x, chunk,
    HAS_W: tl.constexpr, HAS_PERM: tl.constexpr, ATOMIC: tl.constexpr,
    NATIVE_DOT: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[s, i-tile, j-tile] (+)= sum over the segment's tokens of w_t z_t x_t^T.

    Grid: (tiles, segments, token splits). The tile list holds only the upper-triangle tiles
    when z is x (the caller mirrors them), so the symmetric product does half the work.
    """
    tile = tl.program_id(0)
    s = tl.program_id(1)
    split = tl.program_id(2)
    ti = tl.load(tile_i_ptr + tile)
    tj = tl.load(tile_j_ptr + tile)
    seg_start = tl.load(offsets_ptr + s)
    seg_end = tl.load(offsets_ptr + s + 1)
    start = seg_start + split * chunk
    end = tl.minimum(start + chunk, seg_end)

    offs_e = ti * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_d = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_e = offs_e < E
    mask_d = offs_d < D
    if ACC_F64:
        acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        valid = pos < end
        if HAS_PERM:
            rows = tl.load(perm_ptr + pos, mask=valid, other=0)
        else:
            rows = pos
        zt = tl.load(z_ptr + rows[:, None] * stride_z + offs_e[None, :],
                     mask=valid[:, None] & mask_e[None, :], other=0.0)
        xt = tl.load(x_ptr + rows[:, None] * stride_x + offs_d[None, :],
                     mask=valid[:, None] & mask_d[None, :], other=0.0)
        if NATIVE_DOT:
            # fp16/bf16 products are exact in the fp32 accumulator: use the tensor cores.
            acc += tl.dot(tl.trans(zt), xt)
        else:
            if ACC_F64:
                zt = zt.to(tl.float64)
                xt = xt.to(tl.float64)
            else:
                zt = zt.to(tl.float32)
                xt = xt.to(tl.float32)
            if HAS_W:
                wt = tl.load(w_ptr + rows, mask=valid, other=0.0)
                zt = zt * wt[:, None]
            acc += tl.dot(tl.trans(zt), xt, input_precision="ieee")
    out_offs = s * E * D + offs_e[:, None] * D + offs_d[None, :]
    out_mask = mask_e[:, None] & mask_d[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + out_offs, acc, mask=out_mask)
    else:
        tl.store(out_ptr + out_offs, acc, mask=out_mask)


def _sort_by_segment(seg, S, n, device):
    """Token order grouped by segment and the segment offsets (masked tokens dropped)."""
    if seg is None:
        return None, torch.tensor([0, n], dtype=torch.int64, device=device)
    keep = seg >= 0
    counts = torch.bincount(seg[keep], minlength=S)
    offsets = torch.zeros(S + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    key = torch.where(keep, seg, torch.full_like(seg, S))
    perm = torch.argsort(key, stable=True)[: int(offsets[-1])].contiguous()
    return perm, offsets


def _launch_outer(z, x, w, perm, offsets, S, symmetric, acc, max_len):
    from ._backend import triton_interpret

    E, D = z.shape[1], x.shape[1]
    interp = triton_interpret()
    native = w is None and z.dtype in (torch.float16, torch.bfloat16) and not interp
    block_e = 16 if E <= 16 else (32 if interp else 64)
    block_d = 32 if interp else 64
    if symmetric:
        block_e = block_d
    nti, ntj = cdiv(E, block_e), cdiv(D, block_d)
    ii, jj = torch.meshgrid(torch.arange(nti), torch.arange(ntj), indexing="ij")
    keep = (ii <= jj) if symmetric else torch.ones_like(ii, dtype=torch.bool)
    tile_i = ii[keep].to(x.device)
    tile_j = jj[keep].to(x.device)
    n_tiles = int(tile_i.numel())
    block_t = 32
    # Split long segments across programs (fp32 atomics) when the grid is otherwise too small
    # to fill the GPU; with enough (tile, segment) programs every output is written once.
    target_programs = 1024
    split = 1 if interp else max(1, min(cdiv(target_programs, n_tiles * S), cdiv(max_len, 2048)))
    chunk = max(block_t, cdiv(cdiv(max(max_len, 1), split), block_t) * block_t)
    split = max(1, cdiv(max(max_len, 1), chunk))
    out = torch.zeros((S, E, D), dtype=acc, device=x.device)
    grid = (n_tiles, S, split)
    _outer_kernel[grid](
        z, x, w if w is not None else out, perm if perm is not None else offsets, offsets,
        tile_i, tile_j, out, E, D, z.stride(0), x.stride(0), chunk,
        HAS_W=w is not None, HAS_PERM=perm is not None, ATOMIC=split > 1,
        NATIVE_DOT=native, ACC_F64=acc == torch.float64,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_D=block_d,
    )
    if symmetric:
        out = torch.triu(out) + torch.triu(out, 1).mT
    return out


def _covariance_triton(x, y, seg, w, S, with_xx):
    assert triton is not None
    acc = accumulation_dtype(x.dtype)
    n = x.shape[0]
    perm, offsets = _sort_by_segment(seg, S, n, x.device)
    max_len = int((offsets[1:] - offsets[:-1]).max()) if n else 0
    cxx = _launch_outer(x, x, w, perm, offsets, S, True, acc, max_len) if with_xx else None
    cyx = _launch_outer(y, x, w, perm, offsets, S, False, acc, max_len) if y is not None else None
    return cxx, cyx


_IMPLEMENTATIONS = {"torch": _covariance_torch, "cpp": _covariance_cpp, "triton": _covariance_triton}
