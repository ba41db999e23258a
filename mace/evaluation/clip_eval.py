"""Evaluating an erasure on a real model with a CLIP model the user provides: CLIP zero-shot
accuracy of erased and kept concepts, CLIP score and CLIP-feature FID of the kept prompts (the
glyph world's classifier-based protocol is mace.world.evaluate)."""

from __future__ import annotations

from collections.abc import Sequence

from mace.evaluation.metrics import clip_score, clip_zero_shot_accuracy, fid
from mace.utils.sampling import generate_images

# Prompts for CLIP-based evaluation of real models; none is one of mace.stages.prompts' refinement templates.
CLIP_EVAL_TEMPLATES = ("an image capturing {} at an event", "a headshot of {}", "{} in an official photo",
                       "a color picture of {}", "an illustration of {}")


def clip_evaluation(pipe, erased: Sequence[str], kept: Sequence[str], clip, *, original=None, images_per_concept: int = 5,
                    steps: int = 30, guidance_scale: float = 7.5, batch_size: int = 16, seed: int = 0,
                    progress: bool = True) -> dict:
    """CLIP zero-shot accuracy of erased and kept concepts (over all their names), the kept
    prompts' CLIP score and, with ``original``, CLIP-feature FID of the kept images vs the
    original model's (fixed seeds): the paper's metrics for real models with the user's CLIP."""
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
