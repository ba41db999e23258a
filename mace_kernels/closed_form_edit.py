"""closed_form_edit: W_l @ T for a packed list of layers of different out sizes, in one call.

Closed-form refinement replaces every cross-attention key/value projection W_l by W_l T with
the same d x d transform T; packing all layers' rows turns 32 small GEMMs into one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._backend import OPS_NAMESPACE, accumulation_dtype, cpp_ops, implementation
from ._grouped_matmul import grouped_matmul
from ._utils import shape_of


def closed_form_edit(
    weights: Sequence[torch.Tensor], transform: torch.Tensor, *, backend: str | None = None
) -> list[torch.Tensor]:
    """Return ``[W_l @ transform for W_l in weights]``, each in its own weight's dtype.

    weights: sequence of (out_l, d) tensors; transform: (d, d). The product runs in float64
    when transform is float64, else float32.

    Runs the custom op ``torch.ops.mace.closed_form_edit`` (the packed product, all layers'
    rows stacked, in the accumulation dtype; it resolves ``backend`` when it runs) and splits
    its result per layer.
    """
    weights = list(weights)
    _check_inputs(weights, transform)
    packed = _closed_form_edit_op(weights, transform, "auto" if backend is None else backend)
    sizes = [w.shape[0] for w in weights]
    return [part.to(w.dtype) for part, w in zip(torch.split(packed, sizes), weights, strict=True)]


def _check_inputs(weights, transform) -> torch.dtype:
    """Shapes, dtypes and devices (no values); the accumulation dtype."""
    if not isinstance(transform, torch.Tensor) or transform.dim() != 2 or transform.shape[0] != transform.shape[1]:
        raise ValueError(f"closed_form_edit: transform must be (d, d), got {shape_of(transform)}")
    if not transform.is_floating_point():
        raise TypeError(f"closed_form_edit: transform must be floating point, got {transform.dtype}")
    d = transform.shape[0]
    if not weights:
        raise ValueError("closed_form_edit: weights is empty")
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != d:
            raise ValueError(f"closed_form_edit: weights[{i}] must be (out, {d}), got {shape_of(w)}")
        if not w.is_floating_point():
            raise TypeError(f"closed_form_edit: weights[{i}] must be floating point, got {w.dtype}")
        if w.device != transform.device:
            raise ValueError(f"closed_form_edit: weights[{i}] is on {w.device}, transform on {transform.device}")
    return accumulation_dtype(transform.dtype)


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op(f"{OPS_NAMESPACE}::closed_form_edit", mutates_args=())
def _closed_form_edit_op(weights: list[torch.Tensor], transform: torch.Tensor, backend: str) -> torch.Tensor:
    """cat([W_l @ transform]) (sum out_l, d) in the accumulation dtype; backend "auto" or a name."""
    acc = _check_inputs(weights, transform)
    run = implementation("closed_form_edit", _IMPLEMENTATIONS, backend, transform.device)
    return run([w.contiguous() for w in weights], transform.to(acc)).contiguous()


@_closed_form_edit_op.register_fake
def _closed_form_edit_fake(weights, transform, backend):
    acc = _check_inputs(weights, transform)
    return transform.new_empty((sum(w.shape[0] for w in weights), transform.shape[1]), dtype=acc)


def _edit_torch(weights, T):
    """Reference: one matmul per layer."""
    return torch.cat([w.to(T.dtype) @ T for w in weights])


def _edit_cpp(weights, T):
    return cpp_ops().packed_matmul(weights, T)


def _edit_triton(weights, T):
    packed = torch.cat(weights) if len({w.dtype for w in weights}) == 1 else torch.cat([w.to(T.dtype) for w in weights])
    out = torch.empty((packed.shape[0], T.shape[1]), dtype=T.dtype, device=T.device)
    offsets = torch.tensor([0, packed.shape[0]])
    return grouped_matmul(packed, T.unsqueeze(0), offsets, out)


_IMPLEMENTATIONS = {"torch": _edit_torch, "cpp": _edit_cpp, "triton": _edit_triton}
