"""Built-in small Stable Diffusion models, made from configs in this repository (no downloads).

``builtin:world`` is a small text-to-image model trained on the glyph world (:mod:`mace.world`),
the model erasure quality is measured on; ``builtin:world-large`` is its 540-concept sibling with
a 128-wide text encoder. ``builtin:tiny`` is SD-1.x shaped (one CLIP text
encoder, 7 cross-attention layers) and ``builtin:tiny-sdxl`` SDXL shaped (two text encoders
whose hidden states are concatenated, added time/text embeddings); their weights are random
with a fixed seed. The tokenizer is always the real
CLIP BPE tokenizer, made from the vocabulary file that open-clip-torch ships in its wheel, so
names tokenise exactly as they do for Stable Diffusion. Each is saved once as an ordinary
diffusers folder under the cache directory and loaded from there afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .atomic import atomic_path
from .tokenizer import clip_tokenizer
from .world import LARGE_WORLD, WORLD, WORLDS, GlyphWorld, load_world_components, weights_fingerprint

BUILTIN_PREFIX = "builtin:"
_VERSION = "v1"  # bump when a builtin config changes, so old caches are not reused


def cache_dir() -> Path:
    """Where builtin models are stored: $MACE_HOME, else ~/.cache/mace."""
    return Path(os.environ.get("MACE_HOME", Path.home() / ".cache" / "mace"))


def _text_encoder(hidden: int, layers: int, with_projection: bool, seed: int, hidden_act: str = "quick_gelu",
                  pad_token_id: int = 49407):
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_token_id, hidden_act=hidden_act,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _vae(seed: int):
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=64,
    ).eval()


def _scheduler(prediction_type: str = "epsilon"):
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def build_tiny_sd(seed: int = 0):
    """SD-1.x shaped: text width 64, UNet (32, 64) with 7 cross-attention layers, 64x64 images."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    ).eval()
    return StableDiffusionPipeline(
        vae=_vae(seed + 1), text_encoder=_text_encoder(64, 2, False, seed + 2), tokenizer=clip_tokenizer(),
        unet=unet, scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd2(seed: int = 0, prediction_type: str = "v_prediction"):
    """SD-2.x shaped: an OpenCLIP-style text encoder (gelu, its tokenizer pads with "!"), 96 wide,
    linear projections in the transformer blocks, upcast attention, and the v-prediction
    objective of SD 2.x 768-v (``builtin:tiny-sd2``) or the epsilon one of SD 2.x base
    (``builtin:tiny-sd2-base``)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=96, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
        norm_num_groups=32,
    ).eval()
    return StableDiffusionPipeline(
        vae=_vae(seed + 1), text_encoder=_text_encoder(96, 2, False, seed + 2, hidden_act="gelu", pad_token_id=0),
        tokenizer=clip_tokenizer(pad_token="!"), unet=unet, scheduler=_scheduler(prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_sdxl(seed: int = 0):
    """SDXL shaped: two text encoders (32 + 32 = 64 wide context), pooled text + time embeddings."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(1, 2),
        norm_num_groups=32,
    ).eval()
    return StableDiffusionXLPipeline(
        vae=_vae(seed + 1), text_encoder=_text_encoder(32, 2, False, seed + 2),
        text_encoder_2=_text_encoder(32, 2, True, seed + 3), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def build_world(world: GlyphWorld = WORLD):
    """A trained glyph-world model (mace.world): weights shipped in the package, real tokenizer."""
    return StableDiffusionPipeline(
        **load_world_components(world=world), tokenizer=clip_tokenizer(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


BUILTIN_MODELS = {
    "tiny": build_tiny_sd,
    "tiny-sd2": build_tiny_sd2,
    "tiny-sd2-base": lambda: build_tiny_sd2(prediction_type="epsilon"),
    "tiny-sdxl": build_tiny_sdxl,
    "world": build_world,
    "world-large": lambda: build_world(LARGE_WORLD),
}


def _version(key: str) -> str:
    if key in WORLDS:  # retrained weights get a fresh cache folder
        return f"{_VERSION}-{weights_fingerprint(WORLDS[key])}"
    return _VERSION


def builtin_model_path(name: str) -> Path:
    """The diffusers folder of a builtin model, built and saved atomically on first use."""
    key = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else name
    if key not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)}")
    target = cache_dir() / "builtin" / f"{key}-{_version(key)}"
    if (target / "model_index.json").exists():
        return target
    with atomic_path(target, directory=True, replace=False) as staging:  # another process may save it first
        BUILTIN_MODELS[key]().save_pretrained(staging)
    return target
