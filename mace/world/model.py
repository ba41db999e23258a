"""The trained glyph-world components: the shipped weights (or a training run's), loaded as
diffusers/transformers models, and the classifier."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from mace.utils.fingerprint import files_digest
from mace.world.classifier import GlyphClassifier
from mace.world.concepts import WORLD, GlyphWorld

WORLD_MODEL = WORLD.model


def weights_dir(world: GlyphWorld = WORLD) -> Path:
    """Where a world's trained weights live (one folder per component)."""
    return Path(__file__).parent / ("weights" if world is WORLD else f"weights_{world.key.removeprefix('world-')}")


def _require_weights(component: str, directory: Path | None = None, world: GlyphWorld = WORLD) -> Path:
    path = (directory or weights_dir(world)) / component
    if not path.is_dir():
        raise FileNotFoundError(
            f"the {world.model} {component} weights are missing from {path}; "
            f"train them with python -m mace.world.train --world {world.key}"
        )
    return path


@cache  # every load of a world model asks; the shipped files do not change under a process
def weights_fingerprint(world: GlyphWorld = WORLD) -> str:
    """A short hash of a world's shipped UNet, text encoder and VAE weights."""
    return weights_fingerprint_of(None, world)


def weights_fingerprint_of(directory: Path | None, world: GlyphWorld = WORLD) -> str:
    """A short hash of the UNet, text encoder and VAE weights in ``directory`` (default: shipped)."""
    h = hashlib.sha256()
    for component in ("unet", "text_encoder", "vae"):
        for f in sorted(_require_weights(component, directory, world).glob("*.safetensors")):
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def classifier_digest(directory: Path | None = None, world: GlyphWorld = WORLD) -> str:
    """A hash of the classifier files in ``directory`` (default: the world's shipped weights)."""
    return files_digest(sorted(((directory or weights_dir(world)) / "classifier").glob("*")))


def load_world_components(directory: Path | None = None, world: GlyphWorld = WORLD) -> dict:
    """unet, vae, text_encoder and scheduler of a trained world model (the shipped weights, or
    those in ``directory``), in float32."""
    def need(component: str) -> Path:
        return _require_weights(component, directory, world)

    return {
        "unet": UNet2DConditionModel.from_pretrained(need("unet"), torch_dtype=torch.float32),
        "vae": AutoencoderKL.from_pretrained(need("vae"), torch_dtype=torch.float32),
        "text_encoder": CLIPTextModel.from_pretrained(need("text_encoder"), dtype=torch.float32),
        "scheduler": DDIMScheduler.from_pretrained(need("scheduler")),
    }


def training_noise_scheduler() -> DDPMScheduler:
    """The noise schedule the world models are trained under (Stable Diffusion's)."""
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def load_classifier(world: GlyphWorld = WORLD) -> GlyphClassifier:
    """A world's shipped glyph classifier, in eval mode."""
    return GlyphClassifier.from_pretrained(_require_weights("classifier", world=world))
