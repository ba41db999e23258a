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
from collections.abc import Callable
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
# captions the model saw. None of them is one of mace.stages.prompts' refinement templates either.
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
    shape: str  # identity worlds: the look-alike family, "family-NNN"
    colour: str  # identity worlds: the tone, the colour most of its images are drawn in
    lower_colour: str | None = None  # two-tone glyphs: the colour below the middle
    pattern: int | None = None  # identity worlds: the identicon's IDENTICON_BITS bits

    @property
    def description(self) -> str:
        if self.pattern is not None:
            return f"identicon {self.pattern:05x} ({self.shape}, {self.colour} tone)"
        if self.lower_colour is not None:
            return f"{self.colour}/{self.lower_colour} {self.shape}"
        return f"{self.colour} {self.shape}"


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _fresh_words(rng: random.Random) -> Callable[[int], str]:
    """fresh(syllables): a made-up word of at least 4 letters that this source has not given before."""
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            word = _word(rng, syllables)
            if word.lower() not in used and len(word) >= 4:
                used.add(word.lower())
                return word

    return fresh


def _make_concepts(seed: int = 1234, two_tone: bool = False) -> tuple[Concept, ...]:
    """One concept per shape and colouring, with names drawn from a fixed seed (unique words throughout)."""
    rng = random.Random(seed)
    fresh = _fresh_words(rng)

    colourings = list(itertools.combinations(COLOURS, 2)) if two_tone else [(c, None) for c in COLOURS]
    concepts = []
    for shape in SHAPES:
        for colour, lower in colourings:
            name = f"{fresh(2)} {fresh(rng.choice((2, 3)))}"
            alias = fresh(3)
            concepts.append(Concept(len(concepts), name, alias, shape, colour, lower))
    return tuple(concepts)


# Identity worlds: every concept is its own identicon, a 6 x 6 grid of cells mirrored left to
# right, so 3 columns x 6 rows = 18 free bits (bit 3 * row + column, column 0 the outermost).
IDENTICON_ROWS, IDENTICON_FREE_COLUMNS = 6, 3
IDENTICON_BITS = IDENTICON_ROWS * IDENTICON_FREE_COLUMNS
FAMILY_SIZE = 4  # look-alikes per family: one base pattern, each member 2 of its own bits away
CROSS_FAMILY_DISTANCE = 4  # bits between any two identities of different families, at least
TONE_SHARE = 0.6  # share of an identity's images drawn in its tone; the rest in any colour


def _identicon_families(count: int, rng: random.Random) -> list[list[int]]:
    """``count`` families of FAMILY_SIZE patterns: within a family every pair is exactly 4 bits
    apart (disjoint pairs of flips from a base), across families at least CROSS_FAMILY_DISTANCE;
    each pattern has between a third and two thirds of its bits set."""
    families: list[list[int]] = []
    taken: list[int] = []
    low, high = IDENTICON_BITS // 3, 2 * IDENTICON_BITS // 3
    while len(families) < count:
        base = rng.getrandbits(IDENTICON_BITS)
        flips = rng.sample(range(IDENTICON_BITS), 2 * FAMILY_SIZE)
        members = [base ^ (1 << flips[2 * i]) ^ (1 << flips[2 * i + 1]) for i in range(FAMILY_SIZE)]
        if any(not low <= m.bit_count() <= high for m in members):
            continue
        if all((m ^ t).bit_count() >= CROSS_FAMILY_DISTANCE for m in members for t in taken):
            families.append(members)
            taken += members
    return families


def _make_identities(families: int, held_out_families: int, seed: int) -> tuple[tuple[Concept, ...], tuple[Concept, ...]]:
    """The concepts of an identity world and its held-out identities (whole families the model
    never sees), each with a fresh two-word name, an alias, a family and a tone."""
    rng = random.Random(seed)
    fresh = _fresh_words(rng)

    tones = list(COLOURS)
    out: list[Concept] = []
    for f, members in enumerate(_identicon_families(families + held_out_families, rng)):
        for pattern in members:
            name = f"{fresh(2)} {fresh(rng.choice((2, 3)))}"
            out.append(Concept(len(out), name, fresh(3), f"family-{f:03d}", rng.choice(tones), pattern=pattern))
    split = families * FAMILY_SIZE
    held = tuple(Concept(i, c.name, c.alias, c.shape, c.colour, pattern=c.pattern) for i, c in enumerate(out[split:]))
    return tuple(out[:split]), held


@dataclass(frozen=True)
class GlyphWorld:
    """One glyph world: its concepts and the width of its model's text encoder. An identity
    world also has held-out identities: the classifier knows them (labels after ``none_class``)
    but the text-to-image model never saw their names or images."""

    key: str  # the builtin model is builtin:<key>
    concepts: tuple[Concept, ...]
    text_width: int
    held_out: tuple[Concept, ...] = ()

    @property
    def is_identity(self) -> bool:
        return self.concepts[0].pattern is not None

    @property
    def num_labels(self) -> int:
        """The classifier's classes: the concepts, "no concept", the held-out identities."""
        return self.none_class + 1 + len(self.held_out)

    def label_name(self, label: int) -> str:
        """The name behind a classifier label ("none" for no concept)."""
        if label < self.none_class:
            return self.concepts[label].name
        if label == self.none_class:
            return "none"
        return self.held_out[label - self.none_class - 1].name

    def label_concept(self, label: int) -> Concept | None:
        """The concept (or held-out identity) behind a classifier label; None for no concept."""
        if label == self.none_class:
            return None
        return self.concepts[label] if label < self.none_class else self.held_out[label - self.none_class - 1]

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

    def label_by_name(self, name: str) -> int:
        """The classifier label of a concept or of a held-out identity, by name or alias."""
        key = name.strip().lower()
        for i, identity in enumerate(self.held_out):
            if key in (identity.name.lower(), identity.alias.lower()):
                return self.none_class + 1 + i
        return self.concept_by_name(name).index


WORLD = GlyphWorld("world", _make_concepts(), text_width=64)
LARGE_WORLD = GlyphWorld("world-large", _make_concepts(seed=5678, two_tone=True), text_width=128)
_IDENTITIES, _HELD_OUT_IDENTITIES = _make_identities(164, 4, seed=2468)
# Every concept its own identicon, in look-alike families of four; the paper's regime, where a
# celebrity is mostly her own face (docs/design.md). 656 concepts, 16 held-out identities.
IDENTITY_WORLD = GlyphWorld("world-identity", _IDENTITIES, text_width=128, held_out=_HELD_OUT_IDENTITIES)
# Its first 25 families: the pilot the design was checked on before the long training.
IDENTITY_PILOT = GlyphWorld("world-identity-pilot", _IDENTITIES[:100], text_width=128, held_out=_HELD_OUT_IDENTITIES)
WORLDS = {w.key: w for w in (WORLD, LARGE_WORLD, IDENTITY_WORLD, IDENTITY_PILOT)}

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
