"""MACE at Stable Diffusion 1.4's real shapes: time and peak memory of each stage a user runs.

    python benchmarks/bench_real_shapes.py                      # builtin:sd14-shapes, CPU, fp32
    python benchmarks/bench_real_shapes.py --device cuda --mixed-precision fp16

``builtin:sd14-shapes`` is SD 1.4's published architecture with random weights (860M UNet with
16 cross-attention layers at 64 x 64 latents, the 4-level VAE at 512 px, CLIP ViT-L/14's
12-layer text encoder, 77 tokens, PNDM). Random weights draw noise, so this measures cost, not
quality. The run, each step in a fresh process (its own peak RSS):

1. ``load``: the pipeline loaded and nothing else (the memory every later step starts from);
2. ``cache``: ``mace cache`` of ``--prompts`` COCO-style captions (made up here: subject,
   action, place);
3. ``mace erase`` of ``--concepts`` concepts, one process per stage: ``prepare`` generates
   ``--images`` images per concept at ``--generation-steps`` steps and their cross-attention
   masks (the 64 x 64 attention-map recording), ``refine`` (with the cache), ``train``
   (``--train-steps`` LoRA steps per concept), ``fuse``, ``report`` (its defaults: the
   erased and kept prompts, 2 images each, at min(10, generation steps) steps);
4. with ``--checkpointing-variant``, ``train`` again with gradient checkpointing switched.

Each stage's seconds are the stage's own (from the run's summary, model loading excluded), peak
RSS is the process's. From the measured unit costs (per caption, per image and sampling step,
per concept, per LoRA step) the JSON and table project a 100-concept run with the original's
settings: 8 images of 30 steps per concept, 50 LoRA steps, the original's COCO cache of
616,800 captions, and the report at its defaults (at most 8 of the erased concepts and 3 kept
prompts, 2 images each, before and after, at its default steps); the benchmark's own report
shows its concepts and one kept prompt, 1 image each. Concept-linear projections count the whole stage time as per-concept cost,
so they are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS  # noqa: E402

STAGES = ("prepare", "refine", "train", "fuse", "report")
ORIGINAL = {"images": 8, "generation_steps": 30, "train_steps": 50, "coco_captions": 616_800}

SUBJECTS = ["a man", "a woman", "two children", "a dog", "a cat", "a group of people", "an old bus", "a red car",
            "a young boy", "a girl", "a horse", "a train", "a small bird", "a surfer", "a skier", "a chef",
            "a baseball player", "a brown bear", "a motorcycle", "a giraffe"]
ACTIONS = ["standing", "sitting", "walking", "riding a bike", "holding an umbrella", "eating a sandwich",
           "looking at a phone", "playing frisbee", "waiting", "parked", "running", "lying down", "flying a kite",
           "carrying a bag", "crossing the street"]
PLACES = ["on a city street", "in a kitchen", "next to a river", "in a grassy field", "on the beach",
          "at a train station", "in a living room", "near a fence", "under a tree", "in the snow",
          "beside a building", "on a wooden table", "in a parking lot", "at the park", "on a bridge"]


def coco_style_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct made-up captions in the style of COCO's (subject, action, place)."""
    combos = [f"{s} {a} {p}" for s in SUBJECTS for a in ACTIONS for p in PLACES]
    if n > len(combos):
        raise SystemExit(f"--prompts: at most {len(combos)} distinct captions")
    random.Random(seed).shuffle(combos)
    return [c[0].upper() + c[1:] + "." for c in combos[:n]]


def erase_config(args, work: Path, cache: Path) -> dict:
    names = [f"concept{i} person{i}" for i in range(args.concepts)]
    config = {
        "multi_concept": [[[name, "celebrity"] for name in names]],
        "mapping_concept": ["a person"] * len(names),
        "pretrained_model_name_or_path": args.model, "device": args.device,
        "lamb": 0.1, "train_preserve_scale": 1e-4, "fuse_preserve_scale": 1e-4, "preserve_weight": 1.0,
        "domain_preservation_cache_path": str(cache),
        "aug_length": 30, "prompt_len": 30, "rank": 1, "learning_rate": 1e-4, "train_batch_size": 1,
        "max_train_steps": args.train_steps, "concepts_per_batch": 1,
        "num_images_per_concept": args.images, "generation_steps": args.generation_steps, "sample_batch_size": 1,
        "report_images": 1, "report_prompts": ["a photo of a dog"],
        "use_gsam_mask": True, "mask_method": "attention", "gradient_checkpointing": args.gradient_checkpointing,
        "input_data_dir": str(work / "data"), "output_dir": str(work / "run"), "final_save_path": str(work / "final"),
        "seed": 0,
    }
    if args.mixed_precision:
        config["mixed_precision"] = args.mixed_precision
    return {"MACE": config}


def probe(kind: str, rest: list[str]) -> int:
    """One measured step in this (fresh) process; prints a JSON line with seconds and peak RSS."""
    import torch

    record: dict = {}
    if kind == "load":
        from mace.pipelines.loading import load_pipeline

        start = time.perf_counter()
        load_pipeline(rest[0], device=rest[1])
        record["seconds"] = time.perf_counter() - start
    elif kind == "cache":
        from mace.pipelines.loading import load_pipeline
        from mace.stages.cache import build_preservation_cache, read_prompt_file

        model, prompts, out, device = rest
        pipe = load_pipeline(model, device=device)
        start = time.perf_counter()
        build_preservation_cache(pipe, read_prompt_file(prompts), out, model_id=model, progress=False)
        record["seconds"] = time.perf_counter() - start
    elif kind == "erase":
        from mace.config import load_config
        from mace.erase import erase

        config, stage = rest
        summary = erase(load_config(config), (stage,), progress=False)
        record["seconds"] = dict(summary.seconds).get(stage, 0.0)
    else:
        raise SystemExit(f"unknown probe {kind!r}")
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if torch.cuda.is_available():
        record["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print("PROBE " + json.dumps(record), flush=True)
    return 0


def run_probe(kind: str, *rest: str) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--probe", kind, *rest], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"{kind} {' '.join(rest[-1:])}: failed ({done.returncode}): {tail[0]}")
    record = json.loads(lines[-1][len("PROBE "):])
    record["process_seconds"] = round(time.perf_counter() - start, 1)
    record["seconds"] = round(record["seconds"], 2)
    return record


def projection(args, steps: dict) -> dict:
    """Seconds of a 100-concept run with the original's settings, from the measured unit costs."""
    n = 100
    per_caption = steps["cache"]["seconds"] / args.prompts
    per_image_step = steps["prepare"]["seconds"] / (args.concepts * args.images * args.generation_steps)
    per_lora_step = steps["train"]["seconds"] / (args.concepts * args.train_steps)
    out = {
        "cache_coco": per_caption * ORIGINAL["coco_captions"],
        "prepare": per_image_step * n * ORIGINAL["images"] * ORIGINAL["generation_steps"],
        "refine": steps["refine"]["seconds"] / args.concepts * n,
        "train": per_lora_step * n * ORIGINAL["train_steps"],
        "fuse": steps["fuse"]["seconds"] / args.concepts * n,
    }
    if "report" in steps:  # bounded: the same shown concepts and images whatever the count
        from mace.config import MACEConfig
        from mace.evaluation.report import REPORT_STEPS

        defaults = MACEConfig()
        per_image_step = steps["report"]["seconds"] / (steps["report"]["images"] * min(REPORT_STEPS, args.generation_steps))
        shown = min(n, defaults.report_max_concepts) + 3  # 3 kept prompts by default
        steps_then = min(REPORT_STEPS, ORIGINAL["generation_steps"])
        out["report"] = per_image_step * 2 * shown * defaults.report_images * steps_then
    out = {k: round(v, 1) for k, v in out.items()}
    out["total_without_cache"] = round(sum(v for k, v in out.items() if k != "cache_coco"), 1)
    if "report" in out:
        out["report_share_of_total"] = round(out["report"] / out["total_without_cache"], 4)
    out["unit_costs"] = {"cache_seconds_per_caption": round(per_caption, 5),
                         "prepare_seconds_per_image_step": round(per_image_step, 3),
                         "train_seconds_per_lora_step": round(per_lora_step, 3)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:sd14-shapes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=1000, help="COCO-style captions in the cache")
    parser.add_argument("--concepts", type=int, default=2)
    parser.add_argument("--images", type=int, default=1, help="images generated per concept")
    parser.add_argument("--generation-steps", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=4, help="LoRA steps per concept")
    parser.add_argument("--mixed-precision", choices=["fp16", "bf16"], default=None)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--checkpointing-variant", action="store_true",
                        help="afterwards, train again with gradient checkpointing switched (its time and memory)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="JSON (default: benchmarks/results/real_shapes-<model>-<device>.json)")
    parser.add_argument("--probe", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe[0], args.probe[1:])

    from mace.pipelines.builtin import builtin_model_path
    from mace.utils.atomic import write_json_atomically, write_text_atomically

    stages = [s for s in args.stages.split(",") if s]
    work = Path(args.work or tempfile.mkdtemp(prefix="real-shapes-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.model.startswith("builtin:"):
        builtin_model_path(args.model)  # built and saved once, outside the measured steps
    build_seconds = round(time.perf_counter() - start, 1)
    prompts = work / "coco_style.txt"
    write_text_atomically(prompts, "\n".join(coco_style_prompts(args.prompts)) + "\n")
    config = work / "erase.yaml"
    cache = work / "coco_style.safetensors"
    write_text_atomically(config, json.dumps(erase_config(args, work, cache), indent=1))  # YAML reads JSON

    steps: dict = {}
    load_average_start = list(os.getloadavg())
    steps["load"] = run_probe("load", args.model, args.device)
    print(f"load: {steps['load']['seconds']:.1f} s, peak RSS {steps['load']['peak_rss_mb']:.0f} MB", flush=True)
    steps["cache"] = run_probe("cache", args.model, str(prompts), str(cache), args.device)
    print(f"cache of {args.prompts} captions: {steps['cache']['seconds']:.1f} s, peak RSS "
          f"{steps['cache']['peak_rss_mb']:.0f} MB", flush=True)
    for stage in stages:
        steps[stage] = run_probe("erase", str(config), stage)
        if stage == "report":  # before and after, each shown prompt, report_images each
            steps[stage]["images"] = 2 * (args.concepts + 1)
        print(f"{stage}: {steps[stage]['seconds']:.1f} s, peak RSS {steps[stage]['peak_rss_mb']:.0f} MB", flush=True)

    if args.checkpointing_variant and "train" in steps:
        variant = erase_config(args, work, cache)
        variant["MACE"]["gradient_checkpointing"] = not args.gradient_checkpointing
        other = work / "erase-checkpointing.yaml"
        write_text_atomically(other, json.dumps(variant, indent=1))
        shutil.rmtree(work / "run" / "lora")  # this run's own LoRAs: trained again under the variant
        name = f"train (gradient checkpointing {'off' if args.gradient_checkpointing else 'on'})"
        steps[name] = run_probe("erase", str(other), "train")
        print(f"{name}: {steps[name]['seconds']:.1f} s, peak RSS {steps[name]['peak_rss_mb']:.0f} MB", flush=True)

    rows = [{"step": k, **v} for k, v in steps.items()]
    result = {
        "benchmark": "real_shapes", "model": args.model, "device": args.device,
        "mixed_precision": args.mixed_precision or "fp32", "gradient_checkpointing": args.gradient_checkpointing,
        "prompts": args.prompts, "concepts": args.concepts, "images_per_concept": args.images,
        "generation_steps": args.generation_steps, "train_steps": args.train_steps,
        "build_seconds": build_seconds, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "load_average_start": load_average_start, "load_average_end": list(os.getloadavg()), "steps": rows,
        "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
    }
    if {"cache", "prepare", "refine", "train", "fuse"} <= set(steps):
        result["projected_100_concepts_seconds"] = projection(args, steps)
    name = f"real_shapes-{args.model.removeprefix('builtin:')}-{args.device}"
    if args.mixed_precision:
        name += f"-{args.mixed_precision}"
    out = Path(args.out) if args.out else RESULTS / f"{name}-{os.cpu_count()}cores.json"
    write_json_atomically(out, result)
    print("\n| step | seconds | peak RSS MB |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    if "projected_100_concepts_seconds" in result:
        print("projected 100 concepts (s):", json.dumps(result["projected_100_concepts_seconds"]))
    print(f"real shapes: {len(rows)} steps, max peak RSS {result['max_peak_rss_mb']:.0f} MB -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
