"""UCE (Unified Concept Editing, Gandikota et al., WACV 2024), the closed-form baseline MACE is
compared with, on the same mace_kernels ops.

UCE edits every cross-attention key/value projection once, in closed form:

    W' = argmin  sum_i ||W' c_i - W c*_i||^2 + s_p sum_j ||W' c_j - W c_j||^2 + lam ||W' - W||^2

where c_i are the embeddings of an erased concept's text and c*_i those of its guide text
("a glyph", "a person"), and c_j the embeddings of concepts to preserve. The tokens are those
from the concept's last word piece to the end of the sequence (end-of-text and padding, where a
causal text encoder has seen the whole concept), aligned from the last word piece, as the UCE
reference code takes them. Unlike MACE it has no prompt templates, no LoRA stage and no
attention loss: one solve on the bare concept texts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import mace_kernels as mk
from mace.closed_form import SolveReport, refine_weights
from mace.pipelines.components import edit_projections, encode_prompts
from mace.stages.prompts import last_word_piece


def uce_tokens(pipe, texts: Sequence[str], guides: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens UCE edits: each text's embeddings from its last word piece to the end (N, d), and,
    with ``guides``, the guides' embeddings aligned to them position by position."""
    tok = pipe.tokenizer
    length = tok.model_max_length
    emb = encode_prompts(pipe, list(texts))
    ids = tok(list(texts), truncation=True, max_length=length).input_ids
    if guides is None:
        rows = [emb[b, last_word_piece(i):] for b, i in enumerate(ids)]
        return torch.cat(rows), None
    if len(guides) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(guides)} guides")
    g_emb = encode_prompts(pipe, list(guides))
    g_ids = tok(list(guides), truncation=True, max_length=length).input_ids
    old, new = [], []
    for b, (io, ig) in enumerate(zip(ids, g_ids, strict=True)):
        lo, lg = last_word_piece(io), last_word_piece(ig)
        n = length - max(lo, lg)  # both runs end inside the 77 positions
        old.append(emb[b, lo : lo + n])
        new.append(g_emb[b, lg : lg + n])
    return torch.cat(old), torch.cat(new)


def uce(
    pipe,
    erase: Sequence[str],
    guide: str | Sequence[str],
    preserve: Sequence[str] = (),
    *,
    lam: float = 0.1,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    jitter: float | None = None,
) -> SolveReport:
    """Erase the ``erase`` concepts from ``pipe`` in place by UCE, mapping each onto ``guide``
    (one text, or one per concept) and preserving the ``preserve`` concepts."""
    erase = list(erase)
    if not erase:
        raise ValueError("uce: no concepts to erase")
    guides = [guide] * len(erase) if isinstance(guide, str) else list(guide)
    old, new = uce_tokens(pipe, erase, guides)
    scale = erase_scale**0.5  # scaling both sides scales the erase term by erase_scale
    P = None
    if preserve:
        kept, _ = uce_tokens(pipe, list(preserve))
        P, _ = mk.token_covariance(kept.to(torch.float64))
    report = edit_projections(pipe.unet, lambda weights: refine_weights(
        weights, old * scale, new * scale, lam=lam, preserve=P,
        preserve_scale=preserve_scale if P is not None else 0.0, jitter=jitter,
    ))
    report.extra.update(erased=len(erase), preserved=len(preserve))
    return report
