"""Stage 3 of MACE: closed-form fusion of one LoRA per concept into a pipeline's cross-attention
projections (the math is in mace.closed_form and docs/design.md, section 2)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mace import distributed as dist
from mace.closed_form import LoraStack, SolveReport, fuse_weights_streamed
from mace.config import MACEConfig
from mace.pipelines.components import cross_attention_projections, edit_projections, encode_prompts, projection_weights
from mace.pipelines.lora_io import read_lora
from mace.stages.cache import PreservationCache, PreservationSettings

LoraSource = str | os.PathLike | Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class FusionSettings:
    """Stage 3's settings, read from a config in one place."""

    lam: float = 0.0
    preserve: PreservationSettings = field(default_factory=PreservationSettings)
    preserve_scale: float = 0.0
    method: str = "fast"
    jitter: float | None = None
    tokens: str = "all"  # "all" tokens of each concept's prompts, "concept": the name and after, "name"
    preserve_per_token: bool = False  # preserve_scale_mode: per_token (the scale counts per fused token)

    @classmethod
    def from_config(cls, config: MACEConfig, preserve: PreservationSettings | None = None) -> FusionSettings:
        """The original code's effective weight: fuse_preserve_scale once (train_preserve_scale
        with more than max_memory concepts, as its other branch does). Under
        ``preserve_scale_mode: per_token``, fuse_preserve_scale per fused token, against per-token
        mean caches (MACEConfig's comment)."""
        return cls(lam=config.lamb, preserve=preserve or PreservationSettings.from_config(config),
                   preserve_scale=config.effective_fuse_preserve_scale, method=config.method, jitter=config.solve_jitter,
                   tokens=config.fusion_tokens, preserve_per_token=config.preserve_per_token)

    def apply(self, pipe, loras: Mapping[str, LoraSource], prompts: Mapping[str, Sequence[str]], *,
              preserve: torch.Tensor | None, original=None, distributed: bool = False) -> SolveReport:
        """:func:`fuse` with these settings; ``preserve`` is their caches' statistic
        (``self.preserve.matrix(pipe)``, read once per run by the caller)."""
        return fuse(pipe, loras, prompts, lam=self.lam, preserve=preserve, preserve_scale=self.preserve_scale,
                    original=original, method=self.method, jitter=self.jitter, tokens=self.tokens,
                    distributed=distributed, preserve_per_token=self.preserve_per_token)


def stack_loras(loras: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]], projections) -> LoraStack:
    """Per-layer (n, r, d) / (n, out, r) stacks; ranks padded with zeros, absent layers zero."""
    n = len(loras)
    r = max((A.shape[0] for lora in loras for A, _ in lora.values()), default=1)
    As, Bs = [], []
    for name, lin in projections:
        out, d = lin.weight.shape
        A = torch.zeros(n, r, d)
        B = torch.zeros(n, out, r)
        for i, lora in enumerate(loras):
            if name in lora:
                a, b = lora[name]
                if a.shape[1] != d or b.shape[0] != out:
                    raise ValueError(f"LoRA of concept {i} on {name} is {tuple(b.shape)} x {tuple(a.shape)}, "
                                     f"the layer is {out} x {d}")
                A[i, : a.shape[0]] = a
                B[i, :, : a.shape[0]] = b
        As.append(A)
        Bs.append(B)
    return LoraStack(As, Bs)


def from_name_on(tokenizer, prompts: Sequence[str], name: str, *, name_only: bool = False) -> torch.Tensor:
    """(B, 77) bool: the positions from the first token of ``name`` on, in each prompt (with
    ``name_only``, the name's own tokens only).

    CLIP text encoders are causal: the embeddings before the name (the start token, a
    template's first words) are the same in every prompt that starts alike, whatever concept
    follows, so they carry nothing of the concept. A prompt without the name keeps no position.
    """
    length = tokenizer.model_max_length
    ids = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=length).input_ids
    piece = tokenizer(name, add_special_tokens=False).input_ids
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for b, seq in enumerate(ids):
        first = next((i for i in range(len(seq) - len(piece) + 1) if piece and seq[i:i + len(piece)] == piece), None)
        if first is not None:
            mask[b, first:first + len(piece) if name_only else length] = True
    return mask


def fuse(
    pipe,
    loras: Mapping[str, LoraSource],
    prompts: Mapping[str, Sequence[str]],
    *,
    lam: float,
    preserve: torch.Tensor | PreservationCache | None = None,
    preserve_scale: float = 0.0,
    original=None,
    method: str = "fast",
    dtype: torch.dtype = torch.float64,
    jitter: float | None = None,
    batch_size: int = 64,
    tokens: str = "all",
    distributed: bool = False,
    preserve_per_token: bool = False,
) -> SolveReport:
    """Fuse one LoRA per concept into the pipeline's cross-attention projections, in place.

    Args:
        loras: concept -> LoRA (a diffusers/peft safetensors file or folder, or a
            {projection name: (A, B)} mapping with the scale folded into B).
        prompts: concept -> the prompts whose every token the fused model must map as that
            concept's LoRA does.
        lam: weight of staying close to the current (refined) weights.
        preserve, preserve_scale: d x d preservation statistic and its weight s.
        preserve_per_token: s is ``preserve_scale`` times the number of fused tokens (for a
            per-token mean statistic; see :func:`mace.closed_form.refine_weights_streamed`).
        original: the weights preservation anchors to (a pipeline, or tensors in projection
            order); default: the pipeline's current weights.
        method: "fast" (one grouped fuse_loras call and one solve) or "reference".
        tokens: "all" (the original: every token of each prompt), "concept": only the
            positions from the concept's name on (:func:`from_name_on`; the concept key of
            ``loras`` is the name looked for), or "name": the name's own tokens only.
        distributed: every rank of a torch.distributed run calls it with the same arguments
            (mace.distributed): each rank encodes its share of the (concept, prompt batch)
            units, the statistics are summed over ranks and rank 0 alone solves and edits its
            pipeline; the other ranks' pipelines are left as they were. In a single-process run
            it changes nothing.
    """
    concepts = list(loras)
    if not concepts:
        raise ValueError("fuse: no LoRAs given")
    missing = [c for c in concepts if c not in prompts or not prompts[c]]
    if missing:
        raise ValueError(f"fuse: no prompts for concept(s) {missing}")
    if isinstance(preserve, PreservationCache):
        preserve = preserve.cov
    projections = cross_attention_projections(pipe.unet)
    names = [name for name, _ in projections]
    read = [read_lora(src, names) if not isinstance(src, Mapping) else dict(src) for src in loras.values()]
    for concept, lora in zip(concepts, read, strict=True):
        if not lora:
            raise ValueError(f"fuse: the LoRA of {concept!r} has no cross-attention key/value layer of this model")
    stack = stack_loras(read, projections)
    if tokens not in ("all", "concept", "name"):
        raise ValueError(f"fuse: tokens must be 'all', 'concept' or 'name', got {tokens!r}")
    d = projections[0][1].in_features
    # The masks (77 booleans a prompt) are made up front, so a concept whose prompts never
    # name it fails before any encoding; the tokens themselves are streamed below.
    masks = {}
    if tokens != "all":
        for c in concepts:
            masks[c] = from_name_on(pipe.tokenizer, list(prompts[c]), c, name_only=tokens == "name")
            if not masks[c].any():
                raise ValueError(f"fuse: no prompt of concept {c!r} contains its name, so it has no tokens to fuse")

    texts = [list(prompts[c]) for c in concepts]
    units = [(i, start) for i in range(len(concepts)) for start in range(0, len(texts[i]), batch_size)]
    if distributed:
        units = dist.shard(units)

    def batches():
        """(concept index, tokens) one prompt batch at a time: only running statistics are kept."""
        for i, start in units:
            e = encode_prompts(pipe, texts[i][start:start + batch_size], batch_size)
            if tokens != "all":
                e = e[masks[concepts[i]][start:start + batch_size]]
            yield i, e.reshape(-1, d)

    anchor = None
    if original is not None:
        anchor = [t.cpu() for t in (projection_weights(original.unet) if hasattr(original, "unet") else original)]
    report = edit_projections(pipe.unet, lambda weights: fuse_weights_streamed(
        weights, stack, batches(), lam=lam, preserve=preserve, preserve_scale=preserve_scale,
        original=anchor, method=method, dtype=dtype, jitter=jitter,
        combine=dist.combine_statistics if distributed else None, preserve_per_token=preserve_per_token,
    ))
    report.extra["concepts"] = len(concepts)
    return report
