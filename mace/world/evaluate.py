"""The MACE evaluation protocol on the glyph world.

Images are generated with fixed seeds from prompts built on held-out templates and read by the
glyph classifier:

- Acc_e: share of images prompted with an erased concept's primary name that still show it;
- Acc_g: the same prompted with the erased concepts' aliases (generality);
- Acc_s: share of images of kept concepts that show the requested concept (specificity);
- H_o = harmonic mean of (1 - Acc_e) and Acc_s (the paper's celebrity table), and H_g the
  three-way harmonic mean with (1 - Acc_g);
- shift: Frechet distance between classifier features of images generated from prompts that
  name no concept, original model vs edited model (0 when nothing changed).

Seeds depend only on (concept, image number, kind), so two models evaluated on the same concepts
see the same noise, and the CSV of prompts and seeds can be replayed with ``mace sample``.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from mace.utils.atomic import atomic_path
from mace.utils.sampling import generate_images
from mace.world.classifier import GlyphClassifier
from mace.world.concepts import BACKGROUNDS, EVAL_BACKGROUND_TEMPLATES, EVAL_TEMPLATES, WORLD, GlyphWorld, fill
from mace.world.model import load_classifier


@dataclass(frozen=True)
class EvalPrompt:
    """One generated image: its prompt, seed, the concept it asks for and why it is there."""

    prompt: str
    seed: int
    concept: int  # the world's none_class for background prompts
    kind: str


def concept_indices(concepts: Sequence[int | str], world: GlyphWorld = WORLD) -> list[int]:
    """Concept indices from indices, primary names or aliases (unknown names are a KeyError)."""
    out = []
    for c in concepts:
        index = c if isinstance(c, int) else world.concept_by_name(c).index
        if not 0 <= index < world.num_concepts:
            raise ValueError(f"concept index {index} is outside 0..{world.num_concepts - 1}")
        out.append(index)
    return out


def evaluation_prompts(
    erased: Sequence[int], kept: Sequence[int], *, images_per_concept: int = 5, background_images: int = 4,
    world: GlyphWorld = WORLD,
) -> list[EvalPrompt]:
    """The prompts of one evaluation: names and aliases of erased concepts, names of kept ones,
    and concept-free background prompts (``background_images`` per background and template)."""
    prompts = []
    for kind, concepts in (("erased", erased), ("alias", erased), ("kept", kept)):
        for c in concepts:
            subject = world.concepts[c].alias if kind == "alias" else world.concepts[c].name
            for i in range(images_per_concept):
                template = EVAL_TEMPLATES[(c + i) % len(EVAL_TEMPLATES)]
                seed = 1000 * c + (500 if kind == "alias" else 0) + i
                prompts.append(EvalPrompt(fill(template, subject), seed, c, kind))
    for b, background in enumerate(BACKGROUNDS):
        for t, template in enumerate(EVAL_BACKGROUND_TEMPLATES):
            for i in range(background_images):
                prompts.append(EvalPrompt(fill(template, "", background), 1_000_000 + 1000 * b + 100 * t + i, world.none_class,
                                          "background"))
    return prompts


class _ClassifierFeatures(nn.Module):
    """The classifier's penultimate features of images in [0, 1], as torchmetrics' FID wants them."""

    def __init__(self, classifier: GlyphClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config["feature_dim"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images.float() * 2 - 1)[2].double()


def frechet_distance(classifier: GlyphClassifier, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Frechet distance between the classifier features of two image sets in [-1, 1] (torchmetrics FID)."""
    if len(images_a) < 2 or len(images_b) < 2:
        raise ValueError("the Frechet distance needs at least two images per set")
    metric = FrechetInceptionDistance(feature=_ClassifierFeatures(classifier.eval()), normalize=True)
    metric.update((images_a + 1) / 2, real=True)
    metric.update((images_b + 1) / 2, real=False)
    return max(0.0, float(metric.compute()))


def harmonic_mean(*values: float) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


@dataclass
class WorldScores:
    """The numbers of one evaluation (accuracies are shares in [0, 1])."""

    acc_e: float
    acc_g: float
    acc_s: float
    h_o: float
    h_g: float
    shift: float | None
    images: int
    seconds: float
    erased: list[str] = field(default_factory=list)
    per_concept: dict[str, dict[str, float]] = field(default_factory=dict)

    def line(self) -> str:
        shift = "n/a" if self.shift is None else f"{self.shift:.3f}"
        return (f"Acc_e {self.acc_e:.3f}  Acc_g {self.acc_g:.3f}  Acc_s {self.acc_s:.3f}  H_o {self.h_o:.3f}  "
                f"H_g {self.h_g:.3f}  shift {shift}  ({self.images} images, {self.seconds:.0f} s)")

    def to_dict(self) -> dict:
        return asdict(self)


def _write_csv(path: Path, prompts: Sequence[EvalPrompt], predicted: torch.Tensor, world: GlyphWorld) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["case_number", "prompt", "evaluation_seed", "concept", "kind", "predicted", "correct"])
        for i, (p, label) in enumerate(zip(prompts, predicted.tolist(), strict=True)):
            name = world.concepts[p.concept].name if p.concept != world.none_class else ""
            guess = world.label_name(label)
            writer.writerow([i, p.prompt, p.seed, name, p.kind, guess, int(label == p.concept)])


def evaluate_world(
    pipe,
    erased: Sequence[int | str],
    kept: Sequence[int | str] | None = None,
    *,
    classifier: GlyphClassifier | None = None,
    original=None,
    original_background: torch.Tensor | None = None,
    images_per_concept: int = 5,
    background_images: int = 4,
    steps: int = 20,
    guidance_scale: float = 4.0,
    batch_size: int = 128,
    csv_path: str | os.PathLike | None = None,
    progress: bool = True,
    world: GlyphWorld = WORLD,
) -> WorldScores:
    """Acc_e, Acc_g, Acc_s, H_o, H_g and the shift score of ``pipe`` after erasing ``erased``.

    ``kept`` defaults to every other concept. The shift score needs the unedited model's images
    of the background prompts: pass ``original`` (a pipeline) or ``original_background`` (its
    images, from :func:`background_images_of`), else it is None.
    """
    start = time.perf_counter()
    erased_idx = concept_indices(erased, world)
    kept_idx = [c for c in range(world.num_concepts) if c not in set(erased_idx)] if kept is None else concept_indices(kept, world)
    if set(erased_idx) & set(kept_idx):
        raise ValueError("a concept cannot be both erased and kept")
    classifier = classifier or load_classifier(world)
    prompts = evaluation_prompts(erased_idx, kept_idx, images_per_concept=images_per_concept,
                                 background_images=background_images, world=world)
    images = generate_images(pipe, [p.prompt for p in prompts], [p.seed for p in prompts], steps=steps,
                             guidance_scale=guidance_scale, batch_size=batch_size, progress=progress)
    predicted, _ = classifier.predict(images)
    targets = torch.tensor([p.concept for p in prompts])
    kinds = [p.kind for p in prompts]
    correct = predicted == targets

    def share(kind: str) -> float:
        rows = torch.tensor([k == kind for k in kinds])
        return float(correct[rows].float().mean()) if rows.any() else float("nan")

    acc_e, acc_g, acc_s = share("erased"), share("alias"), share("kept")
    per_concept: dict[str, dict[str, float]] = {}
    for kind in ("erased", "alias", "kept"):
        for c in erased_idx if kind != "kept" else kept_idx:
            rows = torch.tensor([p.kind == kind and p.concept == c for p in prompts])
            per_concept.setdefault(world.concepts[c].name, {})[kind] = float(correct[rows].float().mean())

    shift = None
    background_rows = torch.tensor([k == "background" for k in kinds])
    if background_rows.any() and (original is not None or original_background is not None):
        if original_background is None:
            original_background = background_images_of(original, background_images=background_images, steps=steps,
                                                       guidance_scale=guidance_scale, batch_size=batch_size, progress=progress)
        shift = frechet_distance(classifier, original_background, images[background_rows])
    if csv_path is not None:
        _write_csv(Path(csv_path), prompts, predicted, world)
    no_acc_e = 1 - acc_e if erased_idx else 1.0
    return WorldScores(
        acc_e=acc_e, acc_g=acc_g, acc_s=acc_s, h_o=harmonic_mean(no_acc_e, acc_s),
        h_g=harmonic_mean(no_acc_e, 1 - acc_g if erased_idx else 1.0, acc_s), shift=shift, images=len(prompts),
        seconds=time.perf_counter() - start, erased=[world.concepts[c].name for c in erased_idx], per_concept=per_concept,
    )


def background_images_of(pipe, *, background_images: int = 4, steps: int = 20, guidance_scale: float = 4.0,
                         batch_size: int = 128, progress: bool = True) -> torch.Tensor:
    """The images of the concept-free prompts that every evaluation generates (for the shift score)."""
    prompts = [p for p in evaluation_prompts([], [], background_images=background_images) if p.kind == "background"]
    return generate_images(pipe, [p.prompt for p in prompts], [p.seed for p in prompts], steps=steps,
                           guidance_scale=guidance_scale, batch_size=batch_size, progress=progress)
