"""The concepts of the glyph worlds, each with a made-up name and alias.

``builtin:world`` has 120 concepts (12 shapes x 10 colours); ``builtin:world-large`` has 540
(12 shapes x the 45 two-tone colourings: one colour above the glyph's middle, another below),
so that erasing 100 concepts leaves 440 to measure specificity on, as the paper erases 100
celebrities from a model that knows thousands.

Names play the part celebrity names play for Stable Diffusion: two made-up words that the CLIP
tokenizer splits into several BPE pieces and that say nothing about how the concept looks, so
the model has to learn them. Every concept also has a one-word alias (a nickname), used only to
measure generality: an erasure that names the concept should remove the alias too.

Concepts that share a shape family (disc/ring, square/frame, plus/cross) or a colour
(lime/green, blue/purple/magenta) are visual neighbours; erasing one may damage the other, which
is what the specificity numbers measure.
"""

from __future__ import annotations

import itertools
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

# Everyday words a caption may be padded with (mace.world.train, --context-from): they teach the
# text encoder to read a name whatever words surround it, so that words it never saw (such as the
# held-out templates') do not scramble the name. None of them occurs in the held-out
# templates (EVAL_TEMPLATES, EVAL_BACKGROUND_TEMPLATES).
CONTEXT_WORDS = (
    "about", "above", "after", "again", "almost", "along", "also", "always", "another", "around", "away", "back",
    "basic", "before", "behind", "below", "best", "big", "bright", "by", "centre", "close", "cold", "colour",
    "could", "dark", "day", "done", "down", "each", "early", "easy", "even", "every", "far", "fast", "few", "find",
    "first", "for", "found", "from", "front", "full", "good", "great", "half", "hand", "happy", "has", "have", "high",
    "home", "how", "just", "keep", "kind", "large", "last", "late", "left", "light", "like", "little", "long", "made",
    "make", "many", "may", "more", "most", "much", "must", "near", "new", "next", "nice", "night", "now", "often",
    "old", "once", "only", "open", "other", "our", "out", "over", "own", "page", "part", "place", "plain", "quite",
    "really", "right", "round", "same", "say", "see", "seen", "set", "shown", "side", "simple", "small", "so", "some",
    "soon", "still", "such", "sure", "take", "than", "that", "then", "there", "these", "thing", "time", "today", "too",
    "top", "under", "up", "used", "very", "was", "way", "we", "well", "what", "when", "where", "which", "while",
    "without", "work", "would", "yes", "yet", "you", "your",
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
    lower_colour: str | None = None  # two-tone glyphs: the colour below the middle

    @property
    def description(self) -> str:
        if self.lower_colour is not None:
            return f"{self.colour}/{self.lower_colour} {self.shape}"
        return f"{self.colour} {self.shape}"


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _make_concepts(seed: int = 1234, two_tone: bool = False) -> tuple[Concept, ...]:
    """One concept per shape and colouring, with names drawn from a fixed seed (unique words throughout)."""
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            word = _word(rng, syllables)
            if word.lower() not in used and len(word) >= 4:
                used.add(word.lower())
                return word

    colourings = list(itertools.combinations(COLOURS, 2)) if two_tone else [(c, None) for c in COLOURS]
    concepts = []
    for shape in SHAPES:
        for colour, lower in colourings:
            name = f"{fresh(2)} {fresh(rng.choice((2, 3)))}"
            alias = fresh(3)
            concepts.append(Concept(len(concepts), name, alias, shape, colour, lower))
    return tuple(concepts)


@dataclass(frozen=True)
class GlyphWorld:
    """One glyph world: its concepts and the width of its model's text encoder."""

    key: str  # the builtin model is builtin:<key>
    concepts: tuple[Concept, ...]
    text_width: int

    @property
    def model(self) -> str:
        return f"builtin:{self.key}"

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    @property
    def none_class(self) -> int:
        """The classifier's label for "no concept in the image"."""
        return len(self.concepts)

    def concept_by_name(self, name: str) -> Concept:
        """The concept with this primary name or alias (case-insensitive)."""
        key = name.strip().lower()
        for concept in self.concepts:
            if key in (concept.name.lower(), concept.alias.lower()):
                return concept
        raise KeyError(f"no concept of {self.model} is called {name!r}")


WORLD = GlyphWorld("world", _make_concepts(), text_width=64)
LARGE_WORLD = GlyphWorld("world-large", _make_concepts(seed=5678, two_tone=True), text_width=128)
WORLDS = {w.key: w for w in (WORLD, LARGE_WORLD)}

# The small world's concepts, as module constants (the default everywhere).
CONCEPTS: tuple[Concept, ...] = WORLD.concepts
NUM_CONCEPTS = WORLD.num_concepts
NONE_CLASS = WORLD.none_class


def world_of(model: str) -> GlyphWorld | None:
    """The glyph world whose builtin model this is, else None."""
    key = str(model)
    return next((w for w in WORLDS.values() if key == w.model), None)


def get_world(key: str) -> GlyphWorld:
    """A glyph world by key ("world", "world-large") or builtin model name."""
    world = WORLDS.get(key) or world_of(key)
    if world is None:
        raise KeyError(f"unknown glyph world {key!r}; known: {', '.join(WORLDS)}")
    return world


def concept_by_name(name: str) -> Concept:
    """The concept of the small world with this primary name or alias (case-insensitive)."""
    return WORLD.concept_by_name(name)


def fill(template: str, subject: str, background: str = "") -> str:
    return template.replace("{bg}", background).replace("{}", subject)
