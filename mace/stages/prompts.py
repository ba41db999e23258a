"""Prompts for each concept and the token alignment of old/new prompt pairs.

Closed-form refinement pairs every prompt that names a concept ("a photo of Emma Stone") with
the same prompt naming the mapping concept ("a photo of a person"). Tokens outside the
concept's own tokens are aligned by the common prefix and suffix of the two token sequences,
and the padding after them is aligned position by position. CLIP's text encoder is causal,
so the prefix embeddings of a pair are identical; the suffix and padding embeddings are
where the concept's residue hides, and refinement maps them onto the new prompt's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from mace.config import CONCEPT_TYPES

# {} is the concept. Object templates also serve celebrities and explicit concepts.
OBJECT_TEMPLATES = [
    "a photo of {}",
    "{} in a photo",
    "a close-up photo of {}",
    "a picture showing {}",
    "{} in the middle of the frame",
    "an image of {}",
    "a snapshot with {}",
    "a high resolution photo of {}",
    "a blurry photo of {}",
    "{} seen from the side",
    "a portrait of {}",
    "a painting of {}",
    "a drawing of {}",
    "a cropped photo of {}",
    "a bright photo of {}",
    "a dark photo of {}",
    "a black and white photo of {}",
    "{} on a sunny day",
    "{} at night",
    "a 3d rendering of {}",
    "a cartoon of {}",
    "a sketch of {}",
    "{} in a magazine",
    "a poster featuring {}",
    "a film still of {}",
    "a realistic image of {}",
    "a detailed photograph of {}",
    "{} outdoors",
    "{} indoors",
    "a candid photo of {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "an artwork by {}",
    "a landscape by {}",
    "a portrait painted by {}",
    "a still life by {}",
    "a city street in the style of {}",
    "art by {}",
    "a picture in the manner of {}",
    "an illustration by {}",
    "a drawing by {}",
    "a sketch in the style of {}",
    "a mural by {}",
    "a seascape by {}",
    "a self-portrait by {}",
    "a famous work by {}",
    "an abstract composition by {}",
    "a village painted by {}",
    "flowers painted by {}",
    "a night scene by {}",
    "a forest in the style of {}",
    "a study by {}",
    "a print by {}",
    "a watercolor by {}",
    "an oil painting by {}",
    "a mountain view by {}",
    "a figure painting by {}",
    "a river scene by {}",
    "a cafe interior by {}",
    "a garden in the style of {}",
    "a masterpiece by {}",
]


def templates_for(concept_type: str) -> list[str]:
    if concept_type not in CONCEPT_TYPES:
        raise ValueError(f"unknown concept type {concept_type!r}; choose one of {', '.join(CONCEPT_TYPES)}")
    return STYLE_TEMPLATES if concept_type == "style" else OBJECT_TEMPLATES


@dataclass(frozen=True)
class PromptPair:
    old: str  # names the concept to erase
    new: str  # the same prompt naming the mapping concept
    concept: str


def concept_prompt_pairs(
    concept: str,
    mapping: str,
    concept_type: str,
    *,
    aug_length: int = 30,
    prompt_len: int = 30,
    seed: int = 0,
    templates: Sequence[str] | None = None,
) -> list[PromptPair]:
    """aug_length (old, new) prompt pairs for one concept, drawn from its first prompt_len templates.

    User templates (``{}`` marks the concept) replace the built-in ones when given.
    """
    pool = list(templates) if templates is not None else templates_for(concept_type)
    for t in pool:
        if t.count("{}") != 1:
            raise ValueError(f"prompt template {t!r} must contain exactly one '{{}}' for the concept")
    pool = pool[: max(1, min(prompt_len, len(pool)))]
    if aug_length > len(pool):
        raise ValueError(f"aug_length = {aug_length} prompts asked for, but only {len(pool)} templates (prompt_len)")
    chosen = random.Random(f"{seed}:{concept}").sample(range(len(pool)), aug_length)
    return [PromptPair(pool[i].format(concept), pool[i].format(mapping), concept) for i in sorted(chosen)]


def align_tokens(old_ids: Sequence[int], new_ids: Sequence[int], length: int = 77) -> tuple[list[int], list[int]]:
    """Positions of the old prompt and the new prompt whose embeddings correspond.

    old_ids / new_ids are unpadded token ids (with start and end tokens). The common prefix
    and the common suffix are aligned, then the padding positions after each sequence, up to
    ``length``; the longer sequence's padding is cut so both lists have the same length.
    """
    old_ids, new_ids = list(old_ids)[:length], list(new_ids)[:length]
    prefix = 0
    while prefix < min(len(old_ids), len(new_ids)) and old_ids[prefix] == new_ids[prefix]:
        prefix += 1
    suffix = 0
    while (suffix < min(len(old_ids), len(new_ids)) - prefix
           and old_ids[len(old_ids) - 1 - suffix] == new_ids[len(new_ids) - 1 - suffix]):
        suffix += 1
    old_pos = list(range(prefix)) + list(range(len(old_ids) - suffix, len(old_ids)))
    new_pos = list(range(prefix)) + list(range(len(new_ids) - suffix, len(new_ids)))
    pad = length - max(len(old_ids), len(new_ids))
    old_pos += list(range(len(old_ids), len(old_ids) + pad))
    new_pos += list(range(len(new_ids), len(new_ids) + pad))
    return old_pos, new_pos


def last_word_piece(ids: Sequence[int]) -> int:
    """Index of a text's last word piece in its token ids (with start and end of text): the
    token before end-of-text, where UCE, SPEED and RECE read a concept."""
    return len(ids) - 2


def concept_token_positions(old_ids: Sequence[int], new_ids: Sequence[int]) -> list[int]:
    """Positions in the old prompt of the tokens that differ from the new one (the concept's)."""
    old_pos, _ = align_tokens(old_ids, new_ids, length=len(old_ids))
    kept = set(old_pos)
    return [i for i in range(len(old_ids)) if i not in kept]
