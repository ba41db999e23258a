"""Stage 2 of MACE: one LoRA per concept, trained on the concept's prepared images so that the
refined model stops attending to the concept's tokens (the loss and the batched step are in
mace.stages.lora; docs/design.md, section 5).

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from mace import distributed
from mace.config import ConfigError, MACEConfig, autocast_dtype, check_prior_preservation, report_to_trackers
from mace.pipelines.components import added_conditions, encode_prompts, projection_weights
from mace.pipelines.lora_io import LORA_WEIGHT_NAME, save_lora
from mace.stages.lora import (
    AttentionTargets,
    LoraPreservation,
    LoraTrainingHooks,
    MultiConceptLoRA,
    clip_grad_norm_per_concept,
    concept_token_mask,
    forward_process,
    sample_timesteps,
    train_step,
)
from mace.stages.prepare import concept_data_files, load_concept_data
from mace.stages.prompts import PromptPair
from mace.utils.atomic import write_json_atomically
from mace.utils.fingerprint import digest, files_digest, seed_for, tensors_digest
from mace.utils.images import image_files, image_tensor, read_image
from mace.utils.names import folder_name

FINGERPRINT_FILE = "mace_fingerprint.json"
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


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
    # The original script's optimiser and schedule (diffusers' training-script defaults).
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1.0e-08
    max_grad_norm: float = 1.0  # clipped per concept: each LoRA as if trained alone
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    scale_lr: bool = False  # learning rate x gradient_accumulation_steps x train_batch_size
    # Batches per optimiser step; max_train_steps counts optimiser steps. The lr schedule spans
    # lr_warmup_steps and max_train_steps times this, as the original's does (see _train_group).
    gradient_accumulation_steps: int = 1
    use_masks: bool = True  # use_gsam_mask: restrict the loss to the concept's mask (never for styles)
    separate: bool = True  # train_seperate: one LoRA per concept; False: one LoRA shared by all concepts
    no_real_image: bool = False  # the original's option: noisy latents from zeros instead of the images
    mixed_precision: str | None = None  # "fp16" / "bf16": the UNet runs under autocast; LoRAs stay float32
    preserve_scale: float = 0.0  # lora_preserve_scale: weight of the LoRA's change on the preserved tokens
    # How many concepts share one UNet batch: speed only, the LoRAs do not depend on it.
    concepts_per_batch: int = field(default=8, compare=False)
    gradient_checkpointing: bool = field(default=False, compare=False)  # memory, not results
    # report_to: accelerate trackers that get each optimiser step's loss and lr, writing under
    # <output_dir>/<logging_dir> (the run is named "MACE", as the original's).
    report_to: str | tuple[str, ...] | None = field(default=None, compare=False)
    logging_dir: str = field(default="logs", compare=False)

    def __post_init__(self) -> None:
        check_prior_preservation(self.with_prior_preservation, self.preserve_prompt, self.preserve_data_dir,
                                 self.prior_loss_weight)
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError("gradient_accumulation_steps must be >= 1")
        if self.max_grad_norm <= 0:
            raise ConfigError("max_grad_norm must be > 0")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"lr_scheduler: unknown schedule {self.lr_scheduler!r}; choose one of {', '.join(LR_SCHEDULERS)}")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.mixed_precision)

    @property
    def optimiser_learning_rate(self) -> float:
        scale = self.gradient_accumulation_steps * self.train_batch_size if self.scale_lr else 1
        return self.learning_rate * scale

    @classmethod
    def from_config(cls, config: MACEConfig, resolution: int) -> LoraTrainingSettings:
        return cls(
            rank=config.rank, learning_rate=config.learning_rate, max_train_steps=config.max_train_steps,
            train_batch_size=config.train_batch_size, importance_sampling=config.importance_sampling,
            use_pooler=config.use_pooler, resolution=resolution, seed=config.seed,
            with_prior_preservation=config.with_prior_preservation, preserve_prompt=config.preserve_prompt,
            preserve_data_dir=config.preserve_data_dir, prior_loss_weight=config.prior_loss_weight,
            num_class_images=config.num_class_images, adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2,
            adam_weight_decay=config.adam_weight_decay, adam_epsilon=config.adam_epsilon,
            max_grad_norm=config.max_grad_norm, lr_scheduler=config.lr_scheduler, lr_warmup_steps=config.lr_warmup_steps,
            lr_num_cycles=config.lr_num_cycles, lr_power=config.lr_power, scale_lr=config.scale_lr,
            gradient_accumulation_steps=config.gradient_accumulation_steps, use_masks=config.use_gsam_mask,
            separate=config.train_seperate, no_real_image=config.no_real_image, mixed_precision=config.mixed_precision,
            concepts_per_batch=config.concepts_per_batch, gradient_checkpointing=config.gradient_checkpointing,
            preserve_scale=config.lora_preserve_scale,
            report_to=config.report_to if config.report_to is None or isinstance(config.report_to, str)
            else tuple(config.report_to), logging_dir=config.logging_dir,
        )

    @property
    def uses_prior(self) -> bool:
        return self.with_prior_preservation and self.prior_loss_weight > 0

    def result_fields(self) -> dict:
        """The fields a LoRA depends on (all but speed, memory and logging)."""
        fields = asdict(self)
        for no_result in ("concepts_per_batch", "gradient_checkpointing", "report_to", "logging_dir"):
            fields.pop(no_result)
        if self.gradient_accumulation_steps > 1 and self.lr_scheduler != "constant":
            # LoRAs trained before the schedule followed the original's length are trained again.
            fields["schedule_steps"] = "x gradient_accumulation_steps"
        return fields


@dataclass
class EncodedImages:
    """Training images as the VAE sees them: each one's latent distribution (mean, std).

    The encoder is deterministic, so each image is encoded once when its concept's group starts
    and every step draws its latent from these (the draw is the step's own, as before), rather
    than running the VAE over every step's images again.
    """

    mean: torch.Tensor  # (N, c, h, w)
    std: torch.Tensor
    size: tuple[int, int]  # the images' (H, W), which masks have

    @classmethod
    @torch.no_grad()
    def encode(cls, vae, images: torch.Tensor, batch_size: int = 8) -> EncodedImages:
        """(N, 3, H, W) images in [-1, 1], on the VAE's device, ``batch_size`` at a time."""
        dists = [vae.encode(images[i:i + batch_size]).latent_dist for i in range(0, images.shape[0], batch_size)]
        return cls(torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists]), tuple(images.shape[-2:]))

    def __len__(self) -> int:
        return self.mean.shape[0]

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean[index], self.std[index]


@dataclass
class ConceptData:
    name: str
    concept_type: str
    pairs: list[PromptPair]
    images: EncodedImages
    masks: torch.Tensor | None  # (N, 1, H, W) or None (styles)
    rng: random.Random  # this concept's prompt choices
    generator: torch.Generator  # this concept's images, latents, noise and timesteps


@dataclass
class PreservationData:
    """Prior preservation: the kept images (captioned by settings.preserve_prompt)."""

    images: EncodedImages


class CaptionConditions:
    """Each caption's text conditions, encoded once: the captions a group trains on are its
    concepts' fixed prompts and the preservation prompt, drawn again and again."""

    def __init__(self, pipe, resolution: int):
        self.pipe, self.resolution = pipe, resolution
        self.embeddings: dict[str, torch.Tensor] = {}
        self.added: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(B, 77, d) embeddings of ``captions`` and the UNet's added conditions (None without)."""
        new = [c for c in dict.fromkeys(captions) if c not in self.embeddings]
        if new:
            self.embeddings.update(zip(new, encode_prompts(self.pipe, new), strict=True))
            added = added_conditions(self.pipe, new, self.resolution)
            if added is not None:
                self.added.update((c, {k: v[i] for k, v in added.items()}) for i, c in enumerate(new))
        embeddings = torch.stack([self.embeddings[c] for c in captions])
        if not self.added:
            return embeddings, None
        return embeddings, {k: torch.stack([self.added[c][k] for c in captions]) for k in self.added[captions[0]]}


@dataclass
class TrainingResult:
    """What a training call did: which LoRAs it trained (and why) and which it kept."""

    files: dict[str, Path] = field(default_factory=dict)  # concept -> its LoRA file
    trained: dict[str, str] = field(default_factory=dict)  # concept -> why ("new", "settings or data changed")
    reused: list[str] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)


def lora_dir(output_dir: str | os.PathLike, concept: str) -> Path:
    """A concept's LoRA folder: ``<output_dir>/lora/<name with '-' for spaces>``, a safe folder
    name (``mace.utils.names.folder_name``) when the name is no plain folder name."""
    return Path(output_dir) / "lora" / folder_name(concept).replace(" ", "-")


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
                          input_data_dir: str | os.PathLike, preserve: torch.Tensor | None = None) -> dict[str, str]:
    """The fingerprint each concept's LoRA gets when trained now on ``pipe``'s weights (and,
    with ``settings.preserve_scale``, the preservation statistic ``preserve``)."""
    base = tensors_digest(projection_weights(pipe.unet))
    if settings.preserve_scale > 0:
        base = digest({"weights": base, "preserve": tensors_digest([_require_preserve(preserve)])})
    prior = files_digest(preservation_files(settings))
    own = {name: concept_fingerprint(base, settings, name, kind, pairs,
                                     files_digest(concept_data_files(input_data_dir, name, kind, settings.use_masks)),
                                     prior)
           for name, kind, pairs in concepts}
    if settings.separate:
        return own
    shared = digest(sorted(own.items()))  # one LoRA for all: any concept's change retrains it
    return dict.fromkeys(own, shared)


def _require_preserve(preserve: torch.Tensor | None) -> torch.Tensor:
    if preserve is None:
        raise ConfigError("lora_preserve_scale needs a preservation cache (prior_preservation_cache_path or "
                          "domain_preservation_cache_path)")
    return preserve


def stored_fingerprint(output_dir: str | os.PathLike, concept: str) -> str | None:
    """The fingerprint saved with a concept's LoRA, None when there is no complete LoRA."""
    folder = lora_dir(output_dir, concept)
    if not (folder / LORA_WEIGHT_NAME).exists() or not (folder / FINGERPRINT_FILE).exists():
        return None
    try:
        return json.loads((folder / FINGERPRINT_FILE).read_text()).get("fingerprint")
    except (json.JSONDecodeError, AttributeError):
        return None


def start_trackers(report_to: str | Sequence[str] | None, logging_dir: str | os.PathLike, run_name: str = "MACE") -> list:
    """Started accelerate trackers for ``report_to`` (see ``mace.config.report_to_trackers``);
    those whose package is not installed are left out (the config warns about them). Each
    process logs its own concepts: under torchrun, ranks other than 0 name their run
    ``<run_name>-rank<r>``."""
    from accelerate import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names = report_to_trackers(report_to)[0]
    if names:
        PartialState()  # accelerate's trackers log through its logger, which needs the state set up
    if distributed.rank() > 0:
        run_name = f"{run_name}-rank{distributed.rank()}"
    trackers = []
    for name in names:
        cls = LOGGER_TYPE_TO_CLASS[name]
        tracker = cls(run_name, str(logging_dir)) if cls.requires_logging_directory else cls(run_name)
        tracker.main_process_only = False  # the concepts are this process's own
        tracker.start()
        trackers.append(tracker)
    return trackers


def train_concept_loras(
    pipe,
    concepts: Sequence[tuple[str, str, list[PromptPair]]],
    settings: LoraTrainingSettings,
    *,
    input_data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    progress: bool = True,
    preserve: torch.Tensor | None = None,
) -> TrainingResult:
    """Train the LoRAs of ``concepts`` (name, type, prompt pairs) whose saved fingerprint is
    missing or stale, on ``pipe``'s current weights, and save each as a diffusers LoRA.

    With prior preservation, every step adds ``train_batch_size`` images of
    ``preserve_data_dir`` captioned with ``preserve_prompt`` per concept; they go through that
    concept's LoRA and add ``prior_loss_weight`` times their noise-prediction MSE to the loss.
    With ``settings.preserve_scale``, each step also adds that times the relative squared change
    each LoRA makes to the tokens the preservation statistic ``preserve`` (d x d) summarises.
    With ``settings.report_to``, every optimiser step logs ``loss`` (its batches' mean, all the
    step's concepts together) and ``lr`` (after the step, as the original logs it) to those
    trackers, under ``<output_dir>/<settings.logging_dir>``; steps count on across batches of
    concepts.
    """
    result = TrainingResult()
    result.fingerprints = expected_fingerprints(pipe, concepts, settings, input_data_dir, preserve)
    todo = []
    for name, kind, pairs in concepts:
        result.files[name] = lora_dir(output_dir, name) / LORA_WEIGHT_NAME
        stored = stored_fingerprint(output_dir, name)
        if stored == result.fingerprints[name]:
            result.reused.append(name)
            continue
        result.trained[name] = "new" if stored is None else "model, settings, prompts or data changed"
        todo.append((name, kind, pairs))
    if todo and not settings.separate:  # the shared LoRA is trained on every concept
        todo = list(concepts)
        result.trained = {name: result.trained.get(name, "shared LoRA retrained") for name, _, _ in concepts}
        result.reused = []
    if not todo:
        return result

    unet, vae, text_encoders = pipe.unet, pipe.vae, [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    for module in [unet, vae] + [e for e in text_encoders if e is not None]:
        module.requires_grad_(False)
    prior = None
    if settings.uses_prior:
        prior = PreservationData(EncodedImages.encode(pipe.vae, load_preservation_images(
            settings.preserve_data_dir, settings.resolution, settings.num_class_images).to(pipe.vae.device)))
    size = settings.concepts_per_batch if settings.separate else len(todo)
    groups = [todo[i:i + size] for i in range(0, len(todo), size)]
    steps = settings.max_train_steps
    bar = tqdm(total=len(todo) * steps if settings.separate else steps, desc="LoRA training",
               unit="concept-step" if settings.separate else "step", disable=not progress)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trackers = start_trackers(settings.report_to, Path(output_dir) / settings.logging_dir) if settings.report_to else []
    try:
        for g, group in enumerate(groups):
            data = []
            for name, kind, pairs in group:
                images, masks = load_concept_data(input_data_dir, name, kind, settings.resolution, settings.use_masks)
                # On the model's device once: a step then moves only its noise and indices there.
                encoded = EncodedImages.encode(pipe.vae, images.to(pipe.vae.device))
                masks = None if masks is None else masks.to(pipe.vae.device)
                data.append(ConceptData(name, kind, pairs, encoded, masks, random.Random(seed_for(settings.seed, name)),
                                        torch.Generator().manual_seed(seed_for(settings.seed, name))))

            def log(values: dict[str, float], step: int, offset: int = g * steps) -> None:
                for tracker in trackers:
                    tracker.log(values, step=offset + step)

            lora = _train_group(pipe, data, settings, prior, bar, preserve, log if trackers else None)
            for k, (name, _, _) in enumerate(group):
                folder = lora_dir(output_dir, name)
                save_lora(folder, lora.concept_lora(k if settings.separate else 0), alpha=float(settings.rank))
                # Written after the weights: a LoRA without its fingerprint is trained again.
                write_json_atomically(folder / FINGERPRINT_FILE, {"fingerprint": result.fingerprints[name]})
    finally:
        if settings.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        bar.close()
        for tracker in trackers:
            tracker.finish()
    return result


def lr_schedule(optimizer: torch.optim.Optimizer, settings: LoraTrainingSettings) -> torch.optim.lr_scheduler.LRScheduler:
    """The original's lr schedule, to be stepped once per optimiser step.

    The original builds it over ``lr_warmup_steps`` and ``max_train_steps`` times
    ``gradient_accumulation_steps``, but accelerate advances it only on the batches that step
    the optimiser (its scheduler wrapper skips the accumulating ones): the warm-up lasts that
    many times longer and training stops 1/gradient_accumulation_steps of the way through the
    schedule. Built the same way and stepped once per optimiser step, this is that schedule.
    """
    accumulate = settings.gradient_accumulation_steps
    return get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.lr_warmup_steps * accumulate,
                         num_training_steps=settings.max_train_steps * accumulate,
                         num_cycles=settings.lr_num_cycles, power=settings.lr_power)


def _train_group(pipe, data: list[ConceptData], settings: LoraTrainingSettings, prior: PreservationData | None,
                 bar, preserve: torch.Tensor | None = None,
                 log: Callable[[dict[str, float], int], object] | None = None) -> MultiConceptLoRA:
    """The original script's loop for a group of concepts trained together: AdamW, the lr
    schedule, gradient accumulation and per-concept clipping, ``max_train_steps`` optimiser
    steps. Separate LoRAs: every step carries every concept's samples, each through its own
    LoRA. One shared LoRA (``separate=False``, as the original): each step trains it on one
    concept drawn at random. ``log(values, step)`` gets each optimiser step's loss and lr."""
    unet = pipe.unet
    seeds = [seed_for(settings.seed, "lora", d.name) for d in data] if settings.separate else [seed_for(settings.seed, "lora")]
    lora = MultiConceptLoRA(unet, len(seeds), settings.rank, concept_seeds=seeds)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=settings.optimiser_learning_rate,
                                  betas=(settings.adam_beta1, settings.adam_beta2), eps=settings.adam_epsilon,
                                  weight_decay=settings.adam_weight_decay)
    schedule = lr_schedule(optimizer, settings)
    pick = random.Random(seed_for(settings.seed, "shared"))
    accumulate = settings.gradient_accumulation_steps
    # fp16's small range lets gradients underflow: dynamic loss scaling, as mixed-precision
    # training does (the original runs through accelerate, which adds it for fp16). bf16 has
    # float32's range and needs none; disabled, the scaler passes everything through.
    scaler = torch.amp.GradScaler(lora.A[0].device.type, enabled=settings.autocast_dtype == torch.float16)
    preservation = None
    if settings.preserve_scale > 0:
        preservation = LoraPreservation.for_unet(unet, lora, _require_preserve(preserve), settings.preserve_scale)
    noise_process = forward_process(pipe.scheduler)  # built once: train_step would build it every step
    conditions = CaptionConditions(pipe, settings.resolution)
    with LoraTrainingHooks(unet, lora) as hooks:
        for step in range(1, settings.max_train_steps + 1):
            step_loss = 0.0
            for _ in range(accumulate):
                step_data = data if settings.separate else [pick.choice(data)]
                batch = _sample_batch(pipe, step_data, settings, prior, conditions)
                per = [settings.train_batch_size] * len(step_data)
                targets = AttentionTargets(batch["tokens"], batch["masks"], per,
                                           prior_sizes=per if prior is not None else None)
                loss = train_step(unet, hooks, noise_process, batch["latents"], batch["embeddings"], targets,
                                  batch["noise"], batch["timesteps"], prior_loss_weight=settings.prior_loss_weight,
                                  loss_scale=1.0 / accumulate, autocast_dtype=settings.autocast_dtype,
                                  added_cond_kwargs=batch["added_cond_kwargs"], grad_scaler=scaler,
                                  preservation=preservation)
                if log is not None:  # reading the loss waits for the device: only when it is logged
                    step_loss += float(loss) / accumulate
            scaler.unscale_(optimizer)  # clipping sees the true gradients
            clip_grad_norm_per_concept(lora, settings.max_grad_norm)
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skipped when a gradient overflowed
            scaler.update()
            if scaler.get_scale() >= scale:  # the schedule moves only with the steps taken
                schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if log is not None:
                log({"loss": step_loss, "lr": schedule.get_last_lr()[0]}, step)
            bar.update(len(data) if settings.separate else 1)
            if not bar.disable:  # reading the loss waits for the device: only when someone looks
                bar.set_postfix(loss=f"{float(loss):.3f}")
    return lora


@torch.no_grad()
def _sample_batch(pipe, data: list[ConceptData], settings: LoraTrainingSettings, prior: PreservationData | None,
                  conditions: CaptionConditions) -> dict:
    """One step's batch: for each concept in turn its ``train_batch_size`` samples and, with
    ``prior``, as many preservation samples right after them (the layout AttentionTargets
    describes). Each concept's draws come from its own generators, on the CPU, so that a seed gives
    the same batch on every device; the encoded images already live on the model's device, and
    what moves there per step is the drawn noise and indices."""
    per = settings.train_batch_size
    device = pipe.vae.device
    prompts, masks, segments, gens, captions = [], [], [], [], []
    any_mask = any(d.masks is not None for d in data)
    for d in data:
        rows = []
        for _ in range(per):
            pair = d.rng.choice(d.pairs)
            prompts.append(pair.old)
            captions.append(pair.old)
            i = int(torch.randint(0, len(d.images), (1,), generator=d.generator))
            rows.append(i)
            if any_mask:
                masks.append(d.masks[i] if d.masks is not None else torch.ones(1, *d.images.size, device=device))
        segments.append(d.images.rows(torch.tensor(rows, device=device)))
        if prior is not None:
            picks = torch.randint(0, len(prior.images), (per,), generator=d.generator)
            segments.append(prior.images.rows(picks.to(device)))
            captions += [settings.preserve_prompt] * per
        gens += [d.generator] * (2 if prior is not None else 1)
    embeddings, added = conditions(captions)  # batch order: each concept's rows, then its prior rows
    scaling = pipe.vae.config.scaling_factor
    latents, noise, timesteps = [], [], []
    for (mean, std), g in zip(segments, gens, strict=True):
        draw = torch.randn(mean.shape, generator=g).to(device, mean.dtype)
        sample = (mean + std * draw) * scaling
        latents.append(torch.zeros_like(sample) if settings.no_real_image else sample)
        noise.append(torch.randn(mean.shape, generator=g).to(device, mean.dtype))
        timesteps.append(sample_timesteps(mean.shape[0], pipe.scheduler.config.num_train_timesteps,
                                          settings.importance_sampling, g).to(device))
    return {
        "latents": torch.cat(latents),
        "noise": torch.cat(noise),
        "timesteps": torch.cat(timesteps),
        "masks": torch.stack(masks) if any_mask else None,
        "tokens": concept_token_mask(pipe.tokenizer, prompts, [d.name for d in data for _ in range(per)], settings.use_pooler),
        "embeddings": embeddings,
        "added_cond_kwargs": added,
    }
