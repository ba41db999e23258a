"""Image generation with one seed per image: image i is drawn from the noise of its own seed,
whatever else is in its batch, so two models (or two runs) are compared on the same noise."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate_images(
    pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 20, guidance_scale: float = 4.0,
    batch_size: int = 128, progress: bool = True,
) -> torch.Tensor:
    """Images in [-1, 1], (N, 3, H, W), on the CPU; image i is drawn from the noise of ``seeds[i]`` alone."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
        images = pipe(list(prompts[chunk]), num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generators, output_type="pt").images
        out.append(images.float().cpu() * 2 - 1)  # diffusers leaves "pt" images on the model's device
    if not out:
        return torch.zeros(0, 3, 32, 32)
    return torch.cat(out)
