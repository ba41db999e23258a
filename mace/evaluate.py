"""Measurements of an erasure: attention mass, noise-prediction change, image generation with
per-image seeds, and CLIP-based metrics for real models (the glyph world's classifier-based
protocol is in mace.world.evaluate)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .attention import ProcessorSwap
from .models import encode_prompts
from .prepare import AttentionMapRecorder
from .prompts import concept_token_positions


@torch.no_grad()
def concept_attention_mass(pipe, prompts: Sequence[str], concept: str, mapping: str,
                           timesteps: Sequence[int] = (250, 500, 750), seed: int = 0) -> float:
    """Mean cross-attention probability that the concept's tokens receive, over attn2 layers,
    heads, pixels, prompts and the given timesteps, for fixed noisy latents."""
    tok = pipe.tokenizer
    positions = torch.zeros(len(prompts), tok.model_max_length, dtype=torch.bool)
    for b, p in enumerate(prompts):
        pos = concept_token_positions(tok(p).input_ids, tok(p.replace(concept, mapping)).input_ids)
        if not pos:
            raise ValueError(f"prompt {p!r} does not contain the concept {concept!r}")
        positions[b, pos] = True
    side = pipe.unet.config.sample_size
    recorder = AttentionMapRecorder(positions, 0, side)
    emb = encode_prompts(pipe, prompts)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), pipe.unet.config.in_channels, side, side, generator=g)
    with ProcessorSwap(pipe.unet, lambda _: recorder) as swap:
        for t in timesteps:
            pipe.unet(latents, torch.full((len(prompts),), t), encoder_hidden_states=emb)
    layers = len(swap.previous)
    return float(recorder.maps.mean()) / (layers * len(timesteps))


@torch.no_grad()
def noise_prediction(pipe, prompts: Sequence[str], timesteps: Sequence[int] = (250, 500, 750), seed: int = 0) -> torch.Tensor:
    """The UNet's noise predictions for fixed latents, (len(timesteps), B, C, H, W)."""
    side = pipe.unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), pipe.unet.config.in_channels, side, side, generator=g)
    emb = encode_prompts(pipe, prompts)
    return torch.stack([pipe.unet(latents, torch.full((len(prompts),), t), encoder_hidden_states=emb).sample
                        for t in timesteps])


@torch.no_grad()
def generate_images(
    pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 20, guidance_scale: float = 4.0,
    batch_size: int = 128, progress: bool = True,
) -> torch.Tensor:
    """Images in [-1, 1], (N, 3, H, W); image i is drawn from the noise of ``seeds[i]`` alone."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
        images = pipe(list(prompts[chunk]), num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generators, output_type="pt").images
        out.append(images.float() * 2 - 1)
    if not out:
        return torch.zeros(0, 3, 32, 32)
    return torch.cat(out)


# Prompts for CLIP-based evaluation of real models; none is one of mace.prompts' refinement templates.
CLIP_EVAL_TEMPLATES = ("an image capturing {} at an event", "a headshot of {}", "{} in an official photo",
                       "a color picture of {}", "an illustration of {}")


def clip_evaluation(pipe, erased: Sequence[str], kept: Sequence[str], clip, *, original=None, images_per_concept: int = 5,
                    steps: int = 30, guidance_scale: float = 7.5, batch_size: int = 16, seed: int = 0,
                    progress: bool = True) -> dict:
    """CLIP zero-shot accuracy of erased and kept concepts (over all their names), the kept
    prompts' CLIP score and, with ``original``, CLIP-feature FID of the kept images vs the
    original model's (fixed seeds): the paper's metrics for real models with the user's CLIP."""
    from .metrics import clip_score, clip_zero_shot_accuracy, fid

    names = list(erased) + list(kept)
    if not erased and not kept:
        raise ValueError("clip_evaluation needs erased or kept concepts")
    rows = [(name, CLIP_EVAL_TEMPLATES[i % len(CLIP_EVAL_TEMPLATES)].format(name), seed + 1000 * c + i)
            for c, name in enumerate(names) for i in range(images_per_concept)]
    prompts = [r[1] for r in rows]
    seeds = [r[2] for r in rows]
    labels = [names.index(r[0]) for r in rows]
    images = generate_images(pipe, prompts, seeds, steps=steps, guidance_scale=guidance_scale, batch_size=batch_size, progress=progress)
    n_erased = len(erased) * images_per_concept
    out = {"prompts": len(rows)}
    if erased:
        out["clip_acc_erased"] = clip_zero_shot_accuracy(images[:n_erased], labels[:n_erased], names, clip)
    if kept:
        out["clip_acc_kept"] = clip_zero_shot_accuracy(images[n_erased:], labels[n_erased:], names, clip)
        out["clip_score_kept"] = clip_score(images[n_erased:], prompts[n_erased:], clip)
        if original is not None:
            before = generate_images(original, prompts[n_erased:], seeds[n_erased:], steps=steps, guidance_scale=guidance_scale,
                                     batch_size=batch_size, progress=progress)
            out["fid_kept_vs_original"] = fid(before, images[n_erased:], clip=clip)
    return out
