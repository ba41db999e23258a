"""How much of an erased concept's text embedding the kept concepts already determine.

    python benchmarks/bench_concept_geometry.py                 # both glyph worlds, the protocol's erase sets

Every method compared in bench_erasure_quality.py edits the cross-attention key and value
projections, linear maps of the text embedding. If an erased concept's embedding e is (nearly)
a fixed combination of kept concepts' embeddings, any such edit that leaves the kept concepts'
keys and values in place leaves (nearly) as much of the erased concept's in place: erasure and
specificity then trade against each other whatever the method. This script measures that
share on the glyph worlds, whose concepts are shapes times colourings, and on the identity
worlds, whose concepts are each their own identicon (attribute_sets says which fits each gets).

For each erase set (the protocol's reported erase sets: the first n of bench_erasure_quality's
erase pool) it fits, by least squares on the embeddings of every concept not erased, the
additive model  e(concept) ~ mu + a[shape] + b[colouring]  (and, on the two-tone world, also
mu + a[shape] + b[upper colour] + c[lower colour]), then predicts each erased concept from its
shape and colouring alone. R^2 is 1 - ||e - e_pred||^2 / ||e - mu||^2 summed over the erased
concepts: the share of their embeddings' spread that the kept concepts' parts account for.
The control refits with the attributes shuffled among the concepts (same counts, no relation to
the embeddings): what the same fit finds where there is no compositional code.

Positions: the last word piece of the name and the end-of-text token (the positions a causal
text encoder has read the whole name at, which MACE's and UCE's edits act on), in a held-out
template and a training template.

With --draw the model is shown what the kept concepts determine: each erased concept's
evaluation prompts (mace.world.evaluate's held-out templates and seeds) are encoded, every one
of the 77 positions is replaced by its additive prediction from the kept concepts' prompts of
the same template, and the images generated from those embeddings are classified. The share
still showing the erased concept is what an edit that changed nothing the kept concepts
determine would leave drawn (the control: the same with shuffled attributes).

With --oracle-scales it measures how far a closed-form edit of the key
and value projections gets when it is told exactly what it is scored on: it maps the tokens from
the name's last piece to the end of every evaluation prompt of the erased concepts (all five
held-out templates) onto those of the same templates naming "a glyph", preserves every token of
the report kept concepts' evaluation prompts, and is scored (mace.world.evaluate) on that same
report set at each preservation scale given. It is a bound, not a method: it sees the report
set, which no method in bench_erasure_quality.py does. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import random

import torch
from _results import RESULTS, command_line
from bench_erasure_quality import default_kept, split_concepts

from mace.utils.atomic import write_json_atomically

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEMPLATES = {"held-out": "a rendering showing {}", "training": "a photo of {}"}


def one_hot(labels: list[str]) -> torch.Tensor:
    levels = sorted(set(labels))
    out = torch.zeros(len(labels), len(levels), dtype=torch.float64)
    out[torch.arange(len(labels)), torch.tensor([levels.index(x) for x in labels])] = 1.0
    return out


def fit_parts(factors: list[list[str]]) -> int:
    """Columns of the additive model: mu and one part per level of each factor."""
    return 1 + sum(len(set(f)) for f in factors)


def shuffled(factors: list[list[str]], rng: random.Random) -> list[list[str]]:
    """The factors with the concepts' attributes permuted together (the control)."""
    order = list(range(len(factors[0])))
    rng.shuffle(order)
    return [[f[i] for i in order] for f in factors]


def additive_r2(x: torch.Tensor, factors: list[list[str]], erased: list[int], ridge: float = 1e-6) -> float:
    """R^2 of the erased rows of ``x`` predicted by mu + sum of per-level parts fitted on the others."""
    gone = set(erased)
    mu = x[[i for i in range(len(x)) if i not in gone]].mean(dim=0)
    pred = additive_prediction(x, factors, erased, ridge)
    return float(1 - ((x[erased] - pred) ** 2).sum() / ((x[erased] - mu) ** 2).sum())


def additive_prediction(x: torch.Tensor, factors: list[list[str]], erased: list[int], ridge: float = 1e-6) -> torch.Tensor:
    """The erased rows of ``x`` (N, ...) as predicted by the additive model fitted on the other rows."""
    flat = x.reshape(len(x), -1)
    design = torch.cat([torch.ones(len(x), 1, dtype=torch.float64), *(one_hot(f) for f in factors)], dim=1)
    gone = set(erased)
    kept = [i for i in range(len(x)) if i not in gone]
    a = design[kept]
    coef = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=torch.float64), a.T @ flat[kept])
    return (design[erased] @ coef).reshape(len(erased), *x.shape[1:])


def draw_predictions(pipe, world, factors: list[list[str]], erased: list[int], *, images_per_concept: int,
                     steps: int) -> dict[str, float]:
    """Share of images showing each erased concept, drawn from its own embeddings, from their additive
    prediction by the kept concepts, and from that prediction with shuffled attributes."""
    from mace.pipelines.components import encode_prompts
    from mace.world import load_classifier
    from mace.world.concepts import EVAL_TEMPLATES, fill
    from mace.world.evaluate import evaluation_prompts

    classifier = load_classifier(world)
    by_template = {t: encode_prompts(pipe, [fill(t, c.name) for c in world.concepts]).double() for t in EVAL_TEMPLATES}
    negative = encode_prompts(pipe, [""])
    conditions: dict[str, dict[str, torch.Tensor]] = {"own embeddings": {t: e[erased] for t, e in by_template.items()},
                                                      "kept concepts' parts": {}, "shuffled attributes": {}}
    control = shuffled(factors, random.Random(0))
    for t, e in by_template.items():
        conditions["kept concepts' parts"][t] = additive_prediction(e, factors, erased)
        conditions["shuffled attributes"][t] = additive_prediction(e, control, erased)
    # The evaluation's own name prompts and seeds; each prompt's template says which fit it takes.
    prompts = [p for p in evaluation_prompts(erased, [], images_per_concept=images_per_concept, background_images=0,
                                             world=world) if p.kind == "erased"]
    template_of = {fill(t, world.concepts[c].name): t for c in erased for t in EVAL_TEMPLATES}
    row_of = {c: row for row, c in enumerate(erased)}
    seeds, targets = [p.seed for p in prompts], [p.concept for p in prompts]
    out = {}
    for name, table in conditions.items():
        embeds = [table[template_of[p.prompt]][row_of[p.concept]] for p in prompts]
        images = []
        for start in range(0, len(embeds), 128):
            chunk = torch.stack(embeds[start:start + 128]).float()
            generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + 128]]
            images.append(pipe(prompt_embeds=chunk, negative_prompt_embeds=negative.expand(len(chunk), -1, -1),
                               num_inference_steps=steps, guidance_scale=4.0, generator=generators,
                               output_type="pt").images.float() * 2 - 1)
        predicted, _ = classifier.predict(torch.cat(images))
        out[name] = float((predicted == torch.tensor(targets)).float().mean())
    return out


def oracle_edit_scores(world, split, n: int, scales: list[float], *, images_per_concept: int, steps: int,
                       lam: float = 0.1) -> list[dict]:
    """H_o of the closed-form edit that erases the report erase set's own evaluation prompts while
    preserving the report kept set's, at each preservation scale."""
    import mace
    import mace_kernels as mk
    from mace.closed_form import refine_weights
    from mace.methods.uce import uce_tokens
    from mace.pipelines.components import edit_projections, encode_prompts
    from mace.world import GENERIC_CONCEPT, load_classifier
    from mace.world.concepts import EVAL_TEMPLATES, fill
    from mace.world.evaluate import evaluate_world

    erased = split.erased(n, "report")
    pipe = mace.load_pipeline(world.model)
    prompts = [fill(t, world.concepts[c].name) for c in erased for t in EVAL_TEMPLATES]
    guides = [fill(t, GENERIC_CONCEPT) for c in erased for t in EVAL_TEMPLATES]
    old, new = uce_tokens(pipe, prompts, guides)
    kept_prompts = [fill(t, world.concepts[c].name) for c in split.report_kept for t in EVAL_TEMPLATES]
    kept_tokens = encode_prompts(pipe, kept_prompts).reshape(-1, old.shape[-1]).double()
    preserve, _ = mk.token_covariance(kept_tokens)
    classifier = load_classifier(world)
    rows = []
    for scale in scales:
        pipe = mace.load_pipeline(world.model)
        edit_projections(pipe.unet, lambda weights: refine_weights(weights, old.double(), new.double(), lam=lam,
                                                                   preserve=preserve, preserve_scale=scale))
        scores = evaluate_world(pipe, erased, split.report_kept, classifier=classifier, images_per_concept=images_per_concept,
                                background_images=0, steps=steps, progress=False, world=world)
        rows.append({"erased": n, "scale": scale, **{k: round(getattr(scores, k), 4) for k in ("acc_e", "acc_g", "acc_s", "h_o")}})
        print(f"oracle edit, {n} erased, preservation scale {scale:g}: {scores.line()}", flush=True)
    return rows


def attribute_sets(world) -> dict[str, list[list[str]]]:
    """The additive fits of a world, each a list of per-concept factors.

    Glyph worlds: shape + colouring (and, two-tone, shape + upper + lower colour). Identity
    worlds: the attributes identities share, family + tone (what a celebrity shares with others:
    look-alikes, hair colour), and, harsher, the identicon's 18 cells (each a two-level factor)
    + tone: what a model that drew identicons cell by cell would read off its parts.
    """
    if world.is_identity:
        from mace.world.concepts import IDENTICON_BITS

        tones = [c.colour for c in world.concepts]
        cells = [[str(c.pattern >> bit & 1) for c in world.concepts] for bit in range(IDENTICON_BITS)]
        return {"family + tone": [[c.shape for c in world.concepts], tones], "cells + tone": [*cells, tones]}
    shapes = [c.shape for c in world.concepts]
    sets = {"shape + colouring": [shapes, [c.description.split(" ")[0] for c in world.concepts]]}
    if any(c.lower_colour for c in world.concepts):
        sets["shape + upper + lower colour"] = [shapes, [c.colour for c in world.concepts],
                                                [c.lower_colour for c in world.concepts]]
    return sets


def embeddings_at(pipe, world, template: str) -> dict[str, torch.Tensor]:
    """(concepts, d) embeddings at the name's last word piece and at the end-of-text token."""
    from mace.pipelines.components import encode_prompts
    from mace.world.concepts import fill

    prompts = [fill(template, c.name) for c in world.concepts]
    emb = encode_prompts(pipe, prompts).double()
    ids = pipe.tokenizer(prompts, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
    rows = torch.arange(len(prompts))
    last = torch.tensor([len(i) - 2 for i in ids])  # the name ends the template
    return {"name's last piece": emb[rows, last], "end-of-text": emb[rows, last + 1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="world,world-large")
    parser.add_argument("--sizes", default="10,100")
    parser.add_argument("--shuffles", type=int, default=5, help="control fits with shuffled attributes (mean reported)")
    parser.add_argument("--draw", action="store_true", help="also draw from the kept concepts' parts (the UNet runs)")
    parser.add_argument("--images-per-concept", type=int, default=3, help="--draw: images per erased concept")
    parser.add_argument("--steps", type=int, default=20, help="--draw: sampling steps")
    parser.add_argument("--oracle-scales", default="", help="preservation scales of the oracle edit")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import mace
    from mace.world import get_world

    results, drawn, oracle = [], [], []
    print("| world | erased | template | position | factors | R^2 | R^2, shuffled attributes |")
    print("|---|---:|---|---|---|---:|---:|")
    for key in args.worlds.split(","):
        world = get_world(key)
        split = split_concepts(world, *default_kept(world))
        factor_sets = attribute_sets(world)
        # A size is measured only when the kept concepts outnumber the fit's parts; otherwise the
        # fit is underdetermined and says nothing.
        parts = max(fit_parts(f) for f in factor_sets.values())
        sizes = [n for n in (int(s) for s in args.sizes.split(",")) if n <= len(split.erase_pool)
                 and world.num_concepts - n > parts]
        skipped = [s for s in args.sizes.split(",") if int(s) not in sizes]
        if skipped:
            print(f"{key}: sizes {','.join(skipped)} skipped: too few kept concepts for a fit of {parts} parts")
        if not sizes:
            continue
        pipe = mace.load_pipeline(world.model)
        for template_kind, template in TEMPLATES.items():
            for position, x in embeddings_at(pipe, world, template).items():
                for n in sizes:
                    erased = split.erased(n, "report")
                    for factor_name, factors in factor_sets.items():
                        r2 = additive_r2(x, factors, erased)
                        rng = random.Random(0)
                        controls = [additive_r2(x, shuffled(factors, rng), erased) for _ in range(args.shuffles)]
                        control = sum(controls) / len(controls)
                        results.append({"world": key, "erased": n, "template": template_kind, "position": position,
                                        "factors": factor_name, "r2": round(r2, 4), "r2_shuffled": round(control, 4)})
                        print(f"| {key} | {n} | {template_kind} | {position} | {factor_name} | {r2:.3f} | {control:.3f} |",
                              flush=True)
        if args.draw:
            n = max(sizes)
            # Glyph worlds: the finest fit; identity worlds: every fit (the shared attributes and the cells).
            drawn_sets = factor_sets if world.is_identity else dict([list(factor_sets.items())[-1]])
            for factor_name, factors in drawn_sets.items():
                shares = draw_predictions(pipe, world, factors, split.erased(n, "report"),
                                          images_per_concept=args.images_per_concept, steps=args.steps)
                drawn.append({"world": key, "erased": n, "factors": factor_name, **shares})
                print(f"{key}, {n} erased, drawn from {factor_name}: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()),
                      flush=True)
        if args.oracle_scales:
            n = max(sizes)
            oracle += oracle_edit_scores(world, split, n, [float(s) for s in args.oracle_scales.split(",")],
                                         images_per_concept=args.images_per_concept, steps=args.steps)
    out = args.out or RESULTS / "concept_geometry.json"
    write_json_atomically(out, {"command": command_line(__file__, argv), "templates": TEMPLATES, "shuffles": args.shuffles, "rows": results,
                                "drawn": drawn, "oracle": oracle, "images_per_concept": args.images_per_concept,
                                "steps": args.steps})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
