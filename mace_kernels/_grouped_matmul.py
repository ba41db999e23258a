"""One grouped GEMM Triton kernel shared by closed_form_edit, fuse_loras and lora_apply.

Rows of a packed left operand are cut into groups (layers, concepts or LoRA segments); each
group multiplies its rows by its own right operand. A work list of (group, row tile) lets one
launch cover every group, whatever their sizes (ragged layers, empty segments):

    c[rows_g] (+)= alpha * (a[rows_g] @ b[g] + a2[rows_g] @ b2)

The optional second term (a shared right operand) fuses e.g. ``base_l @ base_transform``
into the fusion GEMM as extra K steps.
"""

from __future__ import annotations

import torch

from ._tile_configs import tile_config
from ._triton import cdiv, jit, tl


@jit
def _grouped_matmul_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, tiles_ptr,
    N, K, K2, alpha,
    stride_am, stride_bg, stride_bk, stride_bn, stride_a2m, stride_b2k, stride_b2n, stride_cm,
    HAS_SECOND: tl.constexpr, ACCUMULATE: tl.constexpr, NATIVE_DOT: tl.constexpr,
    ACC_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.load(tiles_ptr + tile * 3)
    row0 = tl.load(tiles_ptr + tile * 3 + 1)
    row_end = tl.load(tiles_ptr + tile * 3 + 2)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < row_end
    mask_n = cols < N
    if ACC_F64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_group = b_ptr + group.to(tl.int64) * stride_bg
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < K
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_group + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if NATIVE_DOT:
            # fp16 x fp16 (or bf16) products are exact in fp32: let the tensor cores do them.
            acc += tl.dot(a, b)
        elif ACC_F64:
            acc += tl.dot(a.to(tl.float64), b.to(tl.float64))
        else:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if HAS_SECOND:
        for k0 in range(0, K2, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask_k = ks < K2
            a = tl.load(a2_ptr + rows[:, None].to(tl.int64) * stride_a2m + ks[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b2_ptr + ks[:, None] * stride_b2k + cols[None, :] * stride_b2n,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if ACC_F64:
                acc += tl.dot(a.to(tl.float64), b.to(tl.float64))
            else:
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
    c_mask = mask_m[:, None] & mask_n[None, :]
    result = acc * alpha
    if ACCUMULATE:
        result += tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, result.to(c_ptr.dtype.element_ty), mask=c_mask)


def row_tiles(group_offsets: torch.Tensor, block_m: int, device: torch.device) -> torch.Tensor:
    """(tiles, 3) int64 work list of (group, first row, end row) from (G+1,) row offsets."""
    offsets = group_offsets.to("cpu", torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    per_group = (lengths + block_m - 1) // block_m
    group = torch.repeat_interleave(torch.arange(len(lengths)), per_group)
    first_tile = torch.cumsum(per_group, 0) - per_group
    within = torch.arange(int(per_group.sum())) - first_tile[group]
    row0 = offsets[group] + within * block_m
    row_end = torch.minimum(row0 + block_m, offsets[group + 1])
    return torch.stack([group, row0, row_end], dim=1).contiguous().to(device)


def grouped_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    group_offsets: torch.Tensor,
    out: torch.Tensor,
    *,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    alpha: float = 1.0,
    accumulate: bool = False,
) -> torch.Tensor:
    """out[o_g:o_{g+1}] (+)= alpha * (a[o_g:o_{g+1}] @ b[g] (+ a2[...] @ b2)), in one launch.

    a: (M, K) with contiguous rows; b: (G, K, N), any strides (a transposed view is free);
    a2: (M, K2), b2: (K2, N); out: (M, N) float32/float64 with contiguous rows.
    """
    cfg = tile_config("grouped_matmul")
    M, K = a.shape
    N = b.shape[2]
    acc_f64 = out.dtype == torch.float64
    native = (
        cfg["native_dot"] and a2 is None and a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)
    )
    block_m = cfg["block_m"]
    block_n = cfg["block_n"]
    block_k = 16 if K <= 16 else cfg["block_k"]
    tiles = row_tiles(group_offsets, block_m, a.device)
    n_tiles = tiles.shape[0]
    if n_tiles == 0 or N == 0:
        if not accumulate:
            out.zero_()
        return out
    assert a.stride(1) == 1 and out.stride(1) == 1
    has_second = a2 is not None
    if has_second:
        assert a2.stride(1) == 1
    grid = (n_tiles, cdiv(N, block_n))
    _grouped_matmul_kernel[grid](
        a, b, a2 if has_second else a, b2 if has_second else b, out, tiles,
        N, K, a2.shape[1] if has_second else 0, alpha,
        a.stride(0), b.stride(0), b.stride(1), b.stride(2),
        a2.stride(0) if has_second else 0,
        b2.stride(0) if has_second else 0, b2.stride(1) if has_second else 0,
        out.stride(0),
        HAS_SECOND=has_second, ACCUMULATE=accumulate, NATIVE_DOT=native, ACC_F64=acc_f64,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
