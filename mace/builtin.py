"""Built-in small Stable Diffusion models, made from configs in this repository (no downloads).

``builtin:world`` is a small text-to-image model trained on the glyph world (:mod:`mace.world`),
the model erasure quality is measured on. ``builtin:tiny`` is SD-1.x shaped (one CLIP text
encoder, 7 cross-attention layers) and ``builtin:tiny-sdxl`` SDXL shaped (two text encoders
whose hidden states are concatenated, added time/text embeddings); their weights are random
with a fixed seed. The tokenizer is always the real
CLIP BPE tokenizer, made from the vocabulary file that open-clip-torch ships in its wheel, so
names tokenise exactly as they do for Stable Diffusion. Each is saved once as an ordinary
diffusers folder under the cache directory and loaded from there afterwards.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

BUILTIN_PREFIX = "builtin:"
_VERSION = "v1"  # bump when a builtin config changes, so old caches are not reused


def cache_dir() -> Path:
    """Where builtin models are stored: $MACE_HOME, else ~/.cache/mace."""
    return Path(os.environ.get("MACE_HOME", Path.home() / ".cache" / "mace"))


def clip_bpe_path() -> Path:
    """The OpenAI CLIP BPE merges file shipped inside the open-clip-torch wheel.

    open_clip itself is not imported (it needs torchvision); only its data file is used.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the builtin models need the CLIP vocabulary from open-clip-torch: "
            "pip install --no-deps open-clip-torch"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise RuntimeError(f"open-clip-torch is installed but {path.name} is missing")
    return path


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in vocabulary order.

    Printable bytes stand for themselves and come first; the other bytes follow, mapped to
    code points from 256 up.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@lru_cache(maxsize=2)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49,408-entry vocabulary and its merges, from the BPE file."""
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a header; CLIP uses the first 49152 - 256 - 2 merges.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The Stable Diffusion CLIP tokenizer (SDXL's second tokenizer pads with '!')."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=77, pad_token=pad_token)


def _text_encoder(hidden: int, layers: int, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu",
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=64,
    ).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )


def build_tiny_sd(seed: int = 0):
    """SD-1.x shaped: text width 64, UNet (32, 64) with 7 cross-attention layers, 64x64 images."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

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


def build_tiny_sdxl(seed: int = 0):
    """SDXL shaped: two text encoders (32 + 32 = 64 wide context), pooled text + time embeddings."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

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


def build_world():
    """The trained glyph-world model (mace.world): weights shipped in the package, real tokenizer."""
    from diffusers import StableDiffusionPipeline

    from .world import load_world_components

    return StableDiffusionPipeline(
        **load_world_components(), tokenizer=clip_tokenizer(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


BUILTIN_MODELS = {"tiny": build_tiny_sd, "tiny-sdxl": build_tiny_sdxl, "world": build_world}


def _version(key: str) -> str:
    if key == "world":  # retrained weights get a fresh cache folder
        from .world import weights_fingerprint

        return f"{_VERSION}-{weights_fingerprint()}"
    return _VERSION


def builtin_model_path(name: str) -> Path:
    """The diffusers folder of a builtin model, built and saved atomically on first use."""
    key = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else name
    if key not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)}")
    target = cache_dir() / "builtin" / f"{key}-{_version(key)}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        BUILTIN_MODELS[key]().save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process saved it first
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
