"""LoRA training throughput: k concepts per UNet batch (lora_apply) vs one concept at a time.

    python benchmarks/bench_lora_training.py            # k = 8 concepts, builtin:tiny, CPU

Runs the real training code (mace.stages.lora_training.train_concept_loras) twice on the same synthetic
prepared data (random images and masks in the original folder layout): once with all k
concepts in one batch, once with concepts_per_batch = 1. Prints concept-steps per second and
writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _results import RESULTS

from mace.utils.atomic import write_json_atomically

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    import mace
    from mace.stages.lora_training import LoraTrainingSettings, train_concept_loras
    from mace.stages.prepare import concept_folders

    pipe = mace.load_pipeline(args.model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    work = Path(tempfile.mkdtemp(prefix="mace-bench-"))
    rng = np.random.default_rng(0)
    concepts = []
    for i in range(args.concepts):
        name = f"concept number {i}"
        images, masks = concept_folders(work / "data", name)
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for j in range(4):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / f"{j}.png")
            Image.fromarray((rng.random((size, size)) > 0.5).astype(np.uint8) * 255, mode="L").save(masks / f"{j}.png")
        concepts.append((name, "object", mace.concept_prompt_pairs(name, "a thing", "object", aug_length=5)))

    common = dict(rank=1, learning_rate=1e-3, max_train_steps=args.steps, train_batch_size=1, importance_sampling=True,
                  use_pooler=True, resolution=size, seed=0)
    results = {}
    for label, per_batch in (("batched", args.concepts), ("one at a time", 1)):
        torch.manual_seed(0)
        start = time.perf_counter()
        settings = LoraTrainingSettings(**common, concepts_per_batch=per_batch)
        train_concept_loras(pipe, concepts, settings, input_data_dir=work / "data", output_dir=work / label.replace(" ", "_"),
                            progress=False)
        seconds = time.perf_counter() - start
        results[label] = {"seconds": seconds, "concept_steps_per_s": args.concepts * args.steps / seconds}
    speedup = results["batched"]["concept_steps_per_s"] / results["one at a time"]["concept_steps_per_s"]
    print(f"LoRA training on {args.model}, {args.concepts} concepts x {args.steps} steps, CPU threads {torch.get_num_threads()}")
    print("| mode | seconds | concept-steps/s |")
    print("|---|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {r['seconds']:.1f} | {r['concept_steps_per_s']:.2f} |")
    print(f"batched / one at a time: {speedup:.2f}x")
    out = args.out or RESULTS / f"lora_training-cpu-{os.cpu_count()}cores.json"
    write_json_atomically(out, {"model": args.model, "concepts": args.concepts, "steps": args.steps, "results": results,
                     "speedup": speedup})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
