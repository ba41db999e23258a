"""spd_solve: X M = R for symmetric positive definite M, one or a batch, many right-hand sides.

The closed-form edits of MACE (and UCE, RECE, SPEED-style methods) are W' = R M^-1 with one
d x d SPD matrix M shared by every projection of every layer, so R stacks all layers' rows.
Cholesky-based, never an explicit inverse. A matrix that is not positive definite, or so
ill-conditioned that the answer would be noise, is an error naming the batch items; an
optional diagonal jitter is added (and reported) instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ._backend import OPS_NAMESPACE, accumulation_dtype, cpp_ops, implementation
from ._tile_configs import tile_config
from ._triton import cdiv, jit, tl, triton
from ._utils import shape_of


class NotPositiveDefiniteError(ValueError):
    """M (or some items of a batch of M) is not numerically symmetric positive definite."""

    def __init__(self, message: str, failed: list[tuple[int, ...]]):
        super().__init__(message)
        self.failed = failed


class SPDJitterWarning(UserWarning):
    """spd_solve added a diagonal jitter to make some matrices positive definite."""


@dataclass
class SolveInfo:
    """What spd_solve did, per batch item (tensors shaped like M's batch dimensions)."""

    jitter: torch.Tensor  # absolute diagonal shift that was added (0 where none)
    condition_lower_bound: torch.Tensor  # (max L_ii / min L_ii)^2 <= cond_2(M)


def spd_solve(
    M: torch.Tensor,
    R: torch.Tensor,
    *,
    jitter: float | None = None,
    max_jitter: float = 1e-2,
    return_info: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SolveInfo]:
    """Solve X @ M = R.

    Args:
        M: (..., d, d) symmetric positive definite.
        R: (..., m, d) right-hand sides; batch dimensions broadcast against M's.
        jitter: None (default) raises NotPositiveDefiniteError for a matrix that is not
            numerically SPD. A float adds ``jitter * mean(diag(M))`` to the diagonal of the
            failing items only, growing 10x per try up to ``max_jitter * mean(diag(M))``,
            and warns with SPDJitterWarning.
        return_info: also return a SolveInfo.

    Returns:
        X with R's shape (batch dims broadcast) in the promoted dtype of M and R. The solve
        runs in float64 when either is float64, else float32.

    Runs the custom op ``torch.ops.mace.spd_solve`` (X and the SolveInfo tensors). The op does
    everything that reads values (finiteness and symmetry checks, the factorisation, the jitter,
    the NotPositiveDefiniteError and the warning) and resolves ``backend`` when it runs; this
    function checks shapes and builds the SolveInfo.
    """
    _check_inputs(M, R)
    X, shift, ratio = _spd_solve_op(M, R, jitter, float(max_jitter), "auto" if backend is None else backend)
    if not return_info:
        return X
    return X, SolveInfo(jitter=shift, condition_lower_bound=ratio)


def _check_inputs(M, R) -> tuple[torch.Size, torch.dtype, torch.dtype]:
    """The checks that need no values: (batch shape, accumulation dtype, output dtype)."""
    if not isinstance(M, torch.Tensor) or M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"spd_solve: M must be (..., d, d), got {shape_of(M)}")
    d = M.shape[-1]
    if not isinstance(R, torch.Tensor) or R.dim() < 2 or R.shape[-1] != d:
        raise ValueError(f"spd_solve: R must be (..., m, {d}) to match M ({d} x {d}), got {shape_of(R)}")
    if not (M.is_floating_point() and R.is_floating_point()):
        raise TypeError(f"spd_solve: M and R must be floating point, got {M.dtype} and {R.dtype}")
    if M.device != R.device:
        raise ValueError(f"spd_solve: M and R are on {M.device} and {R.device}")
    try:
        batch_shape = torch.broadcast_shapes(M.shape[:-2], R.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"spd_solve: batch dimensions of M {tuple(M.shape[:-2])} and R {tuple(R.shape[:-2])} "
            "do not broadcast"
        ) from None
    return batch_shape, accumulation_dtype(M.dtype, R.dtype), torch.promote_types(M.dtype, R.dtype)


def _canonical_inputs(M, R):
    batch_shape, acc, out_dtype = _check_inputs(M, R)
    d = M.shape[-1]
    Mc = M.to(acc)
    if not bool(torch.isfinite(Mc).all()):
        raise ValueError("spd_solve: M contains NaN or Inf")
    if not bool(torch.isfinite(R).all()):
        raise ValueError("spd_solve: R contains NaN or Inf")
    scale = Mc.abs().amax()
    asym = (Mc - Mc.mT).abs().amax()
    tol = 1e-10 if acc == torch.float64 else 1e-4
    if float(asym) > tol * float(scale):
        raise ValueError(f"spd_solve: M is not symmetric (max |M - M^T| = {float(asym):.3g}, max |M| = {float(scale):.3g})")
    m = R.shape[-2]
    nb = 1
    for size in batch_shape:
        nb *= size
    Mb = Mc.expand(*batch_shape, d, d).reshape(nb, d, d).contiguous()
    Rb = R.to(acc).expand(*batch_shape, m, d).reshape(nb, m, d).contiguous()
    return Mb, Rb, batch_shape, out_dtype


# ----------------------------------------------------------------------------- custom op
# Returns (X, jitter, condition_lower_bound): the SolveInfo fields as plain tensors.


@torch.library.custom_op(f"{OPS_NAMESPACE}::spd_solve", mutates_args=())
def _spd_solve_op(
    M: torch.Tensor, R: torch.Tensor, jitter: float | None, max_jitter: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X (batch, m, d) in the promoted dtype; jitter and condition bound (batch) in the solve's dtype."""
    Mb, Rb, batch_shape, out_dtype = _canonical_inputs(M, R)
    factor, solve = implementation("spd_solve", _IMPLEMENTATIONS, backend, Mb.device)
    L, ok, ratio = _checked_factor(factor, Mb)
    shift = torch.zeros(Mb.shape[0], dtype=Mb.dtype, device=Mb.device)
    if not bool(ok.all()):
        failed = _batch_indices((~ok).nonzero().flatten().tolist(), batch_shape)
        if jitter is None:
            raise NotPositiveDefiniteError(
                f"spd_solve: M is not numerically positive definite for batch item(s) {failed} "
                f"(d = {Mb.shape[-1]}, {Mb.dtype}); it is singular or nearly so, e.g. lam = 0 "
                "with fewer tokens than dimensions. Increase the regulariser or pass jitter=",
                failed,
            )
        L, ok, ratio, shift = _add_jitter(factor, Mb, L, ok, ratio, jitter, max_jitter)
        if not bool(ok.all()):
            still = _batch_indices((~ok).nonzero().flatten().tolist(), batch_shape)
            raise NotPositiveDefiniteError(
                f"spd_solve: batch item(s) {still} stay not positive definite even with a "
                f"diagonal jitter of {max_jitter} x mean(diag(M))",
                still,
            )
        added = [float(v) for v in shift[shift > 0]]
        warnings.warn(
            f"spd_solve: added a diagonal jitter to batch item(s) {failed}: {added}",
            SPDJitterWarning,
            stacklevel=2,
        )
    X = solve(L, Rb) if Rb.shape[1] else Rb.clone()
    X = X.reshape(*batch_shape, *R.shape[-2:]).to(out_dtype)
    # Contiguous, as the fake outputs are.
    return X.contiguous(), shift.reshape(batch_shape), ratio.reshape(batch_shape)


@_spd_solve_op.register_fake
def _spd_solve_fake(M, R, jitter, max_jitter, backend):
    batch_shape, acc, out_dtype = _check_inputs(M, R)
    X = R.new_empty((*batch_shape, *R.shape[-2:]), dtype=out_dtype)
    return X, M.new_empty(batch_shape, dtype=acc), M.new_empty(batch_shape, dtype=acc)


def _checked_factor(factor, Mb):
    """Cholesky plus a check that the factor is meaningful, per batch item.

    A Cholesky that 'succeeds' on a numerically rank-deficient matrix leaves pivots at rounding
    level, about d * eps of the largest, so (max L_ii / min L_ii)^2 (a lower bound on cond_2(M))
    lands near 1 / (d * eps). Anything within a factor 10 of that is treated as singular:
    its solution would be dominated by rounding noise.
    """
    L, info = factor(Mb)
    diag = L.diagonal(dim1=-2, dim2=-1)
    ratio = (diag.amax(-1) / diag.amin(-1)) ** 2
    eps = torch.finfo(Mb.dtype).eps
    limit = 1.0 / (10 * Mb.shape[-1] * eps)
    ok = (info == 0) & torch.isfinite(ratio) & (diag.amin(-1) > 0) & (ratio < limit)
    ratio = torch.where(info == 0, ratio, torch.full_like(ratio, float("inf")))
    return L, ok, ratio


def _add_jitter(factor, Mb, L, ok, ratio, jitter, max_jitter):
    shift = torch.zeros(Mb.shape[0], dtype=Mb.dtype, device=Mb.device)
    scale = Mb.diagonal(dim1=-2, dim2=-1).mean(-1).abs().clamp_min(torch.finfo(Mb.dtype).tiny)
    eye = torch.eye(Mb.shape[-1], dtype=Mb.dtype, device=Mb.device)
    rel = jitter
    while not bool(ok.all()) and rel <= max_jitter * (1 + 1e-9):
        bad = (~ok).nonzero().flatten()
        shift[bad] = rel * scale[bad]
        Lb, okb, ratiob = _checked_factor(factor, Mb[bad] + shift[bad, None, None] * eye)
        L[bad], ok[bad], ratio[bad] = Lb, okb, ratiob
        rel *= 10.0
    return L, ok, ratio, shift


def _batch_indices(flat: list[int], batch_shape) -> list[tuple[int, ...]]:
    if len(batch_shape) == 0:
        return [()]
    return [tuple(int(i) for i in torch.unravel_index(torch.tensor(f), batch_shape)) for f in flat]


# ----------------------------------------------------------------------------- torch reference


def _factor_torch(M):
    L, info = torch.linalg.cholesky_ex(M)
    return L, info.to(torch.int32)


def _solve_torch(L, R):
    # X M = R  <=>  M X^T = R^T (M symmetric).
    return torch.cholesky_solve(R.mT, L).mT.contiguous()


# ----------------------------------------------------------------------------- C++


def _factor_cpp(M):
    return cpp_ops().cholesky(M)


def _solve_cpp(L, R):
    return cpp_ops().cholesky_solve(L, R)


# ----------------------------------------------------------------------------- Triton


@jit
def _trsm_kernel(
    l_ptr, dinv_ptr, x_ptr, m, DP,
    ACC_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
):
    """In place, for one batch item and BLOCK_M rows: X <- R (L L^T)^-1.

    Forward pass Y L^T = R, then backward pass X L = Y, both blocked by BLOCK columns; each
    diagonal block is applied through its precomputed triangular inverse so every step is a
    tl.dot. The program re-reads the columns it has just written (barrier in between).
    """
    b = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < m
    ib = tl.arange(0, BLOCK)
    x_base = x_ptr + b.to(tl.int64) * m * DP + rows[:, None].to(tl.int64) * DP
    l_base = l_ptr + b.to(tl.int64) * DP * DP
    d_base = dinv_ptr + b.to(tl.int64) * NB * BLOCK * BLOCK
    # Forward: Y[:, J] = (R[:, J] - sum_{K<J} Y[:, K] L[J, K]^T) inv(L[J, J])^T
    for J in range(0, NB):
        cj = J * BLOCK + ib
        acc = tl.load(x_base + cj[None, :], mask=mask_m[:, None], other=0.0)
        for K in range(0, J):
            ck = K * BLOCK + ib
            yk = tl.load(x_base + ck[None, :], mask=mask_m[:, None], other=0.0)
            ljk_t = tl.load(l_base + cj[None, :] * DP + ck[:, None])  # L[J, K]^T
            if ACC_F64:
                acc -= tl.dot(yk, ljk_t)
            else:
                acc -= tl.dot(yk, ljk_t, input_precision="ieee")
        dinv_t = tl.load(d_base + J * BLOCK * BLOCK + ib[None, :] * BLOCK + ib[:, None])
        if ACC_F64:
            yj = tl.dot(acc, dinv_t)
        else:
            yj = tl.dot(acc, dinv_t, input_precision="ieee")
        tl.store(x_base + cj[None, :], yj, mask=mask_m[:, None])
        tl.debug_barrier()
    # Backward: X[:, J] = (Y[:, J] - sum_{K>J} X[:, K] L[K, J]) inv(L[J, J])
    for Jr in range(0, NB):
        J = NB - 1 - Jr
        cj = J * BLOCK + ib
        acc = tl.load(x_base + cj[None, :], mask=mask_m[:, None], other=0.0)
        for K in range(J + 1, NB):
            ck = K * BLOCK + ib
            xk = tl.load(x_base + ck[None, :], mask=mask_m[:, None], other=0.0)
            lkj = tl.load(l_base + ck[:, None] * DP + cj[None, :])  # L[K, J]
            if ACC_F64:
                acc -= tl.dot(xk, lkj)
            else:
                acc -= tl.dot(xk, lkj, input_precision="ieee")
        dinv = tl.load(d_base + J * BLOCK * BLOCK + ib[:, None] * BLOCK + ib[None, :])
        if ACC_F64:
            xj = tl.dot(acc, dinv)
        else:
            xj = tl.dot(acc, dinv, input_precision="ieee")
        tl.store(x_base + cj[None, :], xj, mask=mask_m[:, None])
        tl.debug_barrier()


def _factor_triton(M):
    # One dense factorisation is cuSOLVER's job; the kernel's work is the many-RHS solve.
    return _factor_torch(M)


def _solve_triton(L, R):
    assert triton is not None
    B, m, d = R.shape
    cfg = tile_config("spd_solve")
    block = cfg["block"]
    nb = cdiv(d, block)
    dp = nb * block
    # Pad to whole blocks with an identity tail so no load of L needs a mask.
    Lp = torch.zeros((B, dp, dp), dtype=L.dtype, device=L.device)
    Lp[:, :d, :d] = L
    if dp > d:
        Lp[:, d:, d:] = torch.eye(dp - d, dtype=L.dtype, device=L.device)
    diag_blocks = torch.stack([Lp[:, j * block:(j + 1) * block, j * block:(j + 1) * block] for j in range(nb)], 1)
    eye = torch.eye(block, dtype=L.dtype, device=L.device).expand_as(diag_blocks)
    dinv = torch.linalg.solve_triangular(diag_blocks, eye, upper=False).contiguous()
    X = torch.zeros((B, m, dp), dtype=R.dtype, device=R.device)
    X[:, :, :d] = R
    block_m = cfg["block_m"]
    grid = (B, cdiv(m, block_m))
    _trsm_kernel[grid](Lp, dinv, X, m, dp, ACC_F64=R.dtype == torch.float64, BLOCK_M=block_m, BLOCK=block, NB=nb)
    return X[:, :, :d].contiguous()


_IMPLEMENTATIONS = {
    "torch": (_factor_torch, _solve_torch),
    "cpp": (_factor_cpp, _solve_cpp),
    "triton": (_factor_triton, _solve_triton),
}
