"""The trained glyph-world components: the shipped weights (or a training run's), loaded as
diffusers/transformers models, and the classifier."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from .classifier import GlyphClassifier

WORLD_MODEL = "builtin:world"


def weights_dir() -> Path:
    """Where the trained weights live (one folder per component)."""
    return Path(__file__).parent / "weights"


def _require_weights(component: str, directory: Path | None = None) -> Path:
    path = (directory or weights_dir()) / component
    if not path.is_dir():
        raise FileNotFoundError(
            f"the glyph world's {component} weights are missing from {path}; train them with python -m mace.world.train"
        )
    return path


@lru_cache(maxsize=1)  # every load of builtin:world asks; the shipped files do not change under a process
def weights_fingerprint() -> str:
    """A short hash of the shipped UNet, text encoder and VAE weights."""
    h = hashlib.sha256()
    for component in ("unet", "text_encoder", "vae"):
        for f in sorted(_require_weights(component).glob("*.safetensors")):
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def load_world_components(directory: Path | None = None) -> dict:
    """unet, vae, text_encoder and scheduler of the trained world model (the shipped weights, or
    those in ``directory``), in float32."""
    return {
        "unet": UNet2DConditionModel.from_pretrained(_require_weights("unet", directory), torch_dtype=torch.float32),
        "vae": AutoencoderKL.from_pretrained(_require_weights("vae", directory), torch_dtype=torch.float32),
        "text_encoder": CLIPTextModel.from_pretrained(_require_weights("text_encoder", directory), dtype=torch.float32),
        "scheduler": DDIMScheduler.from_pretrained(_require_weights("scheduler", directory)),
    }


def load_classifier() -> GlyphClassifier:
    """The shipped glyph classifier, in eval mode."""
    return GlyphClassifier.from_pretrained(_require_weights("classifier"))
