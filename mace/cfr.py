"""Closed-form refinement (stage 1 of MACE) on a diffusers pipeline."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cache import PreservationCache
from .closed_form import SolveReport, refine_weights
from .models import cross_attention_projections, encode_prompts
from .prompts import PromptPair, align_tokens


def aligned_pair_tokens(pipe, pairs: Sequence[tuple[str, str]], *, all_words: bool = False, batch_size: int = 64):
    """(old_tokens, new_tokens): the aligned (N, d) embeddings of every pair's corresponding tokens.

    With ``all_words`` every one of the 77 positions is paired, as the original option does.
    """
    pairs = _as_pairs(pairs)
    olds = [p[0] for p in pairs]
    news = [p[1] for p in pairs]
    e_old = encode_prompts(pipe, olds, batch_size)
    e_new = encode_prompts(pipe, news, batch_size)
    if all_words:
        d = e_old.shape[-1]
        return e_old.reshape(-1, d), e_new.reshape(-1, d)
    tok = pipe.tokenizer
    length = tok.model_max_length
    ids_old = tok(olds, truncation=True, max_length=length).input_ids
    ids_new = tok(news, truncation=True, max_length=length).input_ids
    rows_b, rows_o, rows_n = [], [], []
    for b, (io, inew) in enumerate(zip(ids_old, ids_new)):
        po, pn = align_tokens(io, inew, length)
        rows_b += [b] * len(po)
        rows_o += po
        rows_n += pn
    b = torch.tensor(rows_b)
    return e_old[b, torch.tensor(rows_o)], e_new[b, torch.tensor(rows_n)]


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
) -> SolveReport:
    """Closed-form refinement of every cross-attention key/value projection, in place.

    Each projection W becomes the minimiser of
    sum ||W' e_o - W e_n||^2 + lam ||W' - W||^2 + s sum_p ||W' e_p - W e_p||^2
    over the aligned tokens of the (old_prompt, new_prompt) pairs; ``preserve`` is the d x d
    statistic of the preserved prompts (a cache or a tensor), s = ``preserve_scale``.
    ``method="fast"`` shares one d x d solve across layers; ``"reference"`` is paper-literal.
    """
    pairs = _as_pairs(pairs)
    if isinstance(preserve, PreservationCache):
        preserve = preserve.cov
    old_tokens, new_tokens = aligned_pair_tokens(pipe, pairs, all_words=all_words, batch_size=batch_size)
    projections = cross_attention_projections(pipe.unet)
    weights = [lin.weight.data for _, lin in projections]
    new, report = refine_weights(
        [w.cpu() for w in weights], old_tokens, new_tokens, lam=lam, preserve=preserve, preserve_scale=preserve_scale,
        method=method, dtype=dtype, jitter=jitter,
    )
    with torch.no_grad():
        for w, n in zip(weights, new):
            w.copy_(n.to(w.device, w.dtype))
    report.extra["pairs"] = len(pairs)
    return report
