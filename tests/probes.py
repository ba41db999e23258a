"""Probes of an edited UNet without sampling images: the cross-attention mass a concept's tokens
receive, and the noise predictions for fixed latents (tests and diagnostics compare models
with them)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mace.pipelines.attention import AttentionMapRecorder, ProcessorSwap
from mace.pipelines.components import added_conditions, encode_prompts
from mace.stages.lora import concept_token_mask
from mace.stages.prompts import concept_token_positions


@torch.no_grad()
def concept_attention_mass(pipe, prompts: Sequence[str], concept: str, mapping: str,
                           timesteps: Sequence[int] = (250, 500, 750), seed: int = 0, use_pooler: bool = False) -> float:
    """Mean cross-attention probability that the concept's tokens receive (with ``use_pooler``:
    the positions MACE's loss suppresses, the concept's tokens and every end-of-text position),
    over attn2 layers, heads, pixels, prompts and the given timesteps, for fixed noisy latents."""
    tok = pipe.tokenizer
    positions = torch.zeros(len(prompts), tok.model_max_length, dtype=torch.bool)
    for b, p in enumerate(prompts):
        pos = concept_token_positions(tok(p).input_ids, tok(p.replace(concept, mapping)).input_ids)
        if not pos:
            raise ValueError(f"prompt {p!r} does not contain the concept {concept!r}")
        positions[b, pos] = True
    if use_pooler:
        positions |= concept_token_mask(tok, prompts, [concept] * len(prompts), use_pooler=True)
    side = pipe.unet.config.sample_size
    recorder = AttentionMapRecorder(positions, 0, side)
    emb = encode_prompts(pipe, prompts)
    g = torch.Generator().manual_seed(seed)
    device = pipe.unet.device
    latents = torch.randn(len(prompts), pipe.unet.config.in_channels, side, side, generator=g).to(device)
    extra = added_conditions(pipe, prompts, side * pipe.vae_scale_factor)
    with ProcessorSwap(pipe.unet, lambda _: recorder) as swap:
        layers = len(swap.previous)
        for t in timesteps:
            pipe.unet(latents, torch.full((len(prompts),), t, device=device), encoder_hidden_states=emb,
                      added_cond_kwargs=extra)
    return float(recorder.maps.mean()) / (layers * len(timesteps))


@torch.no_grad()
def noise_prediction(pipe, prompts: Sequence[str], timesteps: Sequence[int] = (250, 500, 750), seed: int = 0) -> torch.Tensor:
    """The UNet's noise predictions for fixed latents, (len(timesteps), B, C, H, W)."""
    side = pipe.unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    device = pipe.unet.device
    latents = torch.randn(len(prompts), pipe.unet.config.in_channels, side, side, generator=g).to(device)
    emb = encode_prompts(pipe, prompts)
    extra = added_conditions(pipe, prompts, side * pipe.vae_scale_factor)
    return torch.stack([pipe.unet(latents, torch.full((len(prompts),), t, device=device), encoder_hidden_states=emb,
                                  added_cond_kwargs=extra).sample
                        for t in timesteps])
