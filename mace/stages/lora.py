"""Per-concept LoRA training (stage 2 of MACE), batched across concepts.

Each concept gets a rank-r LoRA on every cross-attention key/value projection. The loss is
the norm of the cross-attention probabilities that the concept's tokens (and the end-of-text
token, ``use_pooler``) receive at every attn2 layer, restricted to the pixels of the concept's
mask resized to the layer's resolution (styles: every pixel). Minimising it teaches the
projections to stop routing the concept's tokens into the image.

Batching: one UNet pass carries samples of k concepts, grouped in consecutive segments; every
attn2 layer computes its keys and values with ``mace_kernels.lora_apply``, which applies
segment k's own LoRA, so k LoRAs train in one pass instead of k runs. Concepts do not interact
(per-sample UNet, per-concept parameters and losses), so a batched step gives each LoRA the
gradient its own single-concept step would.

Prior preservation (optional, as in the original training script): each concept's segment is
followed by preservation samples (kept images captioned with a preservation prompt) that go
through that concept's LoRA too. The attention loss ignores them; they add
``prior_loss_weight * MSE(noise prediction, target)`` per concept, the mean over that
concept's preservation samples, so the batched step still equals k single-concept steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

import mace_kernels as mk
from mace.pipelines.attention import ProcessorSwap, cross_attention_forward
from mace.pipelines.components import cross_attention_projections, projection_weights


def importance_weights(num_timesteps: int = 1000, temperature: float = 0.05) -> torch.Tensor:
    """f(t) = sigmoid(T (t - 200)) - sigmoid(T (t - 400)), normalised: favours t in [200, 400]."""
    t = torch.arange(num_timesteps, dtype=torch.float64)
    w = torch.sigmoid(temperature * (t - 200)) - torch.sigmoid(temperature * (t - 400))
    return w / w.sum()


def sample_timesteps(n: int, num_timesteps: int, importance: bool, generator: torch.Generator) -> torch.Tensor:
    if importance:
        return torch.multinomial(importance_weights(num_timesteps).float(), n, replacement=True, generator=generator)
    return torch.randint(0, num_timesteps, (n,), generator=generator)


@dataclass
class AttentionTargets:
    """What the loss looks at, per sample of the batch.

    Batch layout: for each concept in turn, its ``group_sizes[k]`` samples, then (with
    ``prior_sizes``) its ``prior_sizes[k]`` preservation samples. ``token_positions`` and
    ``masks`` describe the concept samples only, in batch order.
    """

    token_positions: torch.Tensor  # (B_concept, 77) bool: the concept's tokens (+ end-of-text)
    masks: torch.Tensor | None  # (B_concept, 1, H, W) in [0, 1], or None: every pixel
    group_sizes: list[int]  # concept samples per concept, consecutive
    prior_sizes: list[int] | None = None  # preservation samples per concept, right after its own samples
    layer_norms: list[torch.Tensor] = field(default_factory=list)  # per layer, (num concepts,)

    @property
    def segment_sizes(self) -> list[int]:
        """Rows of the UNet batch per concept: the segment that goes through that concept's LoRA."""
        if self.prior_sizes is None:
            return list(self.group_sizes)
        return [g + p for g, p in zip(self.group_sizes, self.prior_sizes, strict=True)]

    def _rows(self, prior: bool) -> torch.Tensor:
        rows, start = [], 0
        for g, p in zip(self.group_sizes, self.prior_sizes or [0] * len(self.group_sizes), strict=True):
            rows.extend(range(start + g, start + g + p) if prior else range(start, start + g))
            start += g + p
        return torch.tensor(rows, dtype=torch.long)

    def concept_rows(self) -> torch.Tensor:
        """Batch indices of the concept samples (those the attention loss looks at)."""
        return self._rows(prior=False)

    def prior_rows(self) -> torch.Tensor:
        """Batch indices of the preservation samples, concept by concept."""
        return self._rows(prior=True)


class MultiConceptLoRA(nn.Module):
    """The LoRAs of k concepts on every attn2 to_k / to_v, stacked as (k, r, d) and (k, out, r)."""

    def __init__(self, unet: nn.Module, num_concepts: int, rank: int, *, seed: int = 0,
                 concept_seeds: Sequence[int] | None = None):
        super().__init__()
        self.names = [name for name, _ in cross_attention_projections(unet)]
        # Concept k's initial weights come from its own generator, so they do not depend on
        # which other concepts share its batch.
        seeds = list(concept_seeds) if concept_seeds is not None else [seed + k for k in range(num_concepts)]
        if len(seeds) != num_concepts:
            raise ValueError(f"{len(seeds)} concept seeds for {num_concepts} concepts")
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for _, lin in cross_attention_projections(unet):
            out, d = lin.weight.shape
            device = lin.weight.device
            # As diffusers' LoRA layer, which the original MACE trains: A ~ N(0, (1/rank)^2),
            # B = 0, scale 1, so training starts from the unchanged model. Drawn on the CPU
            # (the same numbers on every device), kept beside the projection they adapt.
            a = torch.stack([torch.randn(rank, d, generator=g) for g in generators]) / rank
            self.A.append(nn.Parameter(a.to(device)))
            self.B.append(nn.Parameter(torch.zeros(num_concepts, out, rank, device=device)))
        self.num_concepts, self.rank = num_concepts, rank

    def preservation_penalty(self, preserve: torch.Tensor, base_norms: Sequence[torch.Tensor]) -> torch.Tensor:
        """(k,): per concept, sum over layers of tr(B A P A^T B^T) / tr(W P W^T), the squared
        change its LoRA makes to the outputs of the tokens P = sum e e^T summarises, relative to
        the layer's own outputs on them (``base_norms``: tr(W P W^T) per layer)."""
        total = torch.zeros(self.num_concepts, device=self.A[0].device)
        for a, b, norm in zip(self.A, self.B, base_norms, strict=True):
            inner = a @ preserve.to(a.dtype) @ a.transpose(1, 2)  # (k, r, r)
            total = total + ((b @ inner) * b).sum((1, 2)) / norm
        return total

    def concept_lora(self, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{projection name: (A (r, d), B (out, r))} of concept k (scale 1)."""
        return {n: (a[k].detach().clone(), b[k].detach().clone()) for n, a, b in zip(self.names, self.A, self.B, strict=True)}


class _MultiLoraAttnProcessor:
    """attn2 processor: keys/values through per-segment LoRAs, attention probabilities recorded."""

    def __init__(self, owner: LoraTrainingHooks, k_index: int, v_index: int):
        self.owner, self.k_index, self.v_index = owner, k_index, v_index

    def _key_value(self, attn, context: torch.Tensor):
        batch, tokens, width = context.shape
        ctx = context.reshape(batch * tokens, width)
        seg_lens = [g * tokens for g in self.owner.targets.segment_sizes]
        lora = self.owner.lora
        key = mk.lora_apply(ctx, attn.to_k.weight, lora.A[self.k_index], lora.B[self.k_index], seg_lens,
                            bias=attn.to_k.bias)
        value = mk.lora_apply(ctx, attn.to_v.weight, lora.A[self.v_index], lora.B[self.v_index], seg_lens,
                              bias=attn.to_v.bias)
        return key.view(batch, tokens, -1), value.view(batch, tokens, -1)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return cross_attention_forward(attn, hidden_states, encoder_hidden_states,
                                       lambda ctx: self._key_value(attn, ctx), self.owner.record)


class LoraTrainingHooks:
    """Installs the multi-LoRA processors on a UNet's attn2 layers and computes the loss."""

    def __init__(self, unet: nn.Module, lora: MultiConceptLoRA):
        self.unet, self.lora = unet, lora
        self.targets: AttentionTargets | None = None
        index = {name: i for i, name in enumerate(lora.names)}

        def processor_for(name: str):
            if f"{name}.to_k" not in index:
                return None
            return _MultiLoraAttnProcessor(self, index[f"{name}.to_k"], index[f"{name}.to_v"])

        self._swap = ProcessorSwap(unet, processor_for)
        self._swap.install()

    def remove(self) -> None:
        """Give the attn2 layers back their previous processors."""
        self._swap.restore()

    def __enter__(self) -> LoraTrainingHooks:
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def record(self, probs: torch.Tensor, batch: int) -> None:
        t = self.targets
        heads = probs.shape[0] // batch
        pixels = probs.shape[1]
        p = probs.view(batch, heads, pixels, -1)
        if t.prior_sizes is not None:  # the attention loss looks at the concept samples only
            p = p[t.concept_rows().to(p.device)]
            batch = p.shape[0]
        picked = p * t.token_positions[:, None, None, :].to(p.device, p.dtype)
        if t.masks is not None:
            side = int(round(math.sqrt(pixels)))
            m = F.interpolate(t.masks.float(), size=(side, side), mode="nearest").reshape(batch, pixels) > 0.5
            picked = picked * m[:, None, :, None].to(p.dtype)
        per_sample = picked.pow(2).flatten(1).sum(1)  # squared norm per sample
        groups = torch.split(per_sample, t.group_sizes)
        t.layer_norms.append(torch.stack([g.sum().clamp_min(1e-30).sqrt() for g in groups]))

    def loss(self) -> torch.Tensor:
        """sum over layers and concepts of ||attention on the concept's tokens inside its mask||."""
        return torch.stack(self.targets.layer_norms).sum()


def forward_process(scheduler) -> DDPMScheduler:
    """The model's training noise process: DDPM's, built from the config of whatever sampler the
    pipeline carries (its betas, ``num_train_timesteps`` and ``prediction_type``).

    A sampler's ``add_noise`` follows its own parametrisation: Euler's returns x + sigma * noise
    and expects its ``scale_model_input`` before the UNet, so noising training latents with it
    feeds the UNet inputs it never saw. diffusers' training scripts, and the original MACE,
    noise with a DDPMScheduler made from the model's scheduler config; so does everything here.
    """
    if type(scheduler) is DDPMScheduler:
        return scheduler
    return DDPMScheduler.from_config(scheduler.config)


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v_prediction),
    under the model's forward process (:func:`forward_process`) whatever ``scheduler`` samples with."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return forward_process(scheduler).get_velocity(latents, noise, timesteps)
    raise ValueError(f"prior preservation: unsupported scheduler prediction_type {kind!r} (use epsilon or v_prediction)")


def prior_preservation_loss(prediction: torch.Tensor, target: torch.Tensor, targets: AttentionTargets) -> torch.Tensor:
    """sum over concepts of MSE(prediction, target) over that concept's preservation samples."""
    rows = targets.prior_rows().to(prediction.device)
    sizes = [p for p in targets.prior_sizes if p > 0]
    per_row = (prediction[rows].float() - target[rows].float()).pow(2).flatten(1).mean(1)
    return torch.stack([chunk.mean() for chunk in torch.split(per_row, sizes)]).sum()


@dataclass
class LoraPreservation:
    """lora_preserve_scale's term of the LoRA loss: ``scale`` times the sum over concepts of
    :meth:`MultiConceptLoRA.preservation_penalty` (each concept's term depends on its own LoRA
    only, so a batched step stays k single-concept steps)."""

    lora: MultiConceptLoRA
    statistic: torch.Tensor  # P (d, d) of the preserved tokens
    base_norms: list[torch.Tensor]  # tr(W P W^T) per layer
    scale: float

    @classmethod
    def for_unet(cls, unet: nn.Module, lora: MultiConceptLoRA, statistic: torch.Tensor, scale: float) -> LoraPreservation:
        device = lora.A[0].device
        statistic = statistic.to(device=device, dtype=torch.float32)
        with torch.no_grad():
            norms = [torch.einsum("od,de,oe->", w.float().to(device), statistic, w.float().to(device)).clamp_min(1e-30)
                     for w in projection_weights(unet)]
        return cls(lora, statistic, norms, scale)

    def loss(self) -> torch.Tensor:
        return self.scale * self.lora.preservation_penalty(self.statistic, self.base_norms).sum()


def train_step(
    unet: nn.Module,
    hooks: LoraTrainingHooks,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    targets: AttentionTargets,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prior_loss_weight: float = 1.0,
    *,
    loss_scale: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    preservation: LoraPreservation | None = None,
) -> torch.Tensor:
    """One forward/backward pass over a batch of k concepts' samples; returns the loss, the
    whole of what is optimised.

    Without ``targets.prior_sizes`` the loss is the attention loss. With it, the batch holds
    each concept's preservation samples after its own (see AttentionTargets) and the loss is
    attention loss + prior_loss_weight * sum over concepts of the MSE of the noise prediction
    on that concept's preservation samples. With ``preservation`` (lora_preserve_scale) its
    term is added too. Gradients of ``loss_scale * loss`` accumulate
    (gradient accumulation passes 1 / steps); ``autocast_dtype`` runs the UNet in float16 or
    bfloat16 (mixed precision) while the LoRA parameters and the loss stay float32.
    ``scheduler``: the pipeline's (any sampler); the latents are noised by the model's forward
    process built from its config (:func:`forward_process`), never by the sampler's ``add_noise``.
    ``added_cond_kwargs``: the UNet's added conditions (SDXL, see models.added_conditions).
    ``grad_scaler``: fp16's dynamic loss scaling; the backward pass runs on the scaled loss,
    and the caller unscales before clipping (the loss returned is unscaled).
    """
    hooks.targets = targets
    targets.layer_norms.clear()
    scheduler = forward_process(scheduler)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    device_type = latents.device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_embeddings,
                          added_cond_kwargs=added_cond_kwargs).sample
    loss = hooks.loss().float()
    if targets.prior_sizes is not None and sum(targets.prior_sizes) > 0:
        target = prediction_target(scheduler, latents, noise, timesteps)
        loss = loss + prior_loss_weight * prior_preservation_loss(prediction, target, targets)
    if preservation is not None:  # with gradient accumulation, once per micro-step at loss_scale: once a step
        loss = loss + preservation.loss()
    scaled = loss * loss_scale
    (grad_scaler.scale(scaled) if grad_scaler is not None else scaled).backward()
    return loss.detach()


@torch.no_grad()
def clip_grad_norm_per_concept(lora: MultiConceptLoRA, max_norm: float) -> torch.Tensor:
    """Clip each concept's gradient (all its A and B slices together) to ``max_norm``, as a
    single-concept run's ``clip_grad_norm_`` would; returns the norms before clipping, (k,).

    A global clip over the stacked parameters would couple the concepts; this keeps a batched
    step equal to k single-concept steps.
    """
    params = [p for p in list(lora.A) + list(lora.B) if p.grad is not None]
    if not params:
        return torch.zeros(lora.num_concepts)
    norms = torch.stack([p.grad.float().pow(2).flatten(1).sum(1) for p in params]).sum(0).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype).view(-1, *[1] * (p.grad.dim() - 1)))
    return norms


def concept_token_mask(tokenizer, prompts: Sequence[str], concepts: Sequence[str], use_pooler: bool) -> torch.Tensor:
    """(B, 77) bool: the positions whose attention the loss suppresses, as the original MACE marks them.

    Each prompt is tokenised padded to ``model_max_length``. Marked: every occurrence of the
    concept name's token ids (``concepts[b]``, the text the prompt templates insert), and with
    ``use_pooler`` every position holding the end-of-text id. SD 1.x's tokenizer pads with
    end-of-text, so that is the end token and all the padding after it (73 of 77 positions of
    "A photo of adam driver" in all); SD 2.x's pads with "!", so there only the end token is.
    SDXL: the first tokenizer decides (it pads with end-of-text); each marked position carries
    both encoders' embeddings.
    """
    length = tokenizer.model_max_length
    ids = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=length).input_ids
    eos = tokenizer.eos_token_id
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for b, (seq, concept) in enumerate(zip(ids, concepts, strict=True)):
        name = tokenizer(concept, add_special_tokens=False).input_ids
        for i in range(len(seq) - len(name) + 1):
            if name and seq[i:i + len(name)] == name:
                mask[b, i:i + len(name)] = True
        if use_pooler:
            mask[b] |= torch.tensor(seq) == eos
    return mask


__all__ = [
    "AttentionTargets",
    "clip_grad_norm_per_concept",
    "LoraTrainingHooks",
    "MultiConceptLoRA",
    "concept_token_mask",
    "forward_process",
    "importance_weights",
    "prediction_target",
    "prior_preservation_loss",
    "sample_timesteps",
    "train_step",
]
