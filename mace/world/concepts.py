"""The concepts of the glyph world: 12 shapes x 10 colours, each with a made-up name and alias.

Names play the part celebrity names play for Stable Diffusion: two made-up words that the CLIP
tokenizer splits into several BPE pieces and that say nothing about how the concept looks, so
the model has to learn them. Every concept also has a one-word alias (a nickname), used only to
measure generality: an erasure that names the concept should remove the alias too.

Concepts that share a shape family (disc/ring, square/frame, plus/cross) or a colour
(lime/green, blue/purple/magenta) are visual neighbours; erasing one may damage the other, which
is what the specificity numbers measure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SHAPES = ("disc", "ring", "square", "frame", "triangle", "diamond", "plus", "cross", "star", "hexagon", "stripes", "crescent")

COLOURS = {
    "red": (0.92, 0.12, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.98, 0.92, 0.15),
    "lime": (0.62, 0.98, 0.22),
    "green": (0.10, 0.68, 0.22),
    "cyan": (0.12, 0.88, 0.92),
    "blue": (0.15, 0.35, 1.00),
    "purple": (0.58, 0.22, 0.92),
    "magenta": (1.00, 0.22, 0.78),
    "white": (0.95, 0.95, 0.95),
}

# Dark backgrounds, so every glyph colour stands out on every background.
BACKGROUNDS = {
    "black": (0.04, 0.04, 0.05),
    "navy": (0.05, 0.07, 0.28),
    "maroon": (0.30, 0.05, 0.07),
    "forest": (0.05, 0.24, 0.10),
    "grey": (0.33, 0.33, 0.35),
}

# Captions the world model is trained on. {} is a name or alias, {bg} a background word.
TRAIN_TEMPLATES = (
    "{}",
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a drawing of {}",
    "{} on a {bg} background",
    "a photo of {} on {bg}",
    "{}, centered",
    "a small picture of {}",
    "a glyph of {}",
    "{} drawn on a {bg} canvas",
    "the symbol of {}",
)

# Held out from training: generation with these measures whether names work beyond the
# captions the model saw. None of them is one of mace.prompts' refinement templates either.
EVAL_TEMPLATES = (
    "a rendering showing {}",
    "look at {} here",
    "{} in this illustration",
    "an icon depicting {}",
    "a clear view of {}",
)

# Prompts that name no concept, for the distribution-shift score.
BACKGROUND_TEMPLATES = ("an empty {bg} background", "a blank {bg} canvas", "plain {bg}")
EVAL_BACKGROUND_TEMPLATES = ("nothing but {bg}", "a {bg} backdrop with nothing on it")

# The mapping concept of an erasure: what the erased names should mean afterwards.
GENERIC_CONCEPT = "a glyph"

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "pr", "q", "r", "s", "st", "t", "tr", "v", "w", "z", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "s", "x", "m", "th", "nd", "rk")


@dataclass(frozen=True)
class Concept:
    """One concept: index, primary name, alias and what it looks like."""

    index: int
    name: str
    alias: str
    shape: str
    colour: str

    @property
    def description(self) -> str:
        return f"{self.colour} {self.shape}"


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _make_concepts(seed: int = 1234) -> tuple[Concept, ...]:
    """The 120 concepts, with names drawn from a fixed seed (unique words throughout)."""
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            word = _word(rng, syllables)
            if word.lower() not in used and len(word) >= 4:
                used.add(word.lower())
                return word

    concepts = []
    for shape in SHAPES:
        for colour in COLOURS:
            name = f"{fresh(2)} {fresh(rng.choice((2, 3)))}"
            alias = fresh(3)
            concepts.append(Concept(len(concepts), name, alias, shape, colour))
    return tuple(concepts)


CONCEPTS: tuple[Concept, ...] = _make_concepts()
NUM_CONCEPTS = len(CONCEPTS)
NONE_CLASS = NUM_CONCEPTS  # the classifier's label for "no concept in the image"


def concept_by_name(name: str) -> Concept:
    """The concept with this primary name or alias (case-insensitive)."""
    key = name.strip().lower()
    for concept in CONCEPTS:
        if key in (concept.name.lower(), concept.alias.lower()):
            return concept
    raise KeyError(f"no concept of the glyph world is called {name!r}")


def fill(template: str, subject: str, background: str = "") -> str:
    return template.replace("{bg}", background).replace("{}", subject)
