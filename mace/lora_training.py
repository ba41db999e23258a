"""Stage 2 of MACE: one LoRA per concept, trained on the concept's prepared images so that the
refined model stops attending to the concept's tokens (the loss and the batched step are in
mace.lora; docs/design.md, section 5).

Concepts train ``concepts_per_batch`` at a time in one UNet batch. Every random choice of a
concept (its initial LoRA, its prompts, images, noise and timesteps) comes from a generator of
its own, seeded by the run's seed and the concept's name, so a concept's LoRA does not depend
on which concepts share its batch: a rerun that retrains one concept alone gets the LoRA a
full run would have given it.

Each saved LoRA has a fingerprint beside it (``mace_fingerprint.json``): the refined weights it
was trained on, its training settings, prompts and the bytes of its images and masks. A rerun
retrains exactly the concepts whose fingerprint changed.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import write_json_atomically
from .config import MACEConfig, check_prior_preservation
from .fingerprint import digest, files_digest, seed_for, tensors_digest
from .images import image_files, image_tensor, read_image
from .lora import AttentionTargets, LoraTrainingHooks, MultiConceptLoRA, concept_token_mask, sample_timesteps, train_step
from .lora_io import LORA_WEIGHT_NAME, save_lora
from .models import encode_prompts, projection_weights
from .prepare import concept_data_files, load_concept_data
from .prompts import PromptPair, concept_token_positions

FINGERPRINT_FILE = "mace_fingerprint.json"


@dataclass(frozen=True)
class LoraTrainingSettings:
    """Everything that decides what a concept's LoRA becomes (besides its data and the model)."""

    rank: int = 1
    learning_rate: float = 1.0e-4
    max_train_steps: int = 50
    train_batch_size: int = 1  # samples of each concept per step
    importance_sampling: bool = True
    use_pooler: bool = True
    resolution: int = 512
    seed: int = 2024
    with_prior_preservation: bool = False
    preserve_prompt: str | None = None
    preserve_data_dir: str | None = None
    prior_loss_weight: float = 1.0
    num_class_images: int | None = None
    # How many concepts share one UNet batch: speed only, the LoRAs do not depend on it.
    concepts_per_batch: int = field(default=8, compare=False)

    def __post_init__(self) -> None:
        check_prior_preservation(self.with_prior_preservation, self.preserve_prompt, self.preserve_data_dir,
                                 self.prior_loss_weight)

    @classmethod
    def from_config(cls, config: MACEConfig, resolution: int) -> LoraTrainingSettings:
        return cls(
            rank=config.rank, learning_rate=config.learning_rate, max_train_steps=config.max_train_steps,
            train_batch_size=config.train_batch_size, importance_sampling=config.importance_sampling,
            use_pooler=config.use_pooler, resolution=resolution, seed=config.seed,
            with_prior_preservation=config.with_prior_preservation, preserve_prompt=config.preserve_prompt,
            preserve_data_dir=config.preserve_data_dir, prior_loss_weight=config.prior_loss_weight,
            num_class_images=config.num_class_images, concepts_per_batch=config.concepts_per_batch,
        )

    @property
    def uses_prior(self) -> bool:
        return self.with_prior_preservation and self.prior_loss_weight > 0

    def result_fields(self) -> dict:
        """The fields a LoRA depends on (all but concepts_per_batch)."""
        fields = asdict(self)
        fields.pop("concepts_per_batch")
        return fields


@dataclass
class ConceptData:
    name: str
    concept_type: str
    pairs: list[PromptPair]
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    masks: torch.Tensor | None  # (N, 1, H, W) or None (styles)
    rng: random.Random  # this concept's prompt choices
    generator: torch.Generator  # this concept's images, latents, noise and timesteps


@dataclass
class PreservationData:
    """Prior preservation: kept images and the one prompt that captions them."""

    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    embedding: torch.Tensor  # (1, 77, d): the preservation prompt's text embedding


@dataclass
class TrainingResult:
    """What a training call did: which LoRAs it trained (and why) and which it kept."""

    files: dict[str, Path] = field(default_factory=dict)  # concept -> its LoRA file
    trained: dict[str, str] = field(default_factory=dict)  # concept -> why ("new", "settings or data changed")
    reused: list[str] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)


def lora_dir(output_dir: str | os.PathLike, concept: str) -> Path:
    return Path(output_dir) / "lora" / concept.replace(" ", "-")


def preservation_files(settings: LoraTrainingSettings) -> list[Path]:
    """The prior-preservation images the settings use (the first num_class_images)."""
    if not settings.uses_prior:
        return []
    return image_files(settings.preserve_data_dir)[: settings.num_class_images]


def load_preservation_images(preserve_data_dir: str | os.PathLike, resolution: int, max_images: int | None = None) -> torch.Tensor:
    """(N, 3, resolution, resolution) in [-1, 1]: the PNG/JPG images of ``preserve_data_dir``, resized."""
    files = image_files(preserve_data_dir)[:max_images]
    return torch.stack([image_tensor(read_image(f, "RGB", resolution)) for f in files])


def concept_fingerprint(base_weights: str, settings: LoraTrainingSettings, name: str, kind: str,
                        pairs: Sequence[PromptPair], data: str, prior: str) -> str:
    """The fingerprint of one concept's LoRA: base weights, settings, prompts, data."""
    return digest({"base_weights": base_weights, "settings": settings.result_fields(), "concept": name, "type": kind,
                   "prompts": [(p.old, p.new) for p in pairs], "data": data, "prior_data": prior})


def expected_fingerprints(pipe, concepts: Sequence[tuple[str, str, list[PromptPair]]], settings: LoraTrainingSettings,
                          input_data_dir: str | os.PathLike) -> dict[str, str]:
    """The fingerprint each concept's LoRA gets when trained now on ``pipe``'s weights."""
    base = tensors_digest(projection_weights(pipe.unet))
    prior = files_digest(preservation_files(settings))
    return {name: concept_fingerprint(base, settings, name, kind, pairs,
                                      files_digest(concept_data_files(input_data_dir, name, kind)), prior)
            for name, kind, pairs in concepts}


def stored_fingerprint(output_dir: str | os.PathLike, concept: str) -> str | None:
    """The fingerprint saved with a concept's LoRA, None when there is no complete LoRA."""
    folder = lora_dir(output_dir, concept)
    if not (folder / LORA_WEIGHT_NAME).exists() or not (folder / FINGERPRINT_FILE).exists():
        return None
    try:
        return json.loads((folder / FINGERPRINT_FILE).read_text()).get("fingerprint")
    except (json.JSONDecodeError, AttributeError):
        return None


def train_concept_loras(
    pipe,
    concepts: Sequence[tuple[str, str, list[PromptPair]]],
    settings: LoraTrainingSettings,
    *,
    input_data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    progress: bool = True,
) -> TrainingResult:
    """Train the LoRAs of ``concepts`` (name, type, prompt pairs) whose saved fingerprint is
    missing or stale, on ``pipe``'s current weights, and save each as a diffusers LoRA.

    With prior preservation, every step adds ``train_batch_size`` images of
    ``preserve_data_dir`` captioned with ``preserve_prompt`` per concept; they go through that
    concept's LoRA and add ``prior_loss_weight`` times their noise-prediction MSE to the loss.
    """
    result = TrainingResult()
    result.fingerprints = expected_fingerprints(pipe, concepts, settings, input_data_dir)
    todo = []
    for name, kind, pairs in concepts:
        result.files[name] = lora_dir(output_dir, name) / LORA_WEIGHT_NAME
        stored = stored_fingerprint(output_dir, name)
        if stored == result.fingerprints[name]:
            result.reused.append(name)
            continue
        result.trained[name] = "new" if stored is None else "model, settings, prompts or data changed"
        todo.append((name, kind, pairs))
    if not todo:
        return result

    unet, vae, text_encoders = pipe.unet, pipe.vae, [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    for module in [unet, vae] + [e for e in text_encoders if e is not None]:
        module.requires_grad_(False)
    prior = None
    if settings.uses_prior:
        with torch.no_grad():
            prior = PreservationData(
                load_preservation_images(settings.preserve_data_dir, settings.resolution, settings.num_class_images),
                encode_prompts(pipe, [settings.preserve_prompt]))
    size = settings.concepts_per_batch
    groups = [todo[i:i + size] for i in range(0, len(todo), size)]
    bar = tqdm(total=len(todo) * settings.max_train_steps, desc="LoRA training", unit="concept-step", disable=not progress)
    for group in groups:
        data = []
        for name, kind, pairs in group:
            images, masks = load_concept_data(input_data_dir, name, kind, settings.resolution)
            data.append(ConceptData(name, kind, pairs, images, masks, random.Random(seed_for(settings.seed, name)),
                                    torch.Generator().manual_seed(seed_for(settings.seed, name))))
        lora = MultiConceptLoRA(unet, len(group), settings.rank, concept_seeds=[seed_for(settings.seed, "lora", n) for n, _, _ in group])
        optimizer = torch.optim.AdamW(lora.parameters(), lr=settings.learning_rate, weight_decay=0.0)
        with LoraTrainingHooks(unet, lora) as hooks:
            for _ in range(settings.max_train_steps):
                batch = _sample_batch(pipe, data, settings, prior)
                targets = AttentionTargets(batch["tokens"], batch["masks"], [settings.train_batch_size] * len(group),
                                           prior_sizes=[settings.train_batch_size] * len(group) if prior is not None else None)
                loss = train_step(unet, hooks, pipe.scheduler, batch["latents"], batch["embeddings"], targets,
                                  batch["noise"], batch["timesteps"], prior_loss_weight=settings.prior_loss_weight)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(len(group))
                bar.set_postfix(loss=f"{float(loss):.3f}")
        for k, (name, _, _) in enumerate(group):
            folder = lora_dir(output_dir, name)
            save_lora(folder, lora.concept_lora(k), alpha=float(settings.rank))
            # Written after the weights: a LoRA without its fingerprint is trained again.
            write_json_atomically(folder / FINGERPRINT_FILE, {"fingerprint": result.fingerprints[name]})
    bar.close()
    return result


@torch.no_grad()
def _sample_batch(pipe, data: list[ConceptData], settings: LoraTrainingSettings, prior: PreservationData | None) -> dict:
    """One step's batch: for each concept in turn its ``train_batch_size`` samples and, with
    ``prior``, as many preservation samples right after them (the layout AttentionTargets
    describes). Each concept's draws come from its own generators."""
    per = settings.train_batch_size
    prompts, positions, masks, images, gens = [], [], [], [], []
    any_mask = any(d.masks is not None for d in data)
    for d in data:
        rows = []
        for _ in range(per):
            pair = d.rng.choice(d.pairs)
            prompts.append(pair.old)
            positions.append(concept_token_positions(pipe.tokenizer(pair.old).input_ids, pipe.tokenizer(pair.new).input_ids))
            i = int(torch.randint(0, d.images.shape[0], (1,), generator=d.generator))
            rows.append(d.images[i])
            if any_mask:
                masks.append(d.masks[i] if d.masks is not None else torch.ones(1, *d.images.shape[-2:]))
        images.append(torch.stack(rows))
        if prior is not None:
            picks = torch.randint(0, prior.images.shape[0], (per,), generator=d.generator)
            images.append(prior.images[picks])
        gens += [d.generator] * (2 if prior is not None else 1)
    embeddings = encode_prompts(pipe, prompts)
    if prior is not None:
        concept_embeddings = embeddings.split(per)
        prior_embedding = prior.embedding.to(embeddings).expand(per, -1, -1)
        embeddings = torch.cat([x for e in concept_embeddings for x in (e, prior_embedding)])
    vae = pipe.vae
    latents, noise, timesteps = [], [], []
    for segment, g in zip(images, gens):
        dist = vae.encode(segment).latent_dist
        latents.append((dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * vae.config.scaling_factor)
        noise.append(torch.randn(dist.mean.shape, generator=g))
        timesteps.append(sample_timesteps(segment.shape[0], pipe.scheduler.config.num_train_timesteps,
                                          settings.importance_sampling, g))
    return {
        "latents": torch.cat(latents),
        "noise": torch.cat(noise),
        "timesteps": torch.cat(timesteps),
        "masks": torch.stack(masks) if any_mask else None,
        "tokens": concept_token_mask(pipe.tokenizer, prompts, positions, settings.use_pooler),
        "embeddings": embeddings,
    }
