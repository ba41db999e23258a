"""Closed-form refinement and multi-LoRA fusion: fast (factorised) vs paper-literal reference.

    python benchmarks/bench_closed_form.py                # 1, 10, 100 concepts both ways; 1000 fast only
    python benchmarks/bench_closed_form.py --full         # also the 1000-concept reference (hours on a CPU)
    python benchmarks/bench_closed_form.py --smoke        # tiny, to check the script

SD-1.4-shaped problem with random weights: 16 cross-attention layers (32 to_k/to_v
projections, out sizes 320/640/1280), d = 768, 30 prompts of 77 tokens per concept, rank-1
LoRAs, a preservation statistic with s = 1e-3, lam = 0.1. Both methods run the streamed
entry points the stages use (refine_weights_streamed, fuse_weights_streamed): float32 token
batches come from a generator in the stages' order (64 prompts a batch; fusion one concept at
a time), so no measurement holds all tokens. Each measurement runs in a fresh process, which
reports the call's wall time less the time spent making the random tokens, and its peak
resident memory above the baseline: the process with the weights, LoRAs and P loaded and
warmed up, just before the first batch (the kernel's peak mark is reset there). Prints a
table and writes JSON.
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

from mace.utils.atomic import write_json_atomically

SD14_OUT = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
BATCH_PROMPTS = 64  # the stages' default encoder batch
TOKENS_PER_PROMPT = 77


def _model(n: int, d: int, outs: list[int], seed: int = 0):
    """What the stages hold before any token: the projections, the n LoRAs and P."""
    import torch

    from mace.closed_form import LoraStack

    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o, d, generator=g) / d**0.5 for o in outs for _ in "kv"]
    loras = LoraStack([torch.randn(n, 1, d, generator=g) / d**0.5 for _ in weights],
                      [torch.randn(n, w.shape[0], 1, generator=g) / d**0.5 for w in weights])
    p = torch.randn(4 * d, d, generator=g)
    return weights, loras, (p.T @ p).double()


class TokenStream:
    """Random float32 token batches in the order the stages encode them, made on demand.

    Stands in for the text encoder: refinement gets aligned (old, new) batches of 64 prompts
    running across concepts (new = old plus a small perturbation); fusion gets (concept, tokens)
    batches of at most 64 of one concept's prompts. ``seconds`` is the time spent making
    tokens, which the measurement subtracts (it is the encoder's share, not the solve's).
    """

    def __init__(self, stage: str, n: int, d: int, prompts_per_concept: int, seed: int = 1):
        import torch

        self.stage, self.n, self.d, self.prompts = stage, n, d, prompts_per_concept
        self.g = torch.Generator().manual_seed(seed)
        self.seconds = 0.0

    def _randn(self, prompts: int):
        import torch

        start = time.perf_counter()
        x = torch.randn(prompts * TOKENS_PER_PROMPT, self.d, generator=self.g)
        self.seconds += time.perf_counter() - start
        return x

    def __iter__(self):
        if self.stage == "refine":
            total = self.n * self.prompts
            for first in range(0, total, BATCH_PROMPTS):
                old = self._randn(min(BATCH_PROMPTS, total - first))
                noise = self._randn(min(BATCH_PROMPTS, total - first))
                start = time.perf_counter()
                new = noise.mul_(0.05).add_(old)
                self.seconds += time.perf_counter() - start
                yield old, new
        else:
            for i in range(self.n):
                for first in range(0, self.prompts, BATCH_PROMPTS):
                    yield i, self._randn(min(BATCH_PROMPTS, self.prompts - first))


def _rss_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc, in MB (None where /proc has no such line)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux: clear_refs 5); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def run_one(stage: str, method: str, n: int, dtype_name: str, smoke: bool) -> dict:
    """One measurement, in this process: seconds of the streamed call and its memory above the
    baseline (the model, LoRAs and P loaded, warmed up, before the first token batch)."""
    import gc

    import torch

    from mace.closed_form import fuse_weights_streamed, refine_weights_streamed

    d, outs, prompts = (64, [o // 16 for o in SD14_OUT], 2) if smoke else (768, SD14_OUT, 30)
    dtype = getattr(torch, dtype_name)
    kw = dict(lam=0.1, preserve_scale=1e-3, method=method, dtype=dtype)

    def call(weights, loras, P, stream):
        if stage == "refine":
            return refine_weights_streamed(weights, stream, preserve=P, **kw)
        return fuse_weights_streamed(weights, loras, stream, preserve=P, **kw)

    # Warm up (thread pools, BLAS, first-call dispatch) on a tiny problem of the same kind.
    w0, l0, p0 = _model(2, 32, [16, 8], seed=1)
    call(w0, l0, p0, TokenStream(stage, 2, 32, 2))
    weights, loras, P = _model(n, d, outs)
    del w0, l0, p0
    gc.collect()
    baseline = _rss_mb("VmRSS")
    exact = _reset_peak()
    stream = TokenStream(stage, n, d, prompts)
    start = time.perf_counter()
    _, report = call(weights, loras, P, stream)
    seconds = time.perf_counter() - start - stream.seconds
    peak = _rss_mb("VmHWM") if exact else None
    if peak is None:  # no reset: the process's lifetime peak, an upper bound
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    above = peak - baseline if baseline is not None else None
    return {"seconds": seconds, "token_seconds": stream.seconds, "tokens": report.tokens, "peak_rss_mb": peak,
            "baseline_rss_mb": baseline, "above_baseline_mb": above,
            "peak_since": "baseline" if exact else "process start"}


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
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on the machine skews the times
    rows = []
    print(f"SD-1.4 shaped: 32 projections, d = {64 if args.smoke else 768}, {2 if args.smoke else 30} prompts x 77 tokens "
          "per concept, rank-1 LoRAs, tokens streamed in batches of 64 prompts")
    print("| stage | concepts | dtype | fast s | reference s | speedup | fast MB above baseline | "
          "reference MB above baseline |")
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
                      f"{fmt(speed, '.1f') + 'x' if speed else '-'} | {fmt(fast.get('above_baseline_mb'), '.0f')} | "
                      f"{fmt(ref.get('above_baseline_mb'), '.0f')} |", flush=True)
    out = args.out or RESULTS / f"closed_form-cpu-{os.cpu_count()}cores{'-smoke' if args.smoke else ''}.json"
    write_json_atomically(out, {
        "platform": platform.platform(), "cpus": os.cpu_count(), "load_average_at_start": load,
        "measured": "streamed token batches of 64 prompts; seconds exclude making the tokens; memory is the peak "
                    "RSS of the call above the RSS with weights, LoRAs and P loaded (above_baseline_mb)",
        "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
