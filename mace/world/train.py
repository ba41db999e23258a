"""Train a glyph world's models: the VAE, the classifier and the text-to-image UNet + text encoder.

    python -m mace.world.train --world world          # builtin:world, into mace/world/weights
    python -m mace.world.train --world world-large    # builtin:world-large, into mace/world/weights_large

Everything is seeded. For ``world`` on 2 CPU cores the three training stages took 53 minutes
(VAE 6.3, classifier 7.0, latent diffusion 39.9), and the ``check`` stage (2 minutes) measures
what the model draws for every concept and writes quality.json. ``--stages`` runs a subset
(later stages read earlier outputs from ``--out``; the classifier and the latent diffusion
stages are independent and may run at once, each with ``--threads 1``). Weights are written as
float16 safetensors (the loaders upcast), each stage into a temporary folder that replaces the
old one only when the stage has finished.

The latent diffusion stage, hours long for the large world on a CPU, writes a checkpoint
(safetensors: models, EMA copies, optimiser moments, random state) every
``--checkpoint-every`` steps into ``--checkpoint-dir``; rerunning the same command resumes from
the last one, and a checkpoint made under other settings is refused, never reused. Each
finished training stage writes its record (``training-STAGE.json``: settings, threads,
seconds); a rerun skips a stage whose record and folder are there under the same settings (the
classifier's and the latent diffusion's include the VAE's digest, so a retrained VAE retrains
them), and ``--retrain`` runs every stage asked for regardless. While it runs,
``--peek EVERY`` reports what the last checkpoint's EMA model draws for every EVERY-th concept
(by name and alias, one image each, held-out templates) and its binding gap: a progress
reading in a minute, kept beside the checkpoint folder and carried into the stage's record.

A recipe with ``text_steps`` (the full identity world's) first pretrains the text encoder on
naming the concept of a caption (``train_text_encoder``) and then trains the UNet alone on it,
frozen. The text-to-image stage also runs over torchrun ranks, each batch split over them:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m mace.world.train \
        --world world-identity --stages ldm --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from mace import distributed
from mace.utils.atomic import atomic_path, write_json_atomically
from mace.utils.fingerprint import files_digest
from mace.utils.tokenizer import clip_tokenizer
from mace.world.check import binding_gap, check_model, classifier_accuracy, held_out_drawing, world_pipeline
from mace.world.classifier import GlyphClassifier
from mace.world.concepts import (
    BACKGROUND_TEMPLATES,
    BACKGROUNDS,
    CONTEXT_WORDS,
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    WORLD,
    WORLDS,
    GlyphWorld,
    fill,
)
from mace.world.model import training_noise_scheduler, weights_dir
from mace.world.render import IMAGE_SIZE, render

STAGES = ("vae", "classifier", "text", "ldm", "check")
_BACKGROUND_NAMES = list(BACKGROUNDS)


def build_vae():
    # Two downsamplings: 32x32x3 images <-> 8x8x4 latents.
    return AutoencoderKL(
        block_out_channels=(16, 32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16, sample_size=IMAGE_SIZE,
    )


def build_unet(world: GlyphWorld = WORLD):
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=world.text_width, attention_head_dim=8, norm_num_groups=16,
    )


def build_text_encoder(world: GlyphWorld = WORLD):
    width = world.text_width
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(config)


def build_scheduler():
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )


def _save_stage(out: Path, name: str, save) -> None:
    """Write one stage's folder atomically (a finished stage is never half replaced)."""
    with atomic_path(out / name, directory=True) as staging:
        save(staging)


def _half(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).to(torch.float16)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _random_concepts(world: GlyphWorld, batch: int, g: torch.Generator, none_share: float,
                     held_out: bool = False) -> torch.Tensor:
    """Random labels: concepts (and, with ``held_out``, the held-out identities), or none."""
    labels = torch.randint(world.num_concepts + (len(world.held_out) if held_out else 0), (batch,), generator=g)
    labels = torch.where(labels >= world.none_class, labels + 1, labels)  # skip over the none label
    return torch.where(torch.rand(batch, generator=g) < none_share, world.none_class, labels)


def train_vae(world: GlyphWorld, out: Path, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    bar = tqdm(range(steps), desc="vae")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = 2e-3 * _cosine(step, steps, 100)
        images = render(_random_concepts(world, 48, g, 0.05, held_out=True), generator=g, world=world)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - images).abs().mean() + (recon - images).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(render(_random_concepts(world, 1024, g, 0.05), generator=g, world=world)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    _save_stage(out, "vae", lambda d: _half(vae).save_pretrained(d))


def _load_vae(out: Path):
    return AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32).eval()


def _degrade(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Noise and blur, so the classifier also reads the imperfect images a diffusion model draws."""
    b = images.shape[0]
    sigma = 0.08 * torch.rand(b, 1, 1, 1, generator=g)
    images = images + sigma * torch.randn(images.shape, generator=g)
    blur = torch.rand(b, generator=g) < 0.3
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        images[blur] = nn.functional.conv2d(nn.functional.pad(images[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return images.clamp(-1, 1)


def train_classifier(world: GlyphWorld, out: Path, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = _load_vae(out)
    model = GlyphClassifier(num_classes=world.num_labels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    bar = tqdm(range(steps), desc="classifier")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = 3e-3 * _cosine(step, steps, 50)
        labels = _random_concepts(world, 128, g, 0.08, held_out=True)
        backgrounds = torch.randint(len(BACKGROUNDS), (128,), generator=g)
        images = render(labels, backgrounds=backgrounds, generator=g, world=world)
        with torch.no_grad():  # half of each batch goes through the VAE, as generated images do
            images[:64] = vae.decode(vae.encode(images[:64]).latent_dist.mean).sample.clamp(-1, 1)
        concept_logits, background_logits, _ = model(_degrade(images, g))
        loss = nn.functional.cross_entropy(concept_logits, labels) + 0.3 * nn.functional.cross_entropy(background_logits, backgrounds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            acc = (concept_logits.argmax(-1) == labels).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
    model.eval()
    print(f"classifier accuracy on 2048 fresh renders: {classifier_accuracy(world, model)['accuracy']:.4f}")
    _save_stage(out, "classifier", model.save_pretrained)


def caption(concept: int, background: int, g: torch.Generator, world: GlyphWorld = WORLD, context: bool = False) -> str:
    """A training caption: a template around the concept's name or alias ('' is left to the caller).
    With ``context``, half the captions are padded with up to three random everyday words before
    and up to three after (CONTEXT_WORDS)."""
    bg = _BACKGROUND_NAMES[background]
    if concept == world.none_class:
        text = fill(BACKGROUND_TEMPLATES[int(torch.randint(len(BACKGROUND_TEMPLATES), (1,), generator=g))], "", bg)
    else:
        c = world.concepts[concept]
        subject = c.name if torch.rand(1, generator=g).item() < 0.6 else c.alias
        text = fill(TRAIN_TEMPLATES[int(torch.randint(len(TRAIN_TEMPLATES), (1,), generator=g))], subject, bg)
    if context and torch.rand(1, generator=g).item() < 0.5:
        before, after = torch.randint(4, (2,), generator=g).tolist()
        words = [CONTEXT_WORDS[i] for i in torch.randint(len(CONTEXT_WORDS), (before + after,), generator=g).tolist()]
        text = " ".join(words[:before] + [text] + words[before:])
    return text


def train_text_encoder(world: GlyphWorld, out: Path, steps: int, seed: int, batch: int = 256) -> dict:
    """Pretrain the text encoder as CLIP's was, on what an image shows: a linear head on the
    end-of-text output (CLIP's pooled output) names the identity a training caption is about, or
    "no concept" for a background caption; the identity's label stands in for CLIP's image tower.
    The head is then dropped and the text-to-image stage trains the UNet on this encoder, frozen,
    as Stable Diffusion's UNet was trained on CLIP's. Nothing in the objective ties two identities
    together (no family, no tone), so each identity's embedding is its own. Returns the record's
    measurements: the head's accuracy on held-out templates, by name and by alias."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = build_text_encoder(world)
    head = nn.Linear(world.text_width, world.num_concepts + 1)
    params = list(text_encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, fused=True)

    def logits(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="longest", max_length=77, truncation=True, return_tensors="pt").input_ids
        return head(text_encoder(ids).pooler_output)

    bar = tqdm(range(steps), desc="text encoder")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = 1e-3 * _cosine(step, steps, 100)
        labels = _random_concepts(world, batch, g, 0.05)
        backgrounds = torch.randint(len(BACKGROUNDS), (batch,), generator=g)
        texts = [caption(int(c), int(b), g, world, context=True) for c, b in zip(labels, backgrounds, strict=True)]
        loss = nn.functional.cross_entropy(logits(texts), torch.where(labels == world.none_class, world.num_concepts, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    text_encoder.eval()
    accuracy = {}
    with torch.no_grad():
        for kind in ("name", "alias"):
            right = 0
            subjects = [c.name if kind == "name" else c.alias for c in world.concepts]
            for i, template in enumerate(EVAL_TEMPLATES):
                texts = [fill(template, s, _BACKGROUND_NAMES[(j + i) % len(_BACKGROUND_NAMES)]) for j, s in enumerate(subjects)]
                right += int((logits(texts).argmax(-1) == torch.arange(world.num_concepts)).sum())
            accuracy[f"{kind}_accuracy"] = round(right / (len(EVAL_TEMPLATES) * world.num_concepts), 4)
    print(f"text encoder: the head names {accuracy['name_accuracy']:.3f} of names and {accuracy['alias_accuracy']:.3f} "
          "of aliases right on held-out templates")
    _save_stage(out, "text_encoder", lambda d: _half(text_encoder).save_pretrained(d))
    return {"held_out_templates": accuracy}


class LdmCheckpoint:
    """The latent diffusion stage's resumable state in one folder: ``state.safetensors`` (models,
    EMA copies, AdamW moments, the data generator's state) and ``checkpoint.json`` (the step and
    the settings it was made under). Written atomically; loaded only under the same settings."""

    def __init__(self, directory: Path, settings: dict):
        self.directory = directory
        self.settings = settings

    def save(self, step: int, modules: dict[str, nn.Module], opt: torch.optim.Optimizer, g: torch.Generator) -> None:
        """Every rank calls it (their data generators' states are gathered); rank 0 writes."""
        states = _gather_generator_states(g)
        if not distributed.is_main():
            distributed.barrier()
            return
        tensors = {f"{name}.{k}": v.detach().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
        for i, state in opt.state_dict()["state"].items():
            for k, v in state.items():
                tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().contiguous()
        tensors["generator"] = states[0]
        tensors.update({f"generator.{r}": state for r, state in enumerate(states) if r})
        with atomic_path(self.directory, directory=True) as staging:
            save_file(tensors, staging / "state.safetensors")
            (staging / "checkpoint.json").write_text(json.dumps({"step": step, "settings": self.settings}, indent=2))
        distributed.barrier()

    def _made_before_context(self, meta: dict) -> bool:
        """A checkpoint made without context words, no later than the step they start at, is the
        state this run had at that step: the captions before it are drawn identically."""
        start = self.settings.get("context_from")
        without = {k: v for k, v in self.settings.items() if k != "context_from"}
        return start is not None and meta.get("settings") == without and int(meta["step"]) <= start

    def load(self, modules: dict[str, nn.Module], opt: torch.optim.Optimizer, g: torch.Generator) -> int:
        """The step to continue from (0 without a checkpoint); the state is restored in place."""
        meta_file = self.directory / "checkpoint.json"
        if not meta_file.exists():
            return 0
        meta = json.loads(meta_file.read_text())
        if meta.get("settings") != self.settings and not self._made_before_context(meta):
            raise SystemExit(f"{self.directory} holds a checkpoint made under other settings ({meta.get('settings')}); "
                             "remove it or pass another --checkpoint-dir")
        tensors = load_file(self.directory / "state.safetensors")
        for name, m in modules.items():
            m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                state.setdefault(int(i), {})[k] = v
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        r = distributed.rank()
        g.set_state(tensors["generator" if r == 0 else f"generator.{r}"])
        return int(meta["step"])


def _gather_generator_states(g: torch.Generator) -> list[torch.Tensor]:
    """The data generators' states of every rank, in rank order (on every rank)."""
    state = g.get_state()
    if not distributed.is_distributed():
        return [state]
    states = [torch.empty_like(state) for _ in range(distributed.world_size())]
    torch.distributed.all_gather(states, state)
    return states


def checkpoint_ema(world: GlyphWorld, checkpoint_dir: Path, out: Path | None = None) -> tuple[nn.Module, nn.Module, int]:
    """The EMA UNet and text encoder of the text-to-image checkpoint in ``checkpoint_dir`` (the
    models a run stopped there would ship, in float32) and its step; the optimiser's state is
    not read. A run on a frozen pretrained text encoder keeps none in its checkpoint: it is read
    from ``out/text_encoder``."""
    meta_file = checkpoint_dir / "checkpoint.json"
    if not meta_file.is_file():
        raise SystemExit(f"{checkpoint_dir} holds no text-to-image checkpoint (no checkpoint.json)")
    step = int(json.loads(meta_file.read_text())["step"])
    unet, text_encoder = build_unet(world), None
    with safe_open(str(checkpoint_dir / "state.safetensors"), framework="pt") as f:
        if any(k.startswith("ema_text_encoder.") for k in f.keys()):
            text_encoder = build_text_encoder(world)
        for name, module in (("ema_unet", unet), ("ema_text_encoder", text_encoder)):
            if module is not None:
                keys = [k for k in f.keys() if k.startswith(name + ".")]
                module.load_state_dict({k[len(name) + 1:]: f.get_tensor(k) for k in keys})
    if text_encoder is None:
        if out is None or not (out / "text_encoder").is_dir():
            raise SystemExit(f"{checkpoint_dir} was trained on a frozen pretrained text encoder; it is missing from "
                             f"{out}/text_encoder")
        text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder", dtype=torch.float32)
    return unet.eval(), text_encoder.eval(), step


def peeks_file(checkpoint_dir: Path) -> Path:
    """Where --peek keeps its readings: beside the checkpoint folder, which every save replaces."""
    return checkpoint_dir.parent / f"{checkpoint_dir.name}-peeks.json"


def _peek_readings(checkpoint_dir: Path) -> list[dict]:
    """Every reading in peeks_file (none when it is missing or unreadable)."""
    path = peeks_file(checkpoint_dir)
    try:
        return list(json.loads(path.read_text())["readings"]) if path.is_file() else []
    except (ValueError, KeyError, TypeError):
        return []


def peeks_of_run(checkpoint_dir: Path) -> list[dict]:
    """The peek readings of the run whose checkpoint is in ``checkpoint_dir`` (made under its
    settings, at steps it has passed), by step; readings of other runs are left out."""
    meta_file = checkpoint_dir / "checkpoint.json"
    if not meta_file.is_file():
        return []
    meta = json.loads(meta_file.read_text())
    readings = _peek_readings(checkpoint_dir)
    return sorted((r for r in readings if r.get("settings") == meta["settings"] and r.get("step", 0) <= meta["step"]),
                  key=lambda r: (r["step"], r.get("every", 0)))


def peek(world: GlyphWorld, out: Path, checkpoint_dir: Path, every: int) -> dict:
    """Progress of a text-to-image training that has hours to go: what the checkpoint's EMA model
    draws for every ``every``-th concept, one image by name and one by alias on held-out
    templates, read by the world's classifier (a minute where the check stage takes an hour).
    The reading is kept (peeks_file); the stage's record, when the run ends, carries its run's."""
    unet, text_encoder, step = checkpoint_ema(world, checkpoint_dir, out)
    settings = json.loads((checkpoint_dir / "checkpoint.json").read_text())["settings"]
    pipe = world_pipeline({"unet": unet, "vae": _load_vae(out), "text_encoder": text_encoder,
                           "scheduler": DDIMScheduler.from_config(build_scheduler().config)})
    concepts = list(range(0, world.num_concepts, every))
    record = {"step": step, "concepts": len(concepts),
              **held_out_drawing(pipe, GlyphClassifier.from_pretrained(out / "classifier"), world, concepts, 1, progress=False),
              "binding_gap": binding_gap(pipe, world, concepts)}
    errors = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in record["name_errors"].items() if k != "by_shape")
    gaps = ", ".join(f"{k} {v:+.3f}" for k, v in record["binding_gap"].items())
    print(f"{world.model} at step {step}: {record['name_accuracy']:.3f} of {len(concepts)} names and "
          f"{record['alias_accuracy']:.3f} of aliases drawn right (held-out templates); name prompts: {errors}; "
          f"binding gap {gaps}")
    reading = {"step": step, "every": every, "settings": settings, "concepts": record["concepts"],
               **{k: round(float(record[k]), 4) for k in ("name_accuracy", "alias_accuracy")},
               "binding_gap": record["binding_gap"],
               "name_errors": {k: v for k, v in record["name_errors"].items() if k != "by_shape"}}
    readings = [r for r in _peek_readings(checkpoint_dir) if (r.get("step"), r.get("every"), r.get("settings"))
                != (step, every, settings)]
    write_json_atomically(peeks_file(checkpoint_dir), {"readings": [*readings, reading]})
    return record


def train_ldm(world: GlyphWorld, out: Path, steps: int, seed: int, per_concept: int = 192, batch: int = 64,
              checkpoint_dir: Path | None = None, checkpoint_every: int = 250, cycles: int = 1,
              context_from: int | None = None, frozen_text_encoder: bool = False) -> None:
    """Train the UNet and text encoder for ``cycles`` cosine cycles of ``steps`` steps each (warm
    restarts: the learning rate warms up again at the start of every cycle). A step's learning
    rate does not depend on how many cycles follow, so the first k cycles of a longer run are a
    run of k cycles: a finished run's checkpoint continues into more cycles, bit for bit as if
    they had been asked for from the start. From step ``context_from`` on, half the captions are
    padded with random everyday words (see :func:`caption`); the steps before it are unchanged,
    so a checkpoint made before it continues into a run that uses them. With
    ``frozen_text_encoder``, the UNet alone is trained, on the text encoder the text stage
    pretrained (``out/text_encoder``, left as it is)."""
    if cycles < 1:
        raise ValueError(f"cycles must be >= 1, got {cycles}")
    # Under torchrun the ranks split each batch (DistributedDataParallel averages their
    # gradients, so a step is one step on the whole batch); each draws its share from a stream
    # of its own. On 2 CPU cores two one-thread ranks took about 2.15 steps/s against 1.38 for one
    # one-thread process; a second thread in one process gains only ~1.25x on this small UNet.
    ranks, me = distributed.world_size(), distributed.rank()
    if batch % ranks:
        raise SystemExit(f"the batch of {batch} does not split over {ranks} ranks")
    total = steps * cycles
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = _load_vae(out)
    tokenizer = clip_tokenizer()
    # A fixed set of images, encoded once (the VAE is frozen): concepts and background-only ones.
    none_images = per_concept * max(10, world.num_concepts // 12)
    labels = torch.cat([torch.arange(world.num_concepts).repeat_interleave(per_concept), torch.full((none_images,), world.none_class)])
    backgrounds = torch.randint(len(BACKGROUNDS), (labels.numel(),), generator=g)
    latents = []
    with torch.no_grad():
        for idx, bgs in tqdm(zip(labels.split(512), backgrounds.split(512), strict=True), total=-(-labels.numel() // 512), desc="encode",
                             disable=me != 0):
            images = render(idx, backgrounds=bgs, generator=g, world=world)
            latents.append(vae.encode(images).latent_dist.mean * vae.config.scaling_factor)
    latents = torch.cat(latents)
    if ranks > 1:  # every rank has the same images; from here on each draws its own share
        g.manual_seed(seed * 1_000_003 + me)

    unet = build_unet(world)
    if frozen_text_encoder:
        text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder", dtype=torch.float32).eval().requires_grad_(False)
    else:
        text_encoder = build_text_encoder(world)
    # The trained models, each with its EMA shadow (what the stage ships).
    trained = {name: (model, copy.deepcopy(model).requires_grad_(False))
               for name, model in (("unet", unet), ("text_encoder", text_encoder))
               if name == "unet" or not frozen_text_encoder}
    ema = trained["unet"][1]
    noise_scheduler = training_noise_scheduler()
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    params = [p for model, _ in trained.values() for p in model.parameters()]
    # fused: one kernel over all parameters (the text encoder's 49408-row embedding dominates); on
    # 2 CPU cores the optimiser step took about 110 ms of a 0.9 s step unfused, 38 ms fused.
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, fused=True)
    modules = {**{name: model for name, (model, _) in trained.items()},
               **{f"ema_{name}": shadow for name, (_, shadow) in trained.items()}}
    pairs = [(list(model.parameters()), list(shadow.parameters())) for model, shadow in trained.values()]
    checkpoint = None
    first = 0
    if checkpoint_dir is not None:
        settings = {"world": world.key, "seed": seed, "steps": steps, "per_concept": per_concept, "batch": batch,
                    "vae": files_digest(sorted((out / "vae").glob("*.safetensors"))),
                    **({"context_from": context_from} if context_from is not None else {}),
                    **({"text_encoder": files_digest(sorted((out / "text_encoder").glob("*.safetensors")))}
                       if frozen_text_encoder else {}),
                    **({"ranks": ranks} if ranks > 1 else {})}
        checkpoint = LdmCheckpoint(checkpoint_dir, settings)
        first = checkpoint.load(modules, opt, g)
        if first > total:
            raise SystemExit(f"{checkpoint_dir} holds a checkpoint at step {first}, past the {total} steps asked for "
                             f"({cycles} cycle(s) of {steps}); ask for more cycles or pass another --checkpoint-dir")
        if first and me == 0:
            print(f"resuming the text-to-image training at step {first} of {total} from {checkpoint_dir}")
    # The models the ranks step: wrapped, their gradients are averaged over ranks in backward.
    denoiser = DistributedDataParallel(unet) if ranks > 1 else unet
    encoder = DistributedDataParallel(text_encoder) if ranks > 1 and not frozen_text_encoder else text_encoder
    batch //= ranks
    bar = tqdm(range(first, total), desc="text-to-image", initial=first, total=total, disable=me != 0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = 1e-3 * _cosine(step % steps, steps, 200)
        rows = torch.randint(labels.numel(), (batch,), generator=g)
        context = context_from is not None and step >= context_from
        texts = [caption(int(labels[r]), int(backgrounds[r]), g, world, context) for r in rows]
        texts = ["" if torch.rand(1, generator=g).item() < 0.1 else t for t in texts]  # for classifier-free guidance
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(1000, (batch,), generator=g)
        xt = noise_scheduler.add_noise(x0, noise, t)
        with torch.set_grad_enabled(not frozen_text_encoder):
            encoded = encoder(ids)[0]
        pred = denoiser(xt, t, encoded).sample
        weight = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR weighting (gamma 5) for epsilon prediction
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for live, shadow in pairs:
                torch._foreach_lerp_(shadow, live, 1 - decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or (step + 1) % steps == 0):
            checkpoint.save(step + 1, modules, opt, g)
    if me == 0:
        _save_stage(out, "unet", lambda d: _half(ema).save_pretrained(d))
        if not frozen_text_encoder:
            _save_stage(out, "text_encoder", lambda d: _half(trained["text_encoder"][1]).save_pretrained(d))
        _save_stage(out, "scheduler", lambda d: build_scheduler().save_pretrained(d))
    distributed.barrier()


@dataclass(frozen=True)
class Recipe:
    """How a world's models are trained: steps per stage (the text-to-image ones per cosine
    cycle), rendered images per concept, check images per name and alias, cosine cycles, the
    step context words start at, and the text encoder's pretraining steps (0: the text encoder
    is trained with the UNet on the denoising loss alone)."""

    vae_steps: int
    classifier_steps: int
    ldm_steps: int
    per_concept: int
    check_images: int
    ldm_cycles: int
    context_from: int | None
    text_steps: int = 0


# The large world's recipe is three cycles of plain captions, then a fourth with context words:
# after three the model drew 96% of the names and aliases right on the training templates but
# 81% / 63% on the held-out ones (docs/design.md, section 7).
# The identity worlds read held-out templates from the start (context words from step 0). The
# pilot is the full world's first 25 families: after one cycle of 3000 steps (about 1,900 captions
# per identity) it drew 32% of the names right, nearly all as clean but wrong identities; after a
# second, 95% (about 3,800 per identity). Given each of its 656 identities as many captions (3
# cycles of 13000 steps), the full world trained jointly drew 0-6% of names right through step
# 20000 of 39000: the denoising loss alone taught its text encoder too slowly which name is
# which identity. Its recipe therefore pretrains the text encoder first, as Stable Diffusion's
# came pretrained from CLIP (train_text_encoder), and trains the UNet on it frozen.
DEFAULTS = {"world": Recipe(1500, 1200, 4000, 192, 5, 1, None),
            "world-large": Recipe(1500, 2500, 6000, 96, 3, 4, 18000),
            "world-identity": Recipe(1500, 3000, 13000, 96, 3, 3, 0, text_steps=1500),
            "world-identity-pilot": Recipe(800, 1200, 3000, 192, 5, 2, 0)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mace.world.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="world", choices=sorted(WORLDS))
    parser.add_argument("--out", type=Path, default=None, help="weights folder (default: the world's shipped weights folder)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--classifier-steps", type=int, default=None)
    parser.add_argument("--text-steps", type=int, default=None,
                        help="text encoder pretraining steps (0: trained with the UNet instead; default: the world's recipe)")
    parser.add_argument("--ldm-steps", type=int, default=None, help="text-to-image steps per cosine cycle")
    parser.add_argument("--ldm-cycles", type=int, default=None,
                        help="cosine cycles (warm restarts); a finished run's checkpoint continues into more")
    parser.add_argument("--context-from", type=int, default=None,
                        help="text-to-image step from which half the captions get random context words "
                             "(default: the world's recipe; -1: never)")
    parser.add_argument("--per-concept", type=int, default=None, help="rendered images per concept the text-to-image model sees")
    parser.add_argument("--check-images", type=int, default=None, help="images per name and per alias in the check stage")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="where the text-to-image stage keeps its checkpoints (default: outputs/world-training/WORLD)")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--peek", type=int, default=None, metavar="EVERY",
                        help="only report what the text-to-image checkpoint's EMA model draws for every EVERY-th concept "
                             "(a minute; the training may go on meanwhile)")
    parser.add_argument("--retrain", action="store_true",
                        help="run the stages asked for even when their records say they are done under these settings")
    args = parser.parse_args(argv)
    world = WORLDS[args.world]
    recipe = DEFAULTS[world.key]
    overrides = {k: getattr(args, k) for k in ("vae_steps", "classifier_steps", "text_steps", "ldm_steps", "ldm_cycles",
                                               "per_concept", "check_images") if getattr(args, k) is not None}
    for key, value in overrides.items():
        if value < (0 if key == "text_steps" else 1):
            parser.error(f"--{key.replace('_', '-')} must be at least {0 if key == 'text_steps' else 1}, got {value}")
    if args.context_from is not None:
        overrides["context_from"] = None if args.context_from < 0 else args.context_from
    recipe = replace(recipe, **overrides)
    out = args.out or weights_dir(world)
    checkpoint_dir = args.checkpoint_dir or Path("outputs") / "world-training" / world.key
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peek is not None:
        if args.peek < 1:
            parser.error(f"--peek must be at least 1, got {args.peek}")
        peek(world, out, checkpoint_dir, args.peek)
        return
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    if distributed.launched():
        if stages != ["ldm"] or args.peek is not None:
            parser.error("under torchrun only the text-to-image stage runs (--stages ldm); run the others in one process")
        distributed.init_from_env()
    if "text" in stages and not recipe.text_steps:
        print("text: this recipe trains the text encoder with the UNet (text_steps 0); nothing to pretrain")
        stages.remove("text")
    times = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage != "check":
            record = stage_record(world, out, stage, args.seed, recipe)
            record_file = out / f"training-{stage}.json"
            if not args.retrain and (out / _STAGE_FOLDERS[stage]).is_dir() and _same_settings(record_file, record):
                if not distributed.is_main():
                    continue
                print(f"{stage}: already trained under these settings ({record_file}); skipped (--retrain runs it again)")
                continue
        start = time.perf_counter()
        extra: dict = {}
        if stage == "vae":
            train_vae(world, out, recipe.vae_steps, args.seed)
        elif stage == "classifier":
            train_classifier(world, out, recipe.classifier_steps, args.seed + 1)
        elif stage == "text":
            extra = train_text_encoder(world, out, recipe.text_steps, args.seed + 3)
        elif stage == "ldm":
            train_ldm(world, out, recipe.ldm_steps, args.seed + 2, per_concept=recipe.per_concept, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=args.checkpoint_every, cycles=recipe.ldm_cycles, context_from=recipe.context_from,
                      frozen_text_encoder=recipe.text_steps > 0)
            extra = {"peeks": peeks_of_run(checkpoint_dir)}  # how the drawing was learned, where peeked
        else:
            quality = check_model(world, out, recipe.check_images)
            write_json_atomically(out / "quality.json", quality)
        times[stage] = time.perf_counter() - start
        if stage != "check" and distributed.is_main():  # how the shipped weights were made
            write_json_atomically(record_file, {**record, **extra, "threads": torch.get_num_threads(),
                                                "seconds": {stage: round(times[stage], 1)}})
    if not distributed.is_main():
        return
    print("ran " + (", ".join(f"{k} in {v / 60:.1f} min" for k, v in times.items()) or "nothing") + f"; weights in {out}")


_STAGE_FOLDERS = {"vae": "vae", "classifier": "classifier", "text": "text_encoder", "ldm": "unet"}


def stage_record(world: GlyphWorld, out: Path, stage: str, seed: int, recipe: Recipe) -> dict:
    """The settings a training stage's output depends on (its record, without threads and seconds)."""
    steps = {"vae": recipe.vae_steps, "classifier": recipe.classifier_steps, "text": recipe.text_steps,
             "ldm": recipe.ldm_steps}[stage]
    record: dict = {"world": world.key, "seed": seed, "steps": {stage: steps}}
    if stage == "ldm":
        record.update(ldm_cycles=recipe.ldm_cycles, context_from=recipe.context_from, images_per_concept=recipe.per_concept)
        if recipe.text_steps:  # trained on the pretrained text encoder, frozen
            record["text_encoder"] = files_digest(sorted((out / "text_encoder").glob("*.safetensors")))
        if distributed.world_size() > 1:  # the ranks draw other batches than one process
            record["ranks"] = distributed.world_size()
    if stage in ("classifier", "ldm"):  # trained on the VAE's latents (the classifier: on its reconstructions)
        record["vae"] = files_digest(sorted((out / "vae").glob("*.safetensors")))
    return record


def _same_settings(record_file: Path, record: dict) -> bool:
    if not record_file.is_file():
        return False
    try:
        old = json.loads(record_file.read_text())
    except ValueError:
        return False
    # Keys of older records that this stage does not depend on (images_per_concept of the VAE) are not compared.
    return all(old.get(k) == v for k, v in record.items())


if __name__ == "__main__":
    main()
