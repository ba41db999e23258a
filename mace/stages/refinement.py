"""Stage 1 of MACE: closed-form refinement of the cross-attention projections of a pipeline
(the math is in mace.closed_form and docs/design.md, section 2)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mace import distributed as dist
from mace.closed_form import SolveReport, refine_weights_streamed
from mace.config import MACEConfig
from mace.pipelines.components import edit_projections, encode_prompts
from mace.stages.cache import PreservationCache, PreservationSettings
from mace.stages.prompts import PromptPair, align_tokens


@dataclass(frozen=True)
class RefinementSettings:
    """Stage 1's settings, read from a config in one place."""

    lam: float = 0.0
    preserve: PreservationSettings = field(default_factory=PreservationSettings)
    preserve_scale: float = 0.0
    all_words: bool = False
    method: str = "fast"
    jitter: float | None = None
    preserve_per_token: bool = False  # preserve_scale_mode: per_token (the scale counts per erased token pair)

    @classmethod
    def from_config(cls, config: MACEConfig, preserve: PreservationSettings | None = None) -> RefinementSettings:
        """The original code's effective weights: it multiplies the caches by train_preserve_scale
        and passes that scale to the solve again, so P enters with train_preserve_scale ** 2 (with
        more than max_memory concepts it folds the concepts into the caches and the weight is
        train_preserve_scale once). Under ``preserve_scale_mode: per_token``, train_preserve_scale
        once, per erased token pair, against per-token mean caches (MACEConfig's comment)."""
        return cls(lam=config.lamb, preserve=preserve or PreservationSettings.from_config(config),
                   preserve_scale=config.effective_refine_preserve_scale, all_words=config.all_words, method=config.method,
                   jitter=config.solve_jitter, preserve_per_token=config.preserve_per_token)

    def apply(self, pipe, pairs: Sequence[tuple[str, str] | PromptPair], *, preserve: torch.Tensor | None,
              distributed: bool = False) -> SolveReport:
        """:func:`refine` with these settings; ``preserve`` is their caches' statistic
        (``self.preserve.matrix(pipe)``, read once per run by the caller)."""
        return refine(pipe, pairs, lam=self.lam, preserve=preserve, preserve_scale=self.preserve_scale,
                      all_words=self.all_words, method=self.method, jitter=self.jitter, distributed=distributed,
                      preserve_per_token=self.preserve_per_token)


def aligned_pair_batches(
    pipe, pairs: Sequence[tuple[str, str] | PromptPair], *, all_words: bool = False, batch_size: int = 64,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (old_tokens, new_tokens), the aligned (N_b, d) embeddings of consecutive pairs,
    one text-encoder batch at a time.

    Each distinct prompt is encoded once: with one mapping concept, the new prompts of every
    concept are the same few templates. A prompt that later pairs use again is kept (its
    (77, d) embedding) until its last use, so memory is one batch plus the repeated prompts,
    not every token. A batch takes pairs while the prompts it must encode fit ``batch_size``.
    With ``all_words`` every one of the 77 positions is paired, as the original option does.
    """
    pairs = _as_pairs(pairs)
    uses = Counter(prompt for pair in pairs for prompt in pair)
    kept: dict[str, torch.Tensor] = {}
    tok = pipe.tokenizer
    length = tok.model_max_length
    start = 0
    while start < len(pairs):
        fresh: dict[str, None] = {}  # an ordered set
        stop = start
        while stop < len(pairs):
            needed = [p for p in dict.fromkeys(pairs[stop]) if p not in kept and p not in fresh]
            if fresh and len(fresh) + len(needed) > batch_size:
                break
            fresh.update(dict.fromkeys(needed))
            stop += 1
        batch = pairs[start:stop]
        start = stop
        table = dict(kept)
        if fresh:
            table.update(zip(fresh, encode_prompts(pipe, list(fresh), batch_size), strict=True))
        e_old = torch.stack([table[o] for o, _ in batch])
        e_new = torch.stack([table[n] for _, n in batch])
        for pair in batch:
            uses.subtract(pair)
        # clone: a kept row must not hold its whole encoder batch alive.
        kept = {p: (e if p in kept else e.clone()) for p, e in table.items() if uses[p] > 0}
        del table
        if all_words:
            d = e_old.shape[-1]
            yield e_old.reshape(-1, d), e_new.reshape(-1, d)
            continue
        ids_old = tok([o for o, _ in batch], truncation=True, max_length=length).input_ids
        ids_new = tok([n for _, n in batch], truncation=True, max_length=length).input_ids
        rows_b, rows_o, rows_n = [], [], []
        for b, (io, inew) in enumerate(zip(ids_old, ids_new, strict=True)):
            po, pn = align_tokens(io, inew, length)
            rows_b += [b] * len(po)
            rows_o += po
            rows_n += pn
        b = torch.tensor(rows_b, dtype=torch.long)
        yield e_old[b, torch.tensor(rows_o, dtype=torch.long)], e_new[b, torch.tensor(rows_n, dtype=torch.long)]


def aligned_pair_tokens(pipe, pairs: Sequence[tuple[str, str]], *, all_words: bool = False, batch_size: int = 64):
    """(old_tokens, new_tokens): the aligned (N, d) embeddings of every pair's corresponding tokens
    (all batches of :func:`aligned_pair_batches` at once; the stage itself streams them)."""
    olds, news = zip(*aligned_pair_batches(pipe, pairs, all_words=all_words, batch_size=batch_size), strict=True)
    return torch.cat(olds), torch.cat(news)


def _as_pairs(pairs) -> list[tuple[str, str]]:
    out = []
    for p in pairs:
        if isinstance(p, PromptPair):
            out.append((p.old, p.new))
        elif isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(s, str) for s in p):
            out.append((p[0], p[1]))
        else:
            raise TypeError(f"a prompt pair must be (old_prompt, new_prompt), got {p!r}")
    if not out:
        raise ValueError("refine: no prompt pairs given")
    return out


def refine(
    pipe,
    pairs: Sequence[tuple[str, str] | PromptPair],
    *,
    lam: float,
    preserve: torch.Tensor | PreservationCache | None = None,
    preserve_scale: float = 0.0,
    all_words: bool = False,
    method: str = "fast",
    dtype: torch.dtype = torch.float64,
    jitter: float | None = None,
    batch_size: int = 64,
    distributed: bool = False,
    preserve_per_token: bool = False,
) -> SolveReport:
    """Closed-form refinement of every cross-attention key/value projection, in place.

    Each projection W becomes the minimiser of
    sum ||W' e_o - W e_n||^2 + lam ||W' - W||^2 + s sum_p ||W' e_p - W e_p||^2
    over the aligned tokens of the (old_prompt, new_prompt) pairs; ``preserve`` is the d x d
    statistic of the preserved prompts (a cache or a tensor), s = ``preserve_scale`` (with
    ``preserve_per_token``: ``preserve_scale`` times the number of aligned token pairs, for a
    per-token mean statistic; see :func:`mace.closed_form.refine_weights_streamed`).
    ``method="fast"`` shares one d x d solve across layers; ``"reference"`` is paper-literal.
    With ``distributed`` (every rank of a torch.distributed run calls it with the same
    arguments, see mace.distributed) each rank encodes its share of the pairs, the statistics
    are summed over ranks and rank 0 alone solves and edits its pipeline; the other ranks'
    pipelines are left as they were. In a single-process run it changes nothing.
    """
    pairs = _as_pairs(pairs)
    count = len(pairs)
    if distributed:
        pairs = dist.shard(pairs)
    if isinstance(preserve, PreservationCache):
        preserve = preserve.cov
    # The prompts are encoded while the statistics accumulate, one batch at a time.
    batches = aligned_pair_batches(pipe, pairs, all_words=all_words, batch_size=batch_size) if pairs else iter(())
    report = edit_projections(pipe.unet, lambda weights: refine_weights_streamed(
        weights, batches, lam=lam, preserve=preserve, preserve_scale=preserve_scale,
        method=method, dtype=dtype, jitter=jitter, combine=dist.combine_statistics if distributed else None,
        preserve_per_token=preserve_per_token,
    ))
    report.extra["pairs"] = count
    return report
