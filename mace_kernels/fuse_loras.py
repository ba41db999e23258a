"""fuse_loras: sum_i B_il (A_il C_i) (+ base_l @ T) for every layer l, all concepts at once.

This is the numerator of MACE's closed-form multi-LoRA fusion. The sum over concepts is the K
dimension of one GEMM per layer:

    sum_i B_il (A_il C_i) = [B_1l ... B_nl] (out x nr) @ [A_1l C_1; ...; A_nl C_n] (nr x d)

so the work is a batched (r x d)(d x d) product per (concept, layer) followed by one grouped
GEMM over layers, with the base term fused in as extra K steps. Nothing of size out x d is
built per concept, and no model is fused per concept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._backend import OPS_NAMESPACE, accumulation_dtype, cpp_ops, implementation
from ._grouped_matmul import grouped_matmul
from ._utils import shape_of


def fuse_loras(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    C: torch.Tensor,
    *,
    base: Sequence[torch.Tensor] | None = None,
    base_transform: torch.Tensor | None = None,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """Per layer l: ``sum_i B[l][i] @ (A[l][i] @ C[i])`` plus ``base[l] @ base_transform``.

    Args:
        A: per layer, (n, r, d) LoRA down weights of the n concepts.
        B: per layer, (n, out_l, r) LoRA up weights (scale folded in by the caller).
        C: (n, d, d) per-concept token covariances.
        base, base_transform: optional per-layer (out_l, k) weights and one (k, d) matrix
            (k = d usually; stacking [W_l | W0_l] against [T; T0] adds two base terms).

    Returns:
        A list of (out_l, d) tensors in float64 when C (or base_transform) is float64, else
        float32.

    Runs the custom op ``torch.ops.mace.fuse_loras`` (all layers' rows stacked; an empty base
    list stands for no base term; it resolves ``backend`` when it runs) and splits its result
    per layer.
    """
    A, B = list(A), list(B)
    if (base is None) != (base_transform is None):
        raise ValueError("fuse_loras: base and base_transform go together")
    base = [] if base is None else list(base)
    _check_inputs(A, B, C, base, base_transform)
    packed = _fuse_loras_op(A, B, C, base, base_transform, "auto" if backend is None else backend)
    return list(torch.split(packed, [b.shape[1] for b in B]))


def _check_inputs(A, B, C, base, base_transform) -> torch.dtype:
    """Shapes, dtypes and devices (no values) with base a list, empty for none; the accumulation dtype."""
    if not isinstance(C, torch.Tensor) or C.dim() != 3 or C.shape[1] != C.shape[2]:
        raise ValueError(f"fuse_loras: C must be (n, d, d), got {shape_of(C)}")
    n, d = C.shape[0], C.shape[1]
    if not A or len(A) != len(B):
        raise ValueError(f"fuse_loras: A and B must list the same layers, got {len(A)} and {len(B)}")
    r = A[0].shape[1] if isinstance(A[0], torch.Tensor) and A[0].dim() == 3 else None
    for lay, (a, b) in enumerate(zip(A, B, strict=True)):
        if not isinstance(a, torch.Tensor) or a.dim() != 3 or a.shape[0] != n or a.shape[2] != d or a.shape[1] != r:
            raise ValueError(f"fuse_loras: A[{lay}] must be ({n}, {r}, {d}) (concepts, rank, d), got {shape_of(a)}")
        if not isinstance(b, torch.Tensor) or b.dim() != 3 or b.shape[0] != n or b.shape[2] != r:
            raise ValueError(f"fuse_loras: B[{lay}] must be ({n}, out, {r}) (concepts, out, rank), got {shape_of(b)}")
        for name, t in (("A", a), ("B", b)):
            if not t.is_floating_point():
                raise TypeError(f"fuse_loras: {name}[{lay}] must be floating point, got {t.dtype}")
            if t.device != C.device:
                raise ValueError(f"fuse_loras: {name}[{lay}] is on {t.device}, C on {C.device}")
    if base and base_transform is None:
        raise ValueError("fuse_loras: base and base_transform go together")
    if base_transform is None:
        return accumulation_dtype(C.dtype)
    if len(base) != len(A):
        raise ValueError(f"fuse_loras: base has {len(base)} layers, A has {len(A)}")
    if not isinstance(base_transform, torch.Tensor) or base_transform.dim() != 2 or base_transform.shape[1] != d:
        raise ValueError(f"fuse_loras: base_transform must be (k, {d}), got {shape_of(base_transform)}")
    k = base_transform.shape[0]
    for lay, (w, b) in enumerate(zip(base, B, strict=True)):
        if not isinstance(w, torch.Tensor) or w.shape != (b.shape[1], k):
            raise ValueError(f"fuse_loras: base[{lay}] must be ({b.shape[1]}, {k}) to match base_transform, got {shape_of(w)}")
    return accumulation_dtype(C.dtype, base_transform.dtype)


# ----------------------------------------------------------------------------- custom op
# Named like the function, in the "mace" namespace (the C++ extension's mace_kernels::fuse_loras
# is its CPU kernel, which this op calls for the cpp backend).


@torch.library.custom_op(f"{OPS_NAMESPACE}::fuse_loras", mutates_args=())
def _fuse_loras_op(
    A: list[torch.Tensor],
    B: list[torch.Tensor],
    C: torch.Tensor,
    base: list[torch.Tensor],
    base_transform: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """All layers' results stacked, (sum out_l, d) in the accumulation dtype; base [] for none."""
    acc = _check_inputs(A, B, C, base, base_transform)
    run = implementation("fuse_loras", _IMPLEMENTATIONS, backend, C.device)
    packed = run(
        [a.contiguous() for a in A],
        [b.contiguous() for b in B],
        C.to(acc),
        [w.contiguous() for w in base] if base_transform is not None else None,
        None if base_transform is None else base_transform.to(acc),
    )
    return packed.contiguous()


@_fuse_loras_op.register_fake
def _fuse_loras_fake(A, B, C, base, base_transform, backend):
    acc = _check_inputs(A, B, C, base, base_transform)
    return C.new_empty((sum(b.shape[1] for b in B), C.shape[1]), dtype=acc)


def _fuse_torch(A, B, C, base, T):
    """Reference: a Python loop over layers and concepts, one small product at a time."""
    outs = []
    for lay, (a, b) in enumerate(zip(A, B, strict=True)):
        out = torch.zeros((b.shape[1], C.shape[1]), dtype=C.dtype, device=C.device)
        for i in range(C.shape[0]):
            out += b[i].to(C.dtype) @ (a[i].to(C.dtype) @ C[i])
        if base is not None:
            out += base[lay].to(C.dtype) @ T
        outs.append(out)
    return torch.cat(outs)


def _fuse_cpp(A, B, C, base, T):
    return cpp_ops().fuse_loras(A, B, C, base if base is not None else [], T)


def _fuse_triton(A, B, C, base, T):
    n, d = C.shape[0], C.shape[1]
    L, r = len(A), A[0].shape[1]
    acc = C.dtype
    # Step 1: AC[i] = [A_i1; ...; A_iL] @ C_i, one group per concept.
    a_all = torch.stack(A, 1).reshape(n * L * r, d)  # rows ordered (concept, layer, rank)
    ac = torch.empty((n * L * r, d), dtype=acc, device=C.device)
    grouped_matmul(a_all, C, torch.arange(n + 1) * (L * r), ac)
    # Step 2: per layer, [B_1l ... B_nl] @ [A_1l C_1; ...] (+ base_l @ T), one group per layer.
    ac_by_layer = ac.view(n, L, r, d).transpose(0, 1).reshape(L, n * r, d)
    b_packed = torch.cat([b.permute(1, 0, 2).reshape(b.shape[1], n * r) for b in B])
    sizes = torch.tensor([0] + [b.shape[1] for b in B])
    out = torch.empty((b_packed.shape[0], d), dtype=acc, device=C.device)
    a2 = torch.cat(base) if base is not None else None
    grouped_matmul(b_packed, ac_by_layer, torch.cumsum(sizes, 0), out, a2=a2, b2=T)
    return out


_IMPLEMENTATIONS = {"torch": _fuse_torch, "cpp": _fuse_cpp, "triton": _fuse_triton}
