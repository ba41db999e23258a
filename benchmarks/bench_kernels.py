"""Benchmark the mace_kernels ops on SD-1.4-sized problems, every backend vs the torch reference.

    python benchmarks/bench_kernels.py                 # CPU here, GPU where there is one
    python benchmarks/bench_kernels.py --full          # adds the 10^6-token and 1000-concept rows
    python benchmarks/bench_kernels.py --smoke         # tiny shapes: checks the script runs

Prints a table (op, problem, backend, time, GFLOP/s, speedup over the torch reference measured
in the same run on the same inputs) and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from _results import RESULTS

import mace_kernels as mk
from mace.utils.atomic import write_json_atomically

# SD 1.4: 16 cross-attention layers (down 320 x2, 640 x2, 1280 x2; mid 1280; up 1280 x3,
# 640 x3, 320 x3); each has to_k and to_v of out size = the block width, in = 768.
SD14_OUT = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
SD14_KV_OUT = [o for o in SD14_OUT for _ in ("to_k", "to_v")]
D = 768


@dataclass
class Row:
    op: str
    problem: str
    backend: str
    dtype: str
    ms: float
    gflops: float
    speedup: float | None  # torch reference time / this backend's time, same run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, budget_s: float, max_repeats: int) -> float:
    """Median wall time of fn in seconds: one warm-up, then repeats within a time budget."""
    fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if times[0] > budget_s:  # one long run is enough
            break
    return statistics.median(times)


def run_case(rows, op, problem, dtype, flops, make_fn, backends, device, args):
    results = {}
    for backend in backends:
        fn = make_fn(backend)
        secs = time_call(fn, device, args.budget, args.repeats)
        results[backend] = secs
    ref = results.get("torch")
    for backend, secs in results.items():
        rows.append(Row(op, problem, backend, str(dtype).replace("torch.", ""), secs * 1e3,
                        flops / secs / 1e9, (ref / secs) if ref else None))
        print(_format(rows[-1]), flush=True)


def _format(r: Row) -> str:
    speed = f"{r.speedup:7.2f}x" if r.speedup is not None else "      -"
    return f"| {r.op:<18} | {r.problem:<44} | {r.backend:<6} | {r.dtype:<8} | {r.ms:10.2f} | {r.gflops:8.1f} | {speed} |"


def bench_token_covariance(rows, device, backends, args):
    cases = [(10_000, 0, True), (100_000, 0, False), (100_000, 100, True), (100_000, 1000, False)]
    if args.full:
        cases += [(1_000_000, 0, False), (1_000_000, 1000, False)]
    if args.smoke:
        cases = [(300, 0, True), (300, 20, False)]
    d = 64 if args.smoke else D
    for n, segments, with_y in cases:
        x = torch.randn(n, d, device=device, dtype=torch.float16)
        y = torch.randn(n, d, device=device, dtype=torch.float16) if with_y else None
        seg = torch.randint(0, segments, (n,), device=device) if segments else None
        kw = dict(segment_ids=seg, num_segments=segments) if segments else {}
        flops = 2.0 * n * d * d * (2 if with_y else 1)
        problem = f"N={n:.0e} d={d} S={segments or 1}{' +y' if with_y else ''}"
        run_case(rows, "token_covariance", problem, torch.float16, flops,
                 lambda b: (lambda: mk.token_covariance(x, y, backend=b, **kw)), backends, device, args)


def bench_spd_solve(rows, device, backends, args):
    m_all = sum(SD14_KV_OUT)
    cases = [((), D, m_all, torch.float64), ((), D, m_all, torch.float32), ((16,), D, 1024, torch.float64),
             ((256,), 64, 64, torch.float64)]
    if args.smoke:
        cases = [((), 64, 100, torch.float64), ((8,), 16, 16, torch.float32)]
    for batch, d, m, dtype in cases:
        X = torch.randn(*batch, 2 * d, d, device=device, dtype=dtype)
        M = X.mT @ X / (2 * d) + 0.1 * torch.eye(d, device=device, dtype=dtype)
        R = torch.randn(*batch, m, d, device=device, dtype=dtype)
        nb = 1 if not batch else batch[0]
        flops = nb * (d**3 / 3 + 2.0 * m * d * d)
        problem = f"batch={nb} d={d} m={m}"
        run_case(rows, "spd_solve", problem, dtype, flops,
                 lambda b: (lambda: mk.spd_solve(M, R, backend=b)), backends, device, args)


def bench_closed_form_edit(rows, device, backends, args):
    outs = [o // 16 for o in SD14_KV_OUT] if args.smoke else SD14_KV_OUT
    d = 64 if args.smoke else D
    for wdtype in (torch.float32, torch.float16):
        weights = [torch.randn(o, d, device=device, dtype=wdtype) for o in outs]
        T = torch.randn(d, d, device=device, dtype=torch.float32)
        flops = 2.0 * sum(outs) * d * d
        run_case(rows, "closed_form_edit", f"{len(outs)} layers rows={sum(outs)} d={d}", wdtype, flops,
                 lambda b: (lambda: mk.closed_form_edit(weights, T, backend=b)), backends, device, args)


def bench_fuse_loras(rows, device, backends, args):
    cases = [(1, 1), (10, 1), (100, 1), (100, 16)]
    if args.full:
        cases += [(1000, 1), (1000, 4)]
    if args.smoke:
        cases = [(3, 1), (20, 2)]
    outs = [o // 16 for o in SD14_KV_OUT] if args.smoke else SD14_KV_OUT
    d = 64 if args.smoke else D
    for n, r in cases:
        A = [torch.randn(n, r, d, device=device) for _ in outs]
        B = [torch.randn(n, o, r, device=device) for o in outs]
        C = torch.randn(n, d, d, device=device)
        C = C + C.mT
        flops = 2.0 * n * len(outs) * r * d * d + 2.0 * sum(outs) * n * r * d
        run_case(rows, "fuse_loras", f"n={n} r={r} {len(outs)} layers d={d}", torch.float32, flops,
                 lambda b: (lambda: mk.fuse_loras(A, B, C, backend=b)), backends, device, args)


def bench_lora_apply(rows, device, backends, args):
    cases = [(8, 4, 320), (16, 4, 1280), (64, 16, 640), (64, 1, 320)]
    if args.smoke:
        cases = [(4, 2, 32), (16, 4, 16)]
    d_in = 64 if args.smoke else D
    tokens = 77 * (4 if args.smoke else 64)  # 64 prompts of 77 text tokens
    for K, r, d_out in cases:
        base = torch.full((K,), tokens // K, dtype=torch.int64)
        base[: tokens - int(base.sum())] += 1
        seg_lens = base
        x = torch.randn(tokens, d_in, device=device, requires_grad=True)
        W = torch.randn(d_out, d_in, device=device) / d_in**0.5
        A = (torch.randn(K, r, d_in, device=device) / d_in**0.5).requires_grad_()
        B = torch.randn(K, d_out, r, device=device).requires_grad_()
        g = torch.randn(tokens, d_out, device=device)
        fwd = 2.0 * tokens * (d_out * d_in + r * (d_in + d_out))
        problem = f"T={tokens} K={K} r={r} {d_in}->{d_out}"

        def forward(b):
            def fn():
                with torch.no_grad():
                    mk.lora_apply(x, W, A, B, seg_lens, scale=0.5, backend=b)
            return fn

        def forward_backward(b):
            def fn():
                y = mk.lora_apply(x, W, A, B, seg_lens, scale=0.5, backend=b)
                torch.autograd.backward(y, g)
            return fn

        run_case(rows, "lora_apply fwd", problem, torch.float32, fwd, forward, backends, device, args)
        run_case(rows, "lora_apply fwd+bwd", problem, torch.float32, 3 * fwd, forward_backward, backends, device, args)


def covariance_memory(backend: str, n: int, d: int) -> float:
    """Peak resident memory (MB) that one token_covariance call adds, in a fresh process.

    The input is made first; then the kernel's high-water mark is reset (Linux clear_refs)
    so the figure is what the call itself needs on top of its input and output.
    """
    code = (
        "import torch, mace_kernels as mk\n"
        "def rss(field):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(field): return int(line.split()[1]) / 1024\n"
        f"x = torch.randn({n}, {d}, dtype=torch.float16)\n"
        f"seg = torch.randint(0, 100, ({n},))\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = rss('VmRSS')\n"
        f"out = mk.token_covariance(x, segment_ids=seg, num_segments=100, backend='{backend}')\n"
        "print(rss('VmHWM') - base)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", default="token_covariance,spd_solve,closed_form_edit,fuse_loras,lora_apply")
    parser.add_argument("--full", action="store_true", help="add the largest rows (minutes on a CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script")
    parser.add_argument("--memory", action="store_true", help="also measure covariance memory at 10^6 tokens")
    parser.add_argument("--memory-only", action="store_true", help="only the memory measurement")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        backends = ["torch", "triton"]
        name = torch.cuda.get_device_name().replace(" ", "-")
    else:
        backends = ["torch", "cpp"]
        name = f"cpu-{os.cpu_count()}cores"
    available = mk.backends()
    backends = [b for b in backends if available[b]["available"]]
    print(f"device {device} ({name}), torch {torch.__version__}, backends {backends}, threads {torch.get_num_threads()}")
    print("| op                 | problem                                      | backend | dtype    |    time ms |  GFLOP/s | speedup |")
    print("|---|---|---|---|---:|---:|---:|")
    rows: list[Row] = []
    benches = {
        "token_covariance": bench_token_covariance, "spd_solve": bench_spd_solve,
        "closed_form_edit": bench_closed_form_edit, "fuse_loras": bench_fuse_loras, "lora_apply": bench_lora_apply,
    }
    for op in [] if args.memory_only else args.ops.split(","):
        benches[op](rows, device, backends, args)
    memory = {}
    if (args.memory or args.memory_only) and device.type == "cpu":
        memory = {b: covariance_memory(b, 1_000_000, D) for b in backends}
        print(f"token_covariance, 10^6 tokens x {D} fp16 (1.5 GB input), 100 segments (the fp32 output is "
              f"236 MB): peak RSS added by the call, MB: {memory}")
    suffix = "-smoke" if args.smoke else ("-memory" if args.memory_only else "")
    out = args.out or RESULTS / f"kernels-{name}{suffix}.json"
    payload = {
        "device": name, "torch": torch.__version__, "platform": platform.platform(),
        "threads": torch.get_num_threads(), "rows": [asdict(r) for r in rows], "covariance_memory_mb": memory,
    }
    write_json_atomically(out, payload)
    print(f"wrote {out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
