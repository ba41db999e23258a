"""The glyph worlds: procedurally rendered image domains with named concepts (120 in
``builtin:world``, 540 in ``builtin:world-large``), a small text-to-image model trained on each
and a classifier, so that erasure efficacy, generality and specificity can be measured on
generated images without a real Stable Diffusion. Train with
``python -m mace.world.train --world KEY``; the weights ship with the package.
"""

from __future__ import annotations

from mace.world.classifier import GlyphClassifier
from mace.world.concepts import (
    BACKGROUND_TEMPLATES,
    BACKGROUNDS,
    CONCEPTS,
    EVAL_BACKGROUND_TEMPLATES,
    EVAL_TEMPLATES,
    GENERIC_CONCEPT,
    IDENTITY_PILOT,
    IDENTITY_WORLD,
    LARGE_WORLD,
    NONE_CLASS,
    NUM_CONCEPTS,
    TRAIN_TEMPLATES,
    WORLD,
    WORLDS,
    Concept,
    GlyphWorld,
    concept_by_name,
    get_world,
    world_of,
)
from mace.world.judge import glyph_judge, judge_for
from mace.world.model import WORLD_MODEL, load_classifier, load_world_components, weights_dir, weights_fingerprint
from mace.world.render import render

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_TEMPLATES",
    "CONCEPTS",
    "EVAL_BACKGROUND_TEMPLATES",
    "EVAL_TEMPLATES",
    "GENERIC_CONCEPT",
    "IDENTITY_PILOT",
    "IDENTITY_WORLD",
    "LARGE_WORLD",
    "NONE_CLASS",
    "NUM_CONCEPTS",
    "TRAIN_TEMPLATES",
    "WORLD",
    "WORLDS",
    "WORLD_MODEL",
    "Concept",
    "GlyphClassifier",
    "GlyphWorld",
    "concept_by_name",
    "get_world",
    "glyph_judge",
    "judge_for",
    "load_classifier",
    "load_world_components",
    "render",
    "weights_dir",
    "weights_fingerprint",
    "world_of",
]
