"""Loading Stable Diffusion pipelines (diffusers folders, hub ids, builtin models) and saving them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from .atomic import save_pipeline_atomically
from .builtin import BUILTIN_PREFIX, builtin_model_path
from .models import cross_attention_projections

__all__ = ["load_pipeline", "resolve_model_path", "save_pipeline_atomically"]


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A builtin name ('builtin:tiny') becomes its cached folder; anything else is passed on."""
    name = str(name_or_path)
    if name.startswith(BUILTIN_PREFIX):
        return str(builtin_model_path(name))
    return name


def load_pipeline(
    name_or_path: str | os.PathLike,
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    revision: str | None = None,
):
    """Load a diffusers Stable Diffusion (1.x, 2.x, XL) pipeline from a folder, hub id or builtin.

    ``builtin:tiny`` and ``builtin:tiny-sdxl`` are small models made from configs in this
    repository (see :mod:`mace.builtin`); nothing is downloaded for them.
    """
    path = resolve_model_path(name_or_path)
    if not str(name_or_path).startswith(BUILTIN_PREFIX) and os.sep in path and not Path(path).exists():
        raise FileNotFoundError(f"model folder {path} does not exist")
    kwargs = {"dtype": torch_dtype}
    if revision is not None:
        kwargs["revision"] = revision
    index = Path(path) / "model_index.json"
    if index.exists() and "safety_checker" in json.loads(index.read_text()):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # Fail early on a model MACE cannot edit (an MMDiT pipeline has a transformer, no UNet).
    cross_attention_projections(getattr(pipe, "unet", None) or getattr(pipe, "transformer", pipe))
    return pipe
