"""Closed-form refinement and multi-LoRA fusion: fast (factorised) vs paper-literal reference.

    python benchmarks/bench_closed_form.py                # 1, 10, 100 concepts both ways; 1000 fast only
    python benchmarks/bench_closed_form.py --full         # also the 1000-concept reference (hours on a CPU)
    python benchmarks/bench_closed_form.py --smoke        # tiny, to check the script

SD-1.4-shaped problem with random weights: 16 cross-attention layers (32 to_k/to_v
projections, out sizes 320/640/1280), d = 768, 30 prompts of 77 tokens per concept, rank-1
LoRAs, a preservation statistic with s = 1e-3, lam = 0.1. Each measurement runs in a fresh
process, which reports its wall time and peak resident memory. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from _results import RESULTS

from mace.atomic import write_json_atomically

SD14_OUT = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3


def _problem(n: int, d: int, outs: list[int], tokens_per_concept: int, seed: int = 0, with_new: bool = False):
    import torch

    from mace.closed_form import LoraStack

    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o, d, generator=g) / d**0.5 for o in outs for _ in "kv"]
    # Token embeddings are stored in fp16 (2 bytes each), filled concept by concept into one
    # buffer, so 1000 concepts (2.3M tokens) fit in memory. ``new`` are the aligned new-prompt
    # tokens of refinement: the old ones plus a small perturbation.
    total = n * tokens_per_concept
    old = torch.empty(total, d, dtype=torch.float16)
    new = torch.empty(total, d, dtype=torch.float16) if with_new else None
    for i in range(n):
        rows = slice(i * tokens_per_concept, (i + 1) * tokens_per_concept)
        block = torch.randn(tokens_per_concept, d, generator=g)
        old[rows] = block
        if with_new:
            new[rows] = block + 0.05 * torch.randn(tokens_per_concept, d, generator=g)
    tokens = list(old.split(tokens_per_concept)) if not with_new else (old, new)
    loras = LoraStack([torch.randn(n, 1, d, generator=g) / d**0.5 for _ in weights],
                      [torch.randn(n, w.shape[0], 1, generator=g) / d**0.5 for w in weights])
    p = torch.randn(4 * d, d, generator=g)
    return weights, tokens, loras, (p.T @ p).double()


def run_one(stage: str, method: str, n: int, dtype_name: str, smoke: bool) -> dict:
    """One measurement, in this process: returns seconds and peak RSS."""
    import torch

    from mace.closed_form import fuse_weights, refine_weights

    d, outs, per = (64, [o // 16 for o in SD14_OUT], 2 * 77) if smoke else (768, SD14_OUT, 30 * 77)
    dtype = getattr(torch, dtype_name)
    # Warm up (thread pools, BLAS, first-call dispatch) on a tiny problem of the same kind.
    w0, t0, l0, p0 = _problem(2, 32, [16, 8], 20, seed=1, with_new=stage == "refine")
    if stage == "refine":
        refine_weights(w0, *t0, lam=0.1, preserve=p0, preserve_scale=1e-3, method=method, dtype=dtype)
    else:
        fuse_weights(w0, l0, t0, lam=0.1, preserve=p0, preserve_scale=1e-3, method=method, dtype=dtype)
    weights, tokens, loras, P = _problem(n, d, outs, per, with_new=stage == "refine")
    kw = dict(lam=0.1, preserve=P, preserve_scale=1e-3, method=method, dtype=dtype)
    if stage == "refine":
        start = time.perf_counter()
        refine_weights(weights, *tokens, **kw)
    else:
        start = time.perf_counter()
        fuse_weights(weights, loras, tokens, **kw)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(stage, method, n, dtype, smoke, timeout) -> dict:
    cmd = [sys.executable, __file__, "--one", f"{stage},{method},{n},{dtype}"] + (["--smoke"] if smoke else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "peak_rss_mb": None, "note": f"over {timeout} s"}
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr.strip().splitlines() or [f"killed by signal {-exc.returncode}"])[-1]
        return {"seconds": None, "peak_rss_mb": None, "note": last[:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default="1,10,100,1000")
    parser.add_argument("--stages", default="refine,fuse")
    parser.add_argument("--full", action="store_true", help="also run the reference at 1000 concepts")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        stage, method, n, dtype = args.one.split(",")
        print(json.dumps(run_one(stage, method, int(n), dtype, args.smoke)))
        return 0
    counts = [int(c) for c in args.concepts.split(",")]
    rows = []
    print(f"SD-1.4 shaped: 32 projections, d = {64 if args.smoke else 768}, 30 prompts x 77 tokens per concept, rank-1 LoRAs")
    print("| stage | concepts | dtype | fast s | reference s | speedup | fast peak MB | reference peak MB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for stage in args.stages.split(","):
        for n in counts:
            for dtype in ("float32", "float64"):
                fast = measure(stage, "fast", n, dtype, args.smoke, args.timeout)
                ref = {"seconds": None, "peak_rss_mb": None, "note": "not run (use --full)"}
                if dtype == "float32" and (n < 1000 or args.full or args.smoke):
                    ref = measure(stage, "reference", n, dtype, args.smoke, args.timeout)
                speed = fast["seconds"] and ref["seconds"] and ref["seconds"] / fast["seconds"]
                row = {"stage": stage, "concepts": n, "dtype": dtype, "fast": fast, "reference": ref, "speedup": speed}
                rows.append(row)

                def fmt(x, spec):
                    return format(x, spec) if x is not None else "-"

                print(f"| {stage} | {n} | {dtype} | {fmt(fast['seconds'], '.2f')} | {fmt(ref['seconds'], '.2f')} | "
                      f"{fmt(speed, '.1f') + 'x' if speed else '-'} | {fmt(fast['peak_rss_mb'], '.0f')} | "
                      f"{fmt(ref['peak_rss_mb'], '.0f')} |", flush=True)
    out = args.out or RESULTS / f"closed_form-cpu-{os.cpu_count()}cores{'-smoke' if args.smoke else ''}.json"
    write_json_atomically(out, {"platform": platform.platform(), "cpus": os.cpu_count(), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
