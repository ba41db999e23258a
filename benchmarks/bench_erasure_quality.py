"""Erasure quality on the glyph world: no edit, refinement only, full MACE and UCE, side by side.

    python benchmarks/bench_erasure_quality.py                 # 1, 10 and 100 concepts
    python benchmarks/bench_erasure_quality.py --sizes 1 --methods none,uce --images-per-concept 2

For each size n, the erased concepts are the first n of a fixed random order of the 120 concepts
and the kept ones the last 20 of that order (never erased at any size), so Acc_s is measured on
the same concepts throughout. MACE runs the real ``mace erase`` stages with the settings of
configs/world_erase.yaml except its preservation and LoRA steps (--lora-steps, 40); "refine" is
its closed-form stage alone; UCE is mace.uce with the same guide concept ("a glyph") and lambda.
Both preserve the concepts that are not erased, each in its own way: MACE through a domain
preservation cache of prompts naming them (weight --mace-preserve-scale in refinement and
fusion), UCE through their names' embeddings (weight --uce-preserve-scale); --no-preserve turns
preservation off for both.
Evaluation: mace.world.evaluate (fixed seeds, held-out templates). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from _results import RESULTS

from mace.atomic import write_json_atomically

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("none", "refine", "mace", "uce")
PRESERVE_TEMPLATES = 5  # MACE's preservation prompts per kept concept (its first object templates)
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "world_erase.yaml"


def concept_order(seed: int = 0) -> list[int]:
    from mace.world import NUM_CONCEPTS

    order = list(range(NUM_CONCEPTS))
    random.Random(seed).shuffle(order)
    return order


def erase_with(method: str, names: list[str], preserved: list[str], work: Path, scales: dict[str, float], lora_steps: int):
    """The edited pipeline for one method, and the seconds the edit took (preservation included)."""
    import mace
    from mace.config import config_from_dict, load_config
    from mace.erase import erase
    from mace.prompts import OBJECT_TEMPLATES
    from mace.uce import uce
    from mace.world import GENERIC_CONCEPT, WORLD_MODEL

    start = time.perf_counter()
    base = load_config(CONFIG, check_paths=False)  # its preservation cache is replaced below
    if method == "none":
        return mace.load_pipeline(WORLD_MODEL), 0.0
    if method == "uce":
        pipe = mace.load_pipeline(WORLD_MODEL)
        uce(pipe, names, GENERIC_CONCEPT, preserved, lam=base.lamb, preserve_scale=scales["uce"])
        return pipe, time.perf_counter() - start
    values = base.to_dict()
    values.update(multi_concept=[[n, "object"] for n in names], mapping_concept=[GENERIC_CONCEPT] * len(names),
                  output_dir=str(work), input_data_dir=str(work / "data"), final_save_path=str(work / "final"),
                  domain_preservation_cache_path=None, train_preserve_scale=0.0, fuse_preserve_scale=0.0,
                  max_train_steps=lora_steps)
    if preserved:  # MACE's domain preservation: a cache of prompts naming the concepts to keep
        cache = work / "domain.safetensors"
        prompts = [t.format(n) for n in preserved for t in OBJECT_TEMPLATES[:PRESERVE_TEMPLATES]]
        mace.build_preservation_cache(mace.load_pipeline(WORLD_MODEL), prompts, cache, model_id=WORLD_MODEL, progress=False)
        values.update(domain_preservation_cache_path=str(cache), preserve_weight=1.0,
                      train_preserve_scale=scales["mace"], fuse_preserve_scale=scales["mace"])
    config = config_from_dict(values)
    stages = ("refine",) if method == "refine" else ("prepare", "refine", "train", "fuse")
    summary = erase(config, stages, progress=False)
    path = summary.refined_model if method == "refine" else summary.final_model
    return mace.load_pipeline(path), time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,10,100")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--images-per-concept", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--background-images", type=int, default=16, help="per background and template (shift score)")
    parser.add_argument("--mace-preserve-scale", type=float, default=3.0, help="MACE: train/fuse_preserve_scale")
    parser.add_argument("--uce-preserve-scale", type=float, default=0.1)
    parser.add_argument("--lora-steps", type=int, default=40, help="MACE: max_train_steps per concept")
    parser.add_argument("--no-preserve", action="store_true", help="erase without preserving the other concepts")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")

    import torch

    import mace
    from mace.world import CONCEPTS, WORLD_MODEL, load_classifier
    from mace.world.evaluate import background_images_of, evaluate_world

    scales = {"mace": args.mace_preserve_scale, "uce": args.uce_preserve_scale}
    order = concept_order()
    kept = order[-20:]
    classifier = load_classifier()
    original_background = background_images_of(mace.load_pipeline(WORLD_MODEL), background_images=args.background_images,
                                               steps=args.steps, progress=False)
    rows = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        erased = order[:n]
        for method in methods:
            work = Path(tempfile.mkdtemp(prefix=f"mace-quality-{method}-{n}-"))
            try:
                torch.manual_seed(0)
                preserved = [] if args.no_preserve else [CONCEPTS[c].name for c in order[n:]]
                pipe, seconds = erase_with(method, [CONCEPTS[c].name for c in erased], preserved, work, scales, args.lora_steps)
                scores = evaluate_world(pipe, erased, kept, classifier=classifier, original_background=original_background,
                                        images_per_concept=args.images_per_concept, background_images=args.background_images,
                                        steps=args.steps, progress=False)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            row = {"concepts": n, "method": method, "edit_seconds": round(seconds, 1), "eval_seconds": round(scores.seconds, 1),
                   **{k: round(getattr(scores, k), 4) for k in ("acc_e", "acc_g", "acc_s", "h_o", "h_g", "shift")}}
            rows.append(row)
            print(f"{n:4d} {method:7s} {scores.line()}  edit {seconds:.0f} s", flush=True)

    print(f"\nErasure quality on {WORLD_MODEL} ({args.images_per_concept} images per concept and prompt kind, "
          f"{args.steps} steps, 20 kept concepts), CPU threads {torch.get_num_threads()}")
    print("| concepts | method | Acc_e | Acc_g | Acc_s | H_o | H_g | shift | edit time (s) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concepts']} | {r['method']} | {r['acc_e']:.3f} | {r['acc_g']:.3f} | {r['acc_s']:.3f} | {r['h_o']:.3f} | "
              f"{r['h_g']:.3f} | {r['shift']:.3f} | {r['edit_seconds']:.1f} |")
    out = args.out or RESULTS / f"erasure_quality-cpu-{os.cpu_count()}cores.json"
    write_json_atomically(out, {"model": WORLD_MODEL, "images_per_concept": args.images_per_concept, "steps": args.steps,
                     "preserve_scales": None if args.no_preserve else scales,
                     "kept": [CONCEPTS[c].name for c in kept], "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
