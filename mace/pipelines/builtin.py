"""Built-in small Stable Diffusion models, made from configs in this repository (no downloads).

``builtin:world`` is a small text-to-image model trained on the glyph world (:mod:`mace.world`),
the model erasure quality is measured on; ``builtin:world-large`` is its 540-concept sibling with
a 128-wide text encoder. ``builtin:tiny`` is SD-1.x shaped (one CLIP text
encoder, 7 cross-attention layers) and ``builtin:tiny-sdxl`` SDXL shaped (two text encoders
whose hidden states are concatenated, added time/text embeddings); their weights are random
with a fixed seed, and each carries the scheduler its family's published model ships (PNDM,
DDIM v-prediction, Euler). ``builtin:sd14-shapes`` and ``builtin:sd21-shapes`` are SD 1.4's
and SD 2.1's full architectures with random weights, for time and memory at real shapes.
The tokenizer is always the real
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
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from mace.utils.atomic import atomic_path
from mace.utils.tokenizer import clip_tokenizer
from mace.world import IDENTITY_PILOT, IDENTITY_WORLD, LARGE_WORLD, WORLD, WORLDS, GlyphWorld, load_world_components, weights_fingerprint

BUILTIN_PREFIX = "builtin:"
_VERSION = "v2"  # bump when a builtin config changes, so old caches are not reused


def cache_dir() -> Path:
    """Where builtin models are stored: $MACE_HOME, else ~/.cache/mace."""
    return Path(os.environ.get("MACE_HOME", Path.home() / ".cache" / "mace"))


def _final_layer_norm(encoder) -> torch.nn.LayerNorm:
    """The text encoder's last LayerNorm (transformers 5 flattens CLIPTextModel's text_model)."""
    return getattr(encoder, "text_model", encoder).final_layer_norm


def _text_encoder(hidden: int, layers: int, with_projection: bool, seed: int, hidden_act: str = "quick_gelu",
                  pad_token_id: int = 49407, heads: int = 4, intermediate: int | None = None):
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_token_id, hidden_act=hidden_act,
    )
    torch.manual_seed(seed)
    encoder = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()
    # A trained CLIP's final LayerNorm has a gain and a bias; at initialisation they are 1 and 0,
    # which puts every output token in the (d-1)-dimensional subspace of zero-mean vectors, so
    # closed-form solves without a ridge (the original configs' lamb: 0) would be singular.
    norm = _final_layer_norm(encoder)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(hidden))
        norm.bias.copy_(0.5 * torch.randn(hidden))
    return encoder


def _vae(seed: int):
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=64,
    ).eval()


# The scheduler each family's published model ships (its scheduler_config.json): SD 1.4/1.5 and
# SD 2.x base sample with PNDM, SD 2.x 768-v with DDIM (v-prediction), SDXL with Euler. All share
# SD's training betas; training noise comes from them through DDPM whatever the sampler
# (mace.stages.lora.forward_process).
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _scheduler(family: str):
    if family in ("sd1", "sd2-base"):
        return PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                             prediction_type="epsilon")
    if family == "sd2":
        return DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                             prediction_type="v_prediction")
    if family == "sdxl":
        return EulerDiscreteScheduler(**_SD_BETAS, interpolation_type="linear", prediction_type="epsilon",
                                      steps_offset=1, timestep_spacing="leading", use_karras_sigmas=False)
    raise ValueError(f"unknown model family {family!r}")


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
        unet=unet, scheduler=_scheduler("sd1"), safety_checker=None, feature_extractor=None,
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
        tokenizer=clip_tokenizer(pad_token="!"), unet=unet,
        scheduler=_scheduler("sd2" if prediction_type == "v_prediction" else "sd2-base"),
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
        tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=_scheduler("sdxl"),
        force_zeros_for_empty_prompt=True,
    )


def _sd_vae(seed: int, sample_size: int):
    """Stable Diffusion's VAE (SD 1.x and 2.x share it): 4 levels, 128-512 channels, 8x down."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=sample_size,
    ).eval()


def build_sd14_shapes(seed: int = 0):
    """SD 1.4's published architecture with random weights (built from configs, nothing
    downloaded): the 860M-parameter UNet (320/640/1280/1280, 16 cross-attention layers, 64 x 64
    latents), the 4-level VAE (512 px), CLIP ViT-L/14's 12-layer 768-wide text encoder and the
    PNDM scheduler SD 1.4 ships. For measuring time and memory at real shapes; it draws noise."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    return StableDiffusionPipeline(
        vae=_sd_vae(seed + 1, 512), text_encoder=_text_encoder(768, 12, False, seed + 2, heads=12, intermediate=3072),
        tokenizer=clip_tokenizer(), unet=unet, scheduler=_scheduler("sd1"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def build_sd21_shapes(seed: int = 0):
    """SD 2.1 768-v's published architecture with random weights: UNet with linear projections,
    head dims (5, 10, 20, 20), 1024-wide context, 96 x 96 latents (768 px), the VAE of SD 1.4,
    OpenCLIP ViT-H/14's text tower as SD 2.x uses it (23 of its 24 layers, 1024 wide, gelu,
    padded with "!") and SD 2.1's DDIM v-prediction scheduler."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                use_linear_projection=True, upcast_attention=True).eval()
    return StableDiffusionPipeline(
        vae=_sd_vae(seed + 1, 768), text_encoder=_text_encoder(1024, 23, False, seed + 2, hidden_act="gelu", pad_token_id=0, heads=16,
                                            intermediate=4096),
        tokenizer=clip_tokenizer(pad_token="!"), unet=unet, scheduler=_scheduler("sd2"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
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
    "sd14-shapes": build_sd14_shapes,
    "sd21-shapes": build_sd21_shapes,
    "world": build_world,
    "world-large": lambda: build_world(LARGE_WORLD),
    "world-identity": lambda: build_world(IDENTITY_WORLD),
    "world-identity-pilot": lambda: build_world(IDENTITY_PILOT),
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
