"""Reaching a Stable Diffusion pipeline's cross-attention key/value projections and its text encoders.

MACE edits only ``attn2.to_k`` and ``attn2.to_v`` of the UNet: the projections that read the
text embedding (width d: 768 SD1, 1024 SD2, 2048 SDXL). Everything else in this package talks
to a model through the helpers here (loading a pipeline is :mod:`mace.pipelines.loading`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from torch import nn


class NoCrossAttentionError(ValueError):
    """The model has no cross-attention key/value projections to edit."""


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
            f"{type(unet).__name__} has no cross-attention (attn2.to_k / attn2.to_v) layers: MACE's closed form edits "
            "the key/value projections that read the text alone, as UNets of SD 1.x, 2.x and XL have them; MMDiT "
            "models (SD3, FLUX) attend to text and image tokens jointly and have none"
        )
    return found


def projection_weights(unet: nn.Module) -> list[torch.Tensor]:
    """The weight tensors of every cross-attention key/value projection (live, not copies)."""
    return [lin.weight.data for _, lin in cross_attention_projections(unet)]


def set_projection_weights(unet: nn.Module, weights: Sequence[torch.Tensor]) -> None:
    """Copy ``weights`` (projection order, any device/dtype) into the UNet's projections."""
    live = projection_weights(unet)
    if len(live) != len(weights):
        raise ValueError(f"{len(weights)} weights for {len(live)} cross-attention projections")
    with torch.no_grad():
        for w, new in zip(live, weights, strict=True):
            if w.shape != new.shape:
                raise ValueError(f"a projection weight is {tuple(w.shape)}, got {tuple(new.shape)}")
            w.copy_(new.to(w.device, w.dtype))


R = TypeVar("R")


def edit_projections(unet: nn.Module, edit: Callable[[list[torch.Tensor]], tuple[list[torch.Tensor], R]]) -> R:
    """Apply a closed-form edit: ``edit(weights on the CPU) -> (new weights, report)``; the new
    weights are copied back into the UNet (its device and dtype) and the report returned."""
    new, report = edit([w.detach().cpu() for w in projection_weights(unet)])
    set_projection_weights(unet, new)
    return report


def read_projection_weights(model_dir: str | os.PathLike, names: Sequence[str]) -> list[torch.Tensor]:
    """The named projections' weights from a saved diffusers pipeline's UNet safetensors, without
    loading the rest of the model (MACE's stages change only these)."""
    unet_dir = Path(model_dir) / "unet"
    index = next(iter(sorted(unet_dir.glob("*.safetensors.index.json"))), None)
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(unet_dir.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"{unet_dir}: expected one UNet .safetensors file, found {len(files)}")
        weight_map = None
    out = []
    for name in names:
        key = f"{name}.weight"
        file = unet_dir / weight_map[key] if weight_map is not None else files[0]
        with safe_open(str(file), framework="pt") as f:
            if key not in f.keys():
                raise KeyError(f"{file}: no tensor {key}; is {model_dir} a model of the same architecture?")
            out.append(f.get_tensor(key))
    return out


def text_width(pipe) -> int:
    """d: the width of the text embedding the cross-attention layers read."""
    return cross_attention_projections(pipe.unet)[0][1].in_features


def text_encoders(pipe) -> list[tuple]:
    """(tokenizer, text encoder) pairs: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def tokenize(pipe, prompts: Sequence[str]) -> list[torch.Tensor]:
    """(B, 77) token ids per text encoder, padded to the tokenizer's length."""
    return [tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok, _ in text_encoders(pipe)]


def encode_ids(pipe, ids: Sequence[torch.Tensor], insert: Sequence[torch.Tensor] | None = None,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings (B, 77, d) exactly as the pipeline feeds them to the UNet's attn2, and
    SDXL's pooled embedding (else None), from token ids per text encoder (``tokenize``).

    SD 1.x/2.x: the text encoder's last hidden state. SDXL: the penultimate hidden states of
    both encoders, concatenated; the pooled embedding of the second goes to the added
    conditions. With ``insert``, each encoder's token embeddings at ``positions`` are replaced
    by ``insert[e]`` ((K, d_e) or (B, K, d_e)), gradients flowing into them (the attacks'
    soft prompts).
    """
    encoders = text_encoders(pipe)
    parts, pooled = [], None
    for e, ((_, enc), enc_ids) in enumerate(zip(encoders, ids, strict=True)):
        handle = None
        if insert is not None:
            value = insert[e]

            def hook(module, inputs, output, value=value):
                output = output.clone()
                output[:, positions] = value.to(output.dtype)
                return output

            handle = enc.get_input_embeddings().register_forward_hook(hook)
        try:
            enc_ids = enc_ids.to(enc.device)
            if len(encoders) == 1:
                parts.append(enc(enc_ids)[0])
            else:
                out = enc(enc_ids, output_hidden_states=True)
                parts.append(out.hidden_states[-2])
                if e == 1:
                    pooled = out[0].float()
        finally:
            if handle is not None:
                handle.remove()
    return torch.cat(parts, dim=-1).float(), pooled


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(B, 77, d) text embeddings exactly as the pipeline feeds them to the UNet's attn2
    (``encode_ids`` of the prompts, in batches)."""
    outs = [encode_ids(pipe, tokenize(pipe, prompts[start:start + batch_size]))[0]
            for start in range(0, len(prompts), batch_size)]
    if not outs:
        return torch.zeros(0, pipe.tokenizer.model_max_length, text_width(pipe))
    return torch.cat(outs)


def pooled_conditions(pooled: torch.Tensor | None, resolution: int) -> dict[str, torch.Tensor] | None:
    """SDXL's added UNet conditions from the pooled text embedding (B, p): it and the size/crop
    time ids of an uncropped ``resolution`` image; None when there is no pooled embedding."""
    if pooled is None:
        return None
    time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": time_ids.repeat(len(pooled), 1)}


@torch.no_grad()
def added_conditions(pipe, prompts: Sequence[str], resolution: int) -> dict[str, torch.Tensor] | None:
    """The UNet's added conditions for ``prompts`` (SDXL: ``pooled_conditions``); None for models
    without them (SD 1.x/2.x)."""
    if pipe.unet.config.get("addition_embed_type") != "text_time":
        return None
    tok, enc = pipe.tokenizer_2, pipe.text_encoder_2
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(enc.device)
    return pooled_conditions(enc(ids)[0].float(), resolution)


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


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """No parameter of ``modules`` records gradients inside the block (restored afterwards)."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
