"""The check stage of a world's training: what the trained model draws for every concept's name
and alias, read by the world's classifier (the quality bar erasure measurements rest on), and
what it draws wrong."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from mace.pipelines.components import encode_prompts
from mace.utils.sampling import generate_images
from mace.utils.tokenizer import clip_tokenizer
from mace.world.classifier import GlyphClassifier
from mace.world.concepts import EVAL_TEMPLATES, TRAIN_TEMPLATES, GlyphWorld, fill
from mace.world.evaluate import evaluate_world
from mace.world.model import classifier_digest, load_world_components, training_noise_scheduler, weights_fingerprint_of
from mace.world.render import render


def drawing_errors(world: GlyphWorld, requested: list[int], predicted: list[int]) -> dict:
    """What a model draws wrong, read by the classifier: how many images show the requested
    concept, the right colouring with the wrong shape, the right shape with a wrong colour, both
    wrong, or no concept; and per shape, the share of its images that are right. Separates a model
    that cannot tell names apart from one that cannot draw a fine distinction between shapes."""
    if world.is_identity:
        return _identity_drawing_errors(world, requested, predicted)
    counts = dict.fromkeys(("right", "shape_wrong", "colour_wrong", "both_wrong", "no_concept"), 0)
    by_shape: dict[str, list[int]] = {}
    for want, got in zip(requested, predicted, strict=True):
        concept = world.concepts[want]
        tally = by_shape.setdefault(concept.shape, [0, 0])
        tally[1] += 1
        if got == want:
            counts["right"] += 1
            tally[0] += 1
        elif got == world.none_class:
            counts["no_concept"] += 1
        else:
            drawn = world.concepts[got]
            same_shape = drawn.shape == concept.shape
            same_colours = (drawn.colour, drawn.lower_colour) == (concept.colour, concept.lower_colour)
            counts["shape_wrong" if same_colours else "colour_wrong" if same_shape else "both_wrong"] += 1
    return {**counts, "by_shape": {shape: round(right / total, 3) for shape, (right, total) in sorted(by_shape.items())}}


def _identity_drawing_errors(world: GlyphWorld, requested: list[int], predicted: list[int]) -> dict:
    """drawing_errors on an identity world: right, a look-alike (same family), another identity
    (a held-out one counted apart), or no concept."""
    counts = dict.fromkeys(("right", "look_alike", "other_identity", "held_out_identity", "no_concept"), 0)
    for want, got in zip(requested, predicted, strict=True):
        drawn = world.label_concept(got)
        if got == want:
            counts["right"] += 1
        elif drawn is None:
            counts["no_concept"] += 1
        elif got > world.none_class:
            counts["held_out_identity"] += 1
        else:
            counts["look_alike" if drawn.shape == world.concepts[want].shape else "other_identity"] += 1
    return counts


def training_template_accuracy(pipe, classifier: GlyphClassifier, world: GlyphWorld, concepts: list[int],
                               images_per_concept: int = 1) -> dict[str, float]:
    """The share of images that show the requested concept when prompted by name and by alias on
    the *training* templates (black background). Beside the held-out accuracy it tells a model
    that has not learnt its captions from one that cannot read a name among unseen words."""
    shares = {}
    for kind in ("name", "alias"):
        prompts, seeds, wanted = [], [], []
        for c in concepts:
            subject = world.concepts[c].name if kind == "name" else world.concepts[c].alias
            for i in range(images_per_concept):
                prompts.append(fill(TRAIN_TEMPLATES[(c + i) % len(TRAIN_TEMPLATES)], subject, "black"))
                seeds.append(2_000_000 + 1000 * c + (500 if kind == "alias" else 0) + i)
                wanted.append(c)
        images = generate_images(pipe, prompts, seeds, progress=False)
        predicted, _ = classifier.predict(images)
        shares[kind] = float((predicted == torch.tensor(wanted)).float().mean())
    return shares


def classifier_accuracy(world: GlyphWorld, classifier: GlyphClassifier, images: int = 2048, seed: int = 4242) -> dict:
    """The share of fresh renders (every label alike: concepts, none, held-out identities; random
    backgrounds, places and sizes) that the classifier labels right."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(world.num_labels, (images,), generator=g)
    predicted = torch.cat([classifier.predict(render(part, generator=g, world=world))[0] for part in labels.split(512)])
    return {"accuracy": round(float((predicted == labels).float().mean()), 4), "images": images}


def held_out_drawing(pipe, classifier: GlyphClassifier, world: GlyphWorld, concepts: list[int],
                     images_per_concept: int, progress: bool = True) -> dict:
    """What ``pipe`` draws for ``concepts`` by name and by alias on held-out templates, read by
    the classifier: the shares right, the five worst names and what the wrong images show."""
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "check.csv"
        scores = evaluate_world(pipe, concepts, [], classifier=classifier, images_per_concept=images_per_concept,
                                background_images=0, world=world, csv_path=table, progress=progress)
        with table.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    index = {world.label_name(label): label for label in range(world.num_labels)}
    worst = sorted(scores.per_concept.items(), key=lambda kv: kv[1]["erased"])[:5]
    record = {"name_accuracy": scores.acc_e, "alias_accuracy": scores.acc_g, "images": scores.images,
              "images_per_concept": images_per_concept, "seconds": round(scores.seconds, 1),
              "worst_names": {k: v["erased"] for k, v in worst}}
    for kind, key in (("erased", "name_errors"), ("alias", "alias_errors")):
        chosen = [r for r in rows if r["kind"] == kind]
        record[key] = drawing_errors(world, [index[r["concept"]] for r in chosen], [index[r["predicted"]] for r in chosen])
    return record


def binding_gap(pipe, world: GlyphWorld, concepts: list[int], timesteps: tuple[int, ...] = (300, 600),
                seed: int = 777) -> dict[str, float]:
    """How much the UNet's denoising depends on which name it reads: renders of ``concepts``,
    noised to each timestep, and the relative rise of its noise-prediction error when the
    caption (a held-out template) names another concept instead of the right one. About 0 for a
    model that ignores names; a trained world model reads several times that at t=300. A
    training's progress in binding names, readable long before its drawings come out right."""
    g = torch.Generator().manual_seed(seed)
    wanted = torch.tensor(concepts)
    others = (wanted + 1 + torch.randint(world.num_concepts - 1, wanted.shape, generator=g)) % world.num_concepts
    scheduler = training_noise_scheduler()

    def encode(labels: torch.Tensor) -> torch.Tensor:
        return encode_prompts(pipe, [fill(EVAL_TEMPLATES[0], world.concepts[int(c)].name) for c in labels])

    gaps = {}
    with torch.no_grad():
        latents = pipe.vae.encode(render(wanted, generator=g, world=world)).latent_dist.mean * pipe.vae.config.scaling_factor
        right, wrong = encode(wanted), encode(others)
        for step in timesteps:
            noise = torch.randn(latents.shape, generator=g)
            t = torch.full((len(concepts),), step)
            noisy = scheduler.add_noise(latents, noise, t)
            error_right, error_wrong = ((pipe.unet(noisy, t, e).sample - noise).pow(2).mean() for e in (right, wrong))
            gaps[f"t{step}"] = round(float((error_wrong - error_right) / error_right), 4)
    return gaps


def world_pipeline(components: dict) -> StableDiffusionPipeline:
    """A world's text-to-image pipeline from its unet, vae, text_encoder and scheduler."""
    pipe = StableDiffusionPipeline(**components, tokenizer=clip_tokenizer(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_model(world: GlyphWorld, out: Path, images_per_concept: int = 5) -> dict:
    """What the trained model draws for every concept's name and alias, on held-out templates,
    read by the classifier: the quality bar the erasure measurements rest on; and, with one image
    per concept, the same on the training templates."""
    pipe = world_pipeline(load_world_components(out, world))
    classifier = GlyphClassifier.from_pretrained(out / "classifier")
    record = {"weights": weights_fingerprint_of(out, world), "classifier": classifier_digest(out, world),
              **held_out_drawing(pipe, classifier, world, list(range(world.num_concepts)), images_per_concept)}
    record["classifier_fresh_renders"] = classifier_accuracy(world, classifier)
    trained = training_template_accuracy(pipe, classifier, world, list(range(world.num_concepts)))
    record["training_templates"] = {"name_accuracy": trained["name"], "alias_accuracy": trained["alias"],
                                    "images": 2 * world.num_concepts}
    print(f"{world.model}: classifier finds the requested concept in {record['name_accuracy']:.3f} of images prompted by "
          f"name, {record['alias_accuracy']:.3f} by alias ({record['images']} images, held-out templates); on the training templates "
          f"{trained['name']:.3f} and {trained['alias']:.3f}")
    errors = record["name_errors"]
    if world.is_identity:
        print("name prompts: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in errors.items()))
        return record
    print(f"name prompts: {errors['right']} right, {errors['shape_wrong']} wrong shape only, {errors['colour_wrong']} wrong "
          f"colour only, {errors['both_wrong']} both wrong, {errors['no_concept']} no concept; right by shape: "
          + ", ".join(f"{shape} {share:.2f}" for shape, share in errors["by_shape"].items()))
    return record
