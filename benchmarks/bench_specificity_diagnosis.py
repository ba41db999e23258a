"""Where MACE's damage to kept concepts comes from, stage by stage and token by token.

    python benchmarks/bench_specificity_diagnosis.py                       # 10 concepts of builtin:world
    python benchmarks/bench_specificity_diagnosis.py --erase 100 --variants original,lp=10

Everything here uses the tuning sets of bench_erasure_quality.py's protocol (its tuning erase
set of --erase concepts, its tuning kept set), never the report sets. One erasure, preserving
every concept not erased through the domain cache, is run per variant, sharing the generated
images. A variant is "original" or "+"-joined changes to it:

- ``names-only``: the loss on the concept-name tokens alone (``use_pooler: false``);
- ``concept-tokens``: fusion maps only the name and later positions (``fusion_tokens: concept``);
- ``lp=X``: the LoRA loss also penalises the LoRA's change to the preserved tokens
  (``lora_preserve_scale: X``).

For each variant the models compared are: the refined model; refined + every LoRA added
(no fusion); the fused model; and the fusion of zero LoRAs (what fusion does by itself). Each
is evaluated on a tuning set of kept concepts (Acc_e, Acc_g, Acc_s, H_o) and measured where it
changes the cross-attention keys and values: the relative change ||W e - W0 e|| / ||W0 e|| on
the tokens of kept prompts, split into the start token, the template words, the concept name
and the end-of-text/padding positions. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _results import RESULTS
from bench_erasure_quality import PRESERVE_TEMPLATES, protocol_config, split_concepts

from mace.utils.atomic import write_json_atomically

os.environ.setdefault("HF_HUB_OFFLINE", "1")

def variant_settings(variant: str) -> dict:
    """Config changes of a variant ("original", or "+"-joined names-only, concept-tokens, lp=X)."""
    out: dict = {}
    for part in variant.split("+"):
        if part == "original":
            continue
        if part == "names-only":
            out["use_pooler"] = False
        elif part == "concept-tokens":
            out["fusion_tokens"] = "concept"
        elif part == "name-tokens":
            out["fusion_tokens"] = "name"
        elif part.startswith("lp="):
            out["lora_preserve_scale"] = float(part[3:])
        else:
            raise SystemExit(f"unknown variant part {part!r} in {variant!r}")
    return out
GROUPS = ("start", "template", "name", "end/pad")


def token_groups(tokenizer, prompts: list[str], names: list[str]):
    """(B, 77) int tensor: 0 start, 1 template word, 2 concept name, 3 end-of-text or padding."""
    import torch

    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    groups = torch.full((len(prompts), tokenizer.model_max_length), 1)
    for b, (seq, name) in enumerate(zip(ids, names, strict=True)):
        groups[b, 0] = 0
        piece = tokenizer(name, add_special_tokens=False).input_ids
        for i in range(len(seq) - len(piece) + 1):
            if seq[i:i + len(piece)] == piece:
                groups[b, i:i + len(piece)] = 2
        groups[b] = torch.where(torch.tensor(seq) == tokenizer.eos_token_id, 3, groups[b])
    return groups


def key_value_change(weights, original, embeddings, groups) -> dict[str, float]:
    """Mean relative change of the projections' outputs per token group (all layers together)."""
    import torch

    e = embeddings.reshape(-1, embeddings.shape[-1]).double()
    g = groups.reshape(-1)
    out = {}
    for k, name in enumerate(GROUPS):
        rows = e[g == k]
        ratios = [((rows @ (w.double() - w0.double()).T).norm(dim=1) / (rows @ w0.double().T).norm(dim=1).clamp_min(1e-12)).mean()
                  for w, w0 in zip(weights, original, strict=True)]
        out[name] = round(float(torch.stack(ratios).mean()), 4)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="world")
    parser.add_argument("--erase", type=int, default=10)
    parser.add_argument("--tuning-kept", type=int, default=10, help="as bench_erasure_quality.py's --tuning-kept")
    parser.add_argument("--report-kept", type=int, default=10, help="as bench_erasure_quality.py's --report-kept")
    parser.add_argument("--variants", default="original,names-only,concept-tokens,lp=10")
    parser.add_argument("--preserve-scale", type=float, default=2.0, help="train/fuse_preserve_scale")
    parser.add_argument("--lora-steps", type=int, default=40)
    parser.add_argument("--images-per-concept", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("outputs/diagnosis"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    import mace
    from mace.config import config_from_dict
    from mace.erase import concept_pairs, erase
    from mace.pipelines.components import cross_attention_projections, encode_prompts, projection_weights, set_projection_weights
    from mace.pipelines.lora_io import read_lora
    from mace.stages.fusion import FusionSettings, from_name_on, fuse
    from mace.stages.lora_training import lora_dir
    from mace.stages.prompts import OBJECT_TEMPLATES
    from mace.world import EVAL_TEMPLATES, GENERIC_CONCEPT, get_world, load_classifier
    from mace.world.concepts import fill
    from mace.world.evaluate import evaluate_world

    world = get_world(args.world)
    split = split_concepts(world, args.tuning_kept, args.report_kept)
    erased, kept = split.erased(args.erase, "tuning"), split.tuning_kept
    names = [world.concepts[c].name for c in erased]
    preserved = [c.name for c in world.concepts if c.index not in set(erased)]
    work = args.work / f"{world.key}-{args.erase}-tuning"
    work.mkdir(parents=True, exist_ok=True)
    base_pipe = mace.load_pipeline(world.model)
    cache = work / "domain.safetensors"
    if not cache.exists():
        prompts = [t.format(n) for n in preserved for t in OBJECT_TEMPLATES[:PRESERVE_TEMPLATES]]
        mace.build_preservation_cache(base_pipe, prompts, cache, model_id=world.model, progress=False)

    projections = cross_attention_projections(base_pipe.unet)
    layer_names = [n for n, _ in projections]
    original = [w.clone() for w in projection_weights(base_pipe.unet)]
    kept_prompts = [fill(EVAL_TEMPLATES[i % len(EVAL_TEMPLATES)], world.concepts[c].name) for c in kept for i in range(5)]
    kept_names = [world.concepts[c].name for c in kept for _ in range(5)]
    kept_embeddings = encode_prompts(base_pipe, kept_prompts)
    kept_groups = token_groups(base_pipe.tokenizer, kept_prompts, kept_names)
    classifier = load_classifier(world)

    def measure(label: str, variant: str, weights) -> dict:
        set_projection_weights(base_pipe.unet, weights)
        scores = evaluate_world(base_pipe, erased, kept, classifier=classifier, images_per_concept=args.images_per_concept,
                                background_images=0, progress=False, world=world)
        change = key_value_change(weights, original, kept_embeddings, kept_groups)
        row = {"variant": variant, "model": label, **{k: round(getattr(scores, k), 4) for k in ("acc_e", "acc_g", "acc_s", "h_o")},
               "kv_change_on_kept": change}
        print(f"{variant:10s} {label:22s} {scores.line()}  change: " + ", ".join(f"{k} {v:.3f}" for k, v in change.items()), flush=True)
        return row

    rows = []
    for variant in [v for v in args.variants.split(",") if v]:
        start = time.perf_counter()
        base = protocol_config().to_dict()
        base.update(multi_concept=[[n, "object"] for n in names], mapping_concept=[GENERIC_CONCEPT] * len(names),
                    pretrained_model_name_or_path=world.model, output_dir=str(work / variant),
                    input_data_dir=str(work / "data"), final_save_path=str(work / variant / "final"),
                    domain_preservation_cache_path=str(cache), preserve_weight=1.0,
                    train_preserve_scale=args.preserve_scale, fuse_preserve_scale=args.preserve_scale,
                    max_train_steps=args.lora_steps, **variant_settings(variant))
        config = config_from_dict(base)
        summary = erase(config, ("prepare", "refine", "train", "fuse"), progress=False)
        print(f"{variant}: {summary.line()} ({time.perf_counter() - start:.0f} s)", flush=True)
        refined = projection_weights(mace.load_pipeline(summary.refined_model).unet)
        fused = projection_weights(mace.load_pipeline(summary.final_model).unet)
        loras = [read_lora(lora_dir(work / variant, n), layer_names) for n in names]
        pairs = concept_pairs(config)
        summed = [w.clone() for w in refined]
        for lora in loras:
            for k, name in enumerate(layer_names):
                if name in lora:
                    A, B = lora[name]
                    summed[k] += B.float() @ A.float()
        set_projection_weights(base_pipe.unet, refined)
        zero = {n: {name: (A, torch.zeros_like(B)) for name, (A, B) in lora.items()} for n, lora in zip(names, loras, strict=True)}
        settings = FusionSettings.from_config(config)
        fuse(base_pipe, zero, {n: [p.old for p in pairs[n]] for n in names}, lam=settings.lam,
             preserve=settings.preserve.matrix(base_pipe), preserve_scale=settings.preserve_scale, original=original,
             preserve_per_token=settings.preserve_per_token,
             tokens=settings.tokens)
        zero_fused = [w.clone() for w in projection_weights(base_pipe.unet)]
        # How specific each LoRA is: its relative change on its own concept's tokens (the name
        # and after, in its training prompts) over its relative change on the kept prompts' tokens.
        ratios = []
        for n, lora in zip(names, loras, strict=True):
            own_prompts = [p.old for p in pairs[n]]
            own = encode_prompts(base_pipe, own_prompts)[from_name_on(base_pipe.tokenizer, own_prompts, n)]
            single = [w + (B.float() @ A.float() if name in lora else 0) for w, name, (A, B) in
                      zip(refined, layer_names, (lora.get(name, (None, None)) for name in layer_names), strict=True)]
            on_own = key_value_change(single, refined, own[None], torch.full((1, own.shape[0]), 3))["end/pad"]
            on_kept = key_value_change(single, refined, kept_embeddings, torch.full(kept_groups.shape, 3))["end/pad"]
            ratios.append(on_own / max(on_kept, 1e-12))
        specificity = {"mean_own_over_kept_change": round(sum(ratios) / len(ratios), 3)}
        print(f"{variant}: each LoRA changes its own tokens {specificity['mean_own_over_kept_change']:.2f}x as much as "
              "the kept prompts' tokens (mean over concepts)", flush=True)
        rows.append({"variant": variant, "model": "LoRA specificity", **specificity})
        for label, weights in (("refined", refined), ("refined + sum of LoRAs", summed), ("fused (MACE)", fused),
                               ("fusion of zero LoRAs", zero_fused)):
            rows.append(measure(label, variant, weights))

    out = args.out or RESULTS / f"specificity_diagnosis-{world.key}-{args.erase}-cpu-{os.cpu_count()}cores.json"
    write_json_atomically(out, {"model": world.model, "erased": names, "kept": [world.concepts[c].name for c in kept],
                                "preserve_scale": args.preserve_scale, "lora_steps": args.lora_steps,
                                "images_per_concept": args.images_per_concept, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
