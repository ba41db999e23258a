"""Small helpers shared by the op modules."""

from __future__ import annotations

import torch


def shape_of(value: object) -> str:
    """How an argument looks in an error message: ``shape (3, 4)`` for a tensor, else its type."""
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
