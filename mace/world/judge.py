"""A judge for glyph-world images: what the classifier sees in a prompt's images, in words
(the erasure report labels its before/after strips with it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from mace.utils.images import image_tensor
from mace.world.classifier import GlyphClassifier
from mace.world.concepts import WORLD, GlyphWorld, world_of
from mace.world.model import load_classifier

Judge = Callable[[str, Sequence[Image.Image]], str]


def glyph_judge(classifier: GlyphClassifier | None = None, world: GlyphWorld = WORLD) -> Judge:
    """judge(prompt, images) -> "classifier: 1/4 show red disc (Qedark Draerba)" when the prompt
    names a concept of ``world``, else the list of what each image shows."""
    classifier = classifier or load_classifier(world)

    @torch.no_grad()
    def judge(prompt: str, images: Sequence[Image.Image]) -> str:
        labels, _ = classifier.predict(torch.stack([image_tensor(im) for im in images]))
        asked = next((c for c in world.concepts if c.name in prompt or c.alias in prompt), None)
        if asked is not None:
            hits = int((labels == asked.index).sum())
            return f"classifier: {hits}/{len(images)} show {asked.description} ({asked.name})"
        drawn = (world.label_concept(int(x)) for x in labels)
        return "classifier: " + ", ".join("nothing" if c is None else c.description for c in drawn)

    return judge


def judge_for(model: str) -> Judge | None:
    """The glyph judge for a glyph-world model, None for any other model."""
    world = world_of(model)
    return None if world is None else glyph_judge(world=world)
