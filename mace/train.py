"""Training the per-concept LoRAs on prepared data, k concepts per UNet batch."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import check_prior_preservation, preservation_image_files
from .lora import AttentionTargets, LoraTrainingHooks, MultiConceptLoRA, concept_token_mask, sample_timesteps, train_step
from .lora_io import LORA_WEIGHT_NAME, save_lora
from .prepare import image_tensor, load_concept_data
from .prompts import PromptPair, concept_token_positions


@dataclass
class ConceptData:
    name: str
    concept_type: str
    pairs: list[PromptPair]
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    masks: torch.Tensor | None  # (N, 1, H, W) or None (styles)


@dataclass
class PreservationData:
    """Prior preservation: kept images and the one prompt that captions them."""

    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    embedding: torch.Tensor  # (1, 77, d): the preservation prompt's text embedding


def lora_dir(output_dir: str | os.PathLike, concept: str) -> Path:
    return Path(output_dir) / "lora" / concept.replace(" ", "-")


def load_preservation_images(preserve_data_dir: str | os.PathLike, resolution: int, max_images: int | None = None) -> torch.Tensor:
    """(N, 3, resolution, resolution) in [-1, 1]: the PNG/JPG images of ``preserve_data_dir``, resized."""
    images = []
    for f in preservation_image_files(preserve_data_dir, max_images):
        images.append(image_tensor(Image.open(f).convert("RGB").resize((resolution, resolution), Image.BICUBIC)))
    return torch.stack(images)


def train_concept_loras(
    pipe,
    concepts: Sequence[tuple[str, str, list[PromptPair]]],
    *,
    input_data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    rank: int,
    learning_rate: float,
    max_train_steps: int,
    train_batch_size: int,
    importance_sampling: bool,
    use_pooler: bool,
    concepts_per_batch: int,
    resolution: int,
    seed: int,
    progress: bool = True,
    with_prior_preservation: bool = False,
    preserve_prompt: str | None = None,
    preserve_data_dir: str | os.PathLike | None = None,
    prior_loss_weight: float = 1.0,
    num_class_images: int | None = None,
) -> list[Path]:
    """Train one LoRA per concept (skipping those already saved) and save each as safetensors.

    With ``with_prior_preservation``, every step adds ``train_batch_size`` images of
    ``preserve_data_dir`` (the first ``num_class_images`` PNG/JPG files, resized to
    ``resolution``) captioned with ``preserve_prompt`` per concept; they go through that
    concept's LoRA and add ``prior_loss_weight`` times the MSE of their noise prediction to the
    loss (see mace.lora.train_step). A weight of 0 adds nothing and skips them.
    """
    todo = [c for c in concepts if not (lora_dir(output_dir, c[0]) / LORA_WEIGHT_NAME).exists()]
    check_prior_preservation(with_prior_preservation, preserve_prompt, preserve_data_dir, prior_loss_weight)
    unet, vae, sched = pipe.unet, pipe.vae, pipe.scheduler
    prior = None
    if todo and with_prior_preservation and prior_loss_weight > 0:
        from .models import encode_prompts

        with torch.no_grad():
            prior = PreservationData(load_preservation_images(preserve_data_dir, resolution, num_class_images),
                                     encode_prompts(pipe, [preserve_prompt]))
    for p in list(unet.parameters()) + list(vae.parameters()) + list(pipe.text_encoder.parameters()):
        p.requires_grad_(False)
    saved = []
    groups = [todo[i:i + concepts_per_batch] for i in range(0, len(todo), concepts_per_batch)]
    bar = tqdm(total=len(todo) * max_train_steps, desc="LoRA training", unit="concept-step", disable=not progress)
    for g_index, group in enumerate(groups):
        data = [ConceptData(name, kind, pairs, *load_concept_data(input_data_dir, name, kind, resolution))
                for name, kind, pairs in group]
        lora = MultiConceptLoRA(unet, len(group), rank, seed=seed + g_index)
        hooks = LoraTrainingHooks(unet, lora)
        optimizer = torch.optim.AdamW(lora.parameters(), lr=learning_rate, weight_decay=0.0)
        rng = random.Random(seed + g_index)
        gen = torch.Generator().manual_seed(seed + g_index)
        try:
            for _ in range(max_train_steps):
                batch = _sample_batch(pipe, data, train_batch_size, use_pooler, rng, gen, prior)
                latents = vae.encode(batch["images"]).latent_dist.sample(gen) * vae.config.scaling_factor
                noise = torch.randn(latents.shape, generator=gen)
                t = sample_timesteps(latents.shape[0], sched.config.num_train_timesteps, importance_sampling, gen)
                targets = AttentionTargets(batch["tokens"], batch["masks"], [train_batch_size] * len(group),
                                           prior_sizes=[train_batch_size] * len(group) if prior is not None else None)
                loss = train_step(unet, hooks, sched, latents, batch["embeddings"], targets, noise, t,
                                  prior_loss_weight=prior_loss_weight)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(len(group))
                bar.set_postfix(loss=f"{float(loss):.3f}")
        finally:
            hooks.remove()
        for k, (name, _, _) in enumerate(group):
            saved.append(save_lora(lora_dir(output_dir, name), lora.concept_lora(k), alpha=float(rank)))
    bar.close()
    return saved


def _sample_batch(pipe, data: list[ConceptData], per_concept: int, use_pooler: bool, rng, gen,
                  prior: PreservationData | None = None):
    """per_concept samples of each concept in turn; with ``prior``, each concept's samples are
    followed by per_concept preservation samples (the batch layout AttentionTargets describes)."""
    from .models import encode_prompts

    prompts, positions, images, masks = [], [], [], []
    prior_images = []
    any_mask = any(d.masks is not None for d in data)
    for d in data:
        for _ in range(per_concept):
            pair = rng.choice(d.pairs)
            ids_o = pipe.tokenizer(pair.old).input_ids
            ids_n = pipe.tokenizer(pair.new).input_ids
            prompts.append(pair.old)
            positions.append(concept_token_positions(ids_o, ids_n))
            i = int(torch.randint(0, d.images.shape[0], (1,), generator=gen))
            images.append(d.images[i])
            if any_mask:
                masks.append(d.masks[i] if d.masks is not None else torch.ones(1, *d.images.shape[-2:]))
        if prior is not None:
            picks = torch.randint(0, prior.images.shape[0], (per_concept,), generator=gen)
            prior_images.append(prior.images[picks])
    embeddings = encode_prompts(pipe, prompts)
    if prior is not None:
        # Interleave: concept k's samples, then its preservation samples.
        concept_images = torch.stack(images).split(per_concept)
        concept_embeddings = embeddings.split(per_concept)
        prior_embedding = prior.embedding.to(embeddings).expand(per_concept, -1, -1)
        batch_images = torch.cat([x for pair in zip(concept_images, prior_images) for x in pair])
        embeddings = torch.cat([x for e in concept_embeddings for x in (e, prior_embedding)])
    else:
        batch_images = torch.stack(images)
    return {
        "images": batch_images,
        "masks": torch.stack(masks) if any_mask else None,
        "tokens": concept_token_mask(pipe.tokenizer, prompts, positions, use_pooler),
        "embeddings": embeddings,
    }
