"""`mace erase` on the glyph world in 1 process and in N (torchrun): seconds per stage and peak
memory per rank.

    python benchmarks/bench_erase_scaling.py                          # 10 and 100 concepts, 1 vs 2 processes
    python benchmarks/bench_erase_scaling.py --sizes 10 --processes 1 --device cuda   # one GPU

Each size erases the first n concepts of builtin:world with the settings of
configs/world_erase.yaml (mapping "a glyph"), preserving the other concepts through a domain
cache of prompts naming them (5 object templates each). Every run starts from empty folders:
the preservation cache (`mace cache`), then prepare, refine, train and fuse (`mace erase`).
N processes run under ``python -m torch.distributed.run --standalone --nproc-per-node N``; on
CUDA each rank takes its own GPU, so N may not exceed the GPUs present.

Per stage the table shows the slowest rank's seconds (ranks meet at the stage's end, so this is
the stage's wall time), the ratio of N-process to 1-process time, and the largest peak resident
memory over the ranks (the model loaded included; on CUDA the JSON adds each rank's peak GPU
memory and names any default Triton kernel that failed and fell back to torch). The runs also
check that N processes wrote the same final weights as 1 (largest relative difference over the
edited projections). On a 2-core machine two ranks share the cores that one process's threads
used: compare the ratios, not the seconds, and only from one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import RESULTS

from mace.utils.atomic import write_json_atomically

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "world_erase.yaml"
PROBE = Path(__file__).resolve().parent / "_rank_probe.py"
STAGES = ("cache", "prepare", "refine", "train", "fuse")
PRESERVE_TEMPLATES = 5


def write_config(n: int, work: Path, device: str, overrides: dict) -> tuple[Path, Path]:
    """A config erasing the world's first n concepts, and the prompt file naming the others."""
    import yaml

    from mace.config import load_config
    from mace.stages.prompts import OBJECT_TEMPLATES
    from mace.world import GENERIC_CONCEPT, WORLD

    names = [c.name for c in WORLD.concepts]
    if not 1 <= n < len(names):
        raise SystemExit(f"--sizes: each size must lie in [1, {len(names) - 1}], got {n}")
    prompts = work / "keep.txt"
    prompts.write_text("\n".join(t.format(k) for k in names[n:] for t in OBJECT_TEMPLATES[:PRESERVE_TEMPLATES]) + "\n")
    values = load_config(CONFIG, check_paths=False).to_dict()
    values.update(multi_concept=[[k, "object"] for k in names[:n]], mapping_concept=[GENERIC_CONCEPT] * n,
                  output_dir=str(work / "run"), input_data_dir=str(work / "run" / "data"),
                  final_save_path=str(work / "run" / "final"), domain_preservation_cache_path=str(work / "keep.safetensors"),
                  report_prompts=[], device=device, **overrides)
    config = work / "erase.yaml"
    config.write_text(yaml.safe_dump(values, sort_keys=False))
    return config, prompts


def launch(processes: int, args: list[str], stats: Path, threads: int) -> float:
    """Run the probe in ``processes`` ranks; the wall seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if processes == 1:
        command = [sys.executable, str(PROBE), str(stats), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   str(PROBE), str(stats), *args]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"{' '.join(args[:1])} in {processes} process(es) failed (exit {done.returncode})")
    return time.perf_counter() - start


def read_ranks(stats: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(stats.glob("rank*.json"))]


def final_difference(a: Path, b: Path) -> float:
    """Largest relative difference between two final UNets' cross-attention K/V weights."""
    from safetensors.torch import load_file

    def kv(folder: Path) -> dict:
        weights = {}
        for f in sorted((folder / "unet").glob("*.safetensors")):
            weights.update({k: v for k, v in load_file(f).items() if "attn2.to_k" in k or "attn2.to_v" in k})
        return weights

    wa, wb = kv(a), kv(b)
    if not wa or set(wa) != set(wb):
        return float("inf")
    return max(float((wa[k].double() - wb[k].double()).abs().max() / wa[k].double().abs().max().clamp_min(1e-30))
               for k in wa)


def run_size(n: int, processes: int, device: str, threads: int, overrides: dict, keep: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"erase-scaling-{n}-{processes}-"))
    config, prompts = write_config(n, work, device, overrides)
    rows: dict[str, dict] = {}
    fallbacks: dict[str, str] = {}

    def stage_row(ranks: list[dict], stage: str) -> dict:
        row = {"seconds": max(r["seconds"].get(stage, 0.0) for r in ranks), "peak_mb": [r["peak_mb"] for r in ranks]}
        if any("cuda_peak_mb" in r for r in ranks):
            row["cuda_peak_mb"] = [r.get("cuda_peak_mb") for r in ranks]
        return row

    stats = work / "stats-cache"
    wall = launch(processes, ["cache", str(prompts), str(work / "keep.safetensors"), device], stats, threads)
    ranks = read_ranks(stats)
    rows["cache"] = stage_row(ranks, "cache")
    for r in ranks:
        fallbacks.update(r.get("triton_failures", {}))
    stats = work / "stats-erase"
    wall += launch(processes, ["erase", str(config)], stats, threads)
    ranks = read_ranks(stats)
    for stage in STAGES[1:]:
        rows[stage] = stage_row(ranks, stage)
    for r in ranks:
        fallbacks.update(r.get("triton_failures", {}))
    final = work / "run" / "final"
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        target = keep / f"final-{n}-{processes}"
        if target.exists():
            import shutil

            shutil.rmtree(target)
        final.rename(target)
        final = target
    return {"concepts": n, "processes": processes, "device": device, "threads_per_rank": threads,
            "wall_seconds": round(wall, 1), "stages": rows, "triton_fallbacks": fallbacks, "final": str(final)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts; the first is the baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default: the cores divided by the ranks, at least 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config key to change")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import yaml

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    counts = [int(p) for p in args.processes.split(",") if p]
    if not counts or min(counts) < 1:
        parser.error("--processes: give positive process counts, e.g. 1,2")
    cores = os.cpu_count() or 1
    keep = Path(tempfile.mkdtemp(prefix="erase-scaling-finals-"))
    runs = []
    out = args.out or RESULTS / f"erase_scaling-{args.device}-{cores}cores.json"
    for n in sizes:
        for p in counts:
            threads = args.threads or max(1, cores // p)
            print(f"erasing {n} concepts in {p} process(es), {threads} thread(s) each ...", flush=True)
            run = run_size(n, p, args.device, threads, overrides, keep)
            base = next((r for r in runs if r["concepts"] == n and r["processes"] == counts[0]), None)
            if base is not None:
                run["final_max_rel_difference_vs_baseline"] = final_difference(Path(base["final"]), Path(run["final"]))
                for stage, row in run["stages"].items():
                    row["ratio_to_baseline"] = row["seconds"] / max(base["stages"][stage]["seconds"], 1e-9)
            runs.append(run)
            # The final models' temporary folders are for the comparison above, not for the record.
            write_json_atomically(out, {"device": args.device, "cores": cores, "config": "configs/world_erase.yaml",
                                        "overrides": overrides,
                                        "runs": [{k: v for k, v in r.items() if k != "final"} for r in runs]})
    print()
    header = f"{'n':>4} {'procs':>5} " + " ".join(f"{s:>16}" for s in STAGES) + f" {'peak MB/rank':>14} {'diff':>8}"
    print(header)
    for run in runs:
        cells = []
        for stage in STAGES:
            row = run["stages"][stage]
            ratio = f" ({row['ratio_to_baseline']:.2f}x)" if "ratio_to_baseline" in row else ""
            cells.append(f"{row['seconds']:7.1f}s{ratio:>9}")
        peak = max(max(r["peak_mb"]) for r in run["stages"].values())
        diff = run.get("final_max_rel_difference_vs_baseline")
        print(f"{run['concepts']:>4} {run['processes']:>5} " + " ".join(f"{c:>16}" for c in cells)
              + f" {peak:>14.0f} {'' if diff is None else f'{diff:.1e}':>8}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
