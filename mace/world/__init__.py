"""The glyph world: a procedurally rendered image domain with 120 named concepts, a small
text-to-image model trained on it (``builtin:world``) and a classifier, so that erasure
efficacy, generality and specificity can be measured on generated images without a real
Stable Diffusion. Train everything with ``python -m mace.world.train``; the weights ship with
the package.
"""

from __future__ import annotations

from .classifier import GlyphClassifier
from .concepts import (
    BACKGROUND_TEMPLATES,
    BACKGROUNDS,
    CONCEPTS,
    EVAL_BACKGROUND_TEMPLATES,
    EVAL_TEMPLATES,
    GENERIC_CONCEPT,
    NONE_CLASS,
    NUM_CONCEPTS,
    TRAIN_TEMPLATES,
    Concept,
    concept_by_name,
)
from .judge import glyph_judge, judge_for
from .model import WORLD_MODEL, load_classifier, load_world_components, weights_dir, weights_fingerprint
from .render import render

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_TEMPLATES",
    "CONCEPTS",
    "EVAL_BACKGROUND_TEMPLATES",
    "EVAL_TEMPLATES",
    "GENERIC_CONCEPT",
    "NONE_CLASS",
    "NUM_CONCEPTS",
    "TRAIN_TEMPLATES",
    "WORLD_MODEL",
    "Concept",
    "GlyphClassifier",
    "concept_by_name",
    "glyph_judge",
    "judge_for",
    "load_classifier",
    "load_world_components",
    "render",
    "weights_dir",
    "weights_fingerprint",
]
