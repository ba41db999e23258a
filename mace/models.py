"""Loading Stable Diffusion pipelines and reaching their cross-attention key/value projections.

MACE edits only ``attn2.to_k`` and ``attn2.to_v`` of the UNet: the projections that read the
text embedding (width d: 768 SD1, 1024 SD2, 2048 SDXL). Everything else in this package talks
to a model through the helpers here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .builtin import BUILTIN_PREFIX, builtin_model_path


class NoCrossAttentionError(ValueError):
    """The model has no cross-attention key/value projections to edit."""


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
):
    """Load a diffusers Stable Diffusion (1.x, 2.x, XL) pipeline from a folder, hub id or builtin.

    ``builtin:tiny`` and ``builtin:tiny-sdxl`` are small models made from configs in this
    repository (see :mod:`mace.builtin`); nothing is downloaded for them.
    """
    from diffusers import DiffusionPipeline

    path = resolve_model_path(name_or_path)
    if not str(name_or_path).startswith(BUILTIN_PREFIX) and os.sep in path and not Path(path).exists():
        raise FileNotFoundError(f"model folder {path} does not exist")
    kwargs = {"dtype": torch_dtype}
    index = Path(path) / "model_index.json"
    if index.exists() and "safety_checker" in json.loads(index.read_text()):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    cross_attention_projections(pipe.unet)  # fail early on a model MACE cannot edit
    return pipe


def cross_attention_projections(unet: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every cross-attention key and value projection, as (module name, nn.Linear), in order.

    32 for SD 1.4 (16 attn2 layers x to_k, to_v). Names are the UNet's module paths, e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``.
    """
    found = []
    for name, module in unet.named_modules():
        if name.endswith("attn2") and getattr(module, "is_cross_attention", True):
            for proj in ("to_k", "to_v"):
                linear = getattr(module, proj, None)
                linear = getattr(linear, "base_layer", linear)  # a peft LoRA layer wraps the Linear
                if isinstance(linear, nn.Linear):
                    found.append((f"{name}.{proj}", linear))
    if not found:
        raise NoCrossAttentionError(
            f"{type(unet).__name__} has no cross-attention (attn2.to_k / attn2.to_v) layers: "
            "MACE edits text-conditioned diffusion models only"
        )
    return found


def text_width(pipe) -> int:
    """d: the width of the text embedding the cross-attention layers read."""
    return cross_attention_projections(pipe.unet)[0][1].in_features


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(B, 77, d) text embeddings exactly as the pipeline feeds them to the UNet's attn2.

    SD 1.x/2.x: the text encoder's last hidden state. SDXL: the penultimate hidden states of
    both encoders, concatenated (the pooled embedding goes elsewhere and is not edited).
    """
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
    outs = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        parts = []
        for tok, enc in encoders:
            ids = tok(chunk, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            if len(encoders) == 1:
                parts.append(enc(ids)[0])
            else:
                parts.append(enc(ids, output_hidden_states=True).hidden_states[-2])
        outs.append(torch.cat(parts, dim=-1).float())
    if not outs:
        return torch.zeros(0, pipe.tokenizer.model_max_length, text_width(pipe))
    return torch.cat(outs)


def text_encoder_fingerprint(pipe) -> str:
    """A short hash identifying the text encoder(s): configs plus a strided sample of weights.

    Statistics caches record it, so a cache made with another text encoder is refused.
    """
    h = hashlib.sha256()
    for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if enc is None:
            continue
        # Where it was loaded from and by which library version does not change the encoder.
        config = {k: v for k, v in enc.config.to_dict().items()
                  if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, p in sorted(enc.state_dict().items()):
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float32).cpu().numpy()
            h.update(name.encode())
            h.update(sample.tobytes())
    return h.hexdigest()[:16]
