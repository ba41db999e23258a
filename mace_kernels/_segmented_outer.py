"""One segmented outer-product Triton kernel shared by token_covariance and lora_apply.

Tokens are grouped in segments (concepts, LoRA adapters); for each segment s

    out[s] = sum over the segment's tokens t of w_t z_t x_t^T          (E x D)

token_covariance uses it for sum w x x^T (z is x: only the upper-triangle tiles are computed
and mirrored) and sum w y x^T; lora_apply for the adapter gradients dA_k = dh_k^T x_k and
dB_k = g_k^T h_k. Tokens are read through a permutation that groups them by segment, or in
place when the segments are already consecutive rows.
"""

from __future__ import annotations

import torch

from ._tile_configs import tile_config
from ._triton import cdiv, jit, tl


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


def sort_by_segment(
    seg: torch.Tensor | None, num_segments: int, n: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Token order grouped by segment and the (S+1,) segment offsets (ids < 0 are dropped).

    Without ids all n tokens form one segment, read in place (the order is None).
    """
    if seg is None:
        return None, torch.tensor([0, n], dtype=torch.int64, device=device)
    keep = seg >= 0
    counts = torch.bincount(seg[keep], minlength=num_segments)
    offsets = torch.zeros(num_segments + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    key = torch.where(keep, seg, torch.full_like(seg, num_segments))
    perm = torch.argsort(key, stable=True)[: int(offsets[-1])].contiguous()
    return perm, offsets


def segmented_outer(
    z: torch.Tensor,
    x: torch.Tensor,
    offsets: torch.Tensor,
    *,
    acc: torch.dtype,
    perm: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    symmetric: bool = False,
    max_len: int | None = None,
) -> torch.Tensor:
    """(S, E, D) in ``acc``: out[s] = sum_{t in segment s} w_t z_t x_t^T, in one launch.

    z: (N, E) and x: (N, D) with contiguous rows; offsets: (S+1,) int64 on their device;
    segment s is positions offsets[s]:offsets[s+1] of ``perm`` (token indices), or those rows
    themselves without perm. weights: optional (N,) in ``acc``. symmetric: z is x, so only
    the upper-triangle tiles are computed and then mirrored. max_len: the longest segment
    (computed from offsets when not given).
    """
    S = offsets.shape[0] - 1
    if max_len is None:
        max_len = int((offsets[1:] - offsets[:-1]).max()) if S > 0 else 0
    E, D = z.shape[1], x.shape[1]
    cfg = tile_config("segmented_outer")
    # tl.dot takes two operands of one dtype: the LoRA gradients pair fp16/bf16 outputs with
    # fp32 activations, which go through the fp32 path.
    native = (cfg["native_dot"] and weights is None and z.dtype == x.dtype
              and z.dtype in (torch.float16, torch.bfloat16))
    block_e = 16 if E <= 16 else cfg["block_e"]
    block_d = cfg["block_d"]
    if symmetric:
        block_e = block_d
    nti, ntj = cdiv(E, block_e), cdiv(D, block_d)
    ii, jj = torch.meshgrid(torch.arange(nti), torch.arange(ntj), indexing="ij")
    keep = (ii <= jj) if symmetric else torch.ones_like(ii, dtype=torch.bool)
    tile_i = ii[keep].to(x.device)
    tile_j = jj[keep].to(x.device)
    n_tiles = int(tile_i.numel())
    block_t = cfg["block_t"]
    # Split long segments across programs (fp32 atomics) when the grid is otherwise too small
    # to fill the GPU; with enough (tile, segment) programs every output is written once.
    target_programs = 1024
    split = 1
    if cfg["split_tokens"]:
        split = max(1, min(cdiv(target_programs, n_tiles * S), cdiv(max_len, 2048)))
    chunk = max(block_t, cdiv(cdiv(max(max_len, 1), split), block_t) * block_t)
    split = max(1, cdiv(max(max_len, 1), chunk))
    out = torch.zeros((S, E, D), dtype=acc, device=x.device)
    grid = (n_tiles, S, split)
    _outer_kernel[grid](
        z, x, weights if weights is not None else out, perm if perm is not None else offsets, offsets,
        tile_i, tile_j, out, E, D, z.stride(0), x.stride(0), chunk,
        HAS_W=weights is not None, HAS_PERM=perm is not None, ATOMIC=split > 1,
        NATIVE_DOT=native, ACC_F64=acc == torch.float64,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_D=block_d,
    )
    if symmetric:
        out = torch.triu(out) + torch.triu(out, 1).mT
    return out
