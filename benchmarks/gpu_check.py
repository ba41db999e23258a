"""On a CUDA machine: every op's Triton kernel against the torch reference on the GPU.

    python benchmarks/gpu_check.py        # exits non-zero on a mismatch; then run bench_kernels.py

The CPU test suite runs the Triton kernels through the interpreter; this checks the compiled
kernels (including the fp16/bf16 tensor-core paths the interpreter never takes) on odd
shapes and several dtypes. The cases are one table, :func:`kernel_cases`, which
``scripts/compile_triton_kernels.py`` also compiles for a CUDA target on a machine without a GPU.
A case that raises (a kernel that fails to compile or launch) is reported and the others still run.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

import mace_kernels as mk

TOL = {torch.float32: 2e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


@dataclass
class KernelCase:
    """One op call: ``run(backend)`` returns its outputs; triton's are compared with torch's
    at the tolerance of ``tolerance_dtype``."""

    name: str
    tolerance_dtype: torch.dtype
    run: Callable[[str], object]


def check(name, got, ref, dtype):
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    # Outputs must pair up: a missing or extra result (or None for a tensor) is a mismatch.
    worst = 0.0 if got and len(got) == len(ref) else float("inf")
    for g, r in zip(got, ref, strict=True):
        if g is None or r is None:
            if (g is None) != (r is None):
                worst = float("inf")
            continue
        if g.shape != r.shape:
            worst = float("inf")
            continue
        scale = max(float(r.abs().max()) if r.numel() else 0.0, 1.0)
        diff = float((g.double() - r.double()).abs().max()) if r.numel() else 0.0
        worst = max(worst, diff / scale if math.isfinite(diff) else float("inf"))  # NaN fails too
    ok = worst <= TOL[dtype]
    print(f"{'ok ' if ok else 'BAD'} {name:<60} {str(dtype):<15} max rel err {worst:.2e}")
    return ok


def error_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def kernel_cases(dev: str) -> Iterator[KernelCase]:
    """Every op on odd shapes and in each dtype its Triton kernel takes, inputs on ``dev``.

    float64 is what the closed-form stages accumulate in; one long segment (20000 tokens, few
    tiles) makes token_covariance split a segment's tokens over programs (fp32/fp64 atomics).
    """
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        dn = str(dtype).removeprefix("torch.")
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # the ops' accumulation dtype
        for n, d, e, S in ((1, 7, 3, 1), (1000, 123, 17, 5), (20000, 123, 17, 1), (20000, 768, 768, 100)):
            x = torch.randn(n, d, device=dev).to(dtype)
            y = torch.randn(n, e, device=dev).to(dtype)
            seg = torch.randint(0, S, (n,), device=dev)
            w = torch.rand(n, device=dev, dtype=acc)
            for kw in ({}, {"weights": w}):
                yield KernelCase(
                    f"token_covariance {dn} n={n} d={d} S={S} w={bool(kw)}", acc,
                    lambda b, x=x, y=y, seg=seg, S=S, kw=kw: mk.token_covariance(
                        x, y, segment_ids=seg, num_segments=S, backend=b, **kw),
                )
        outs = [320, 5, 1280, 37]
        weights = [torch.randn(o, 768, device=dev).to(dtype) for o in outs]
        T = torch.randn(768, 768, device=dev, dtype=acc)
        yield KernelCase(f"closed_form_edit {dn}", dtype,
                         lambda b, weights=weights, T=T: torch.cat(mk.closed_form_edit(weights, T, backend=b)).to(acc))
        for n, r in ((1, 1), (100, 4)):
            A = [torch.randn(n, r, 768, device=dev).to(dtype) for _ in outs]
            B = [torch.randn(n, o, r, device=dev).to(dtype) for o in outs]
            C = torch.randn(n, 768, 768, device=dev, dtype=acc)
            base = [w.to(acc) for w in weights]
            yield KernelCase(f"fuse_loras {dn} n={n} r={r}", acc,
                             lambda b, A=A, B=B, C=C, base=base, T=T: mk.fuse_loras(
                                 A, B, C, base=base, base_transform=T, backend=b))
        for K, r in ((3, 1), (64, 16)):
            lengths = torch.randint(0, 80, (K,))
            lengths[0] = 0  # an empty segment
            tokens = int(lengths.sum())
            x = torch.randn(tokens, 768, device=dev).to(dtype).requires_grad_()
            W = torch.randn(320, 768, device=dev).to(dtype)
            A = torch.randn(K, r, 768, device=dev).to(dtype).requires_grad_()
            B = torch.randn(K, 320, r, device=dev).to(dtype).requires_grad_()

            def lora(b, x=x, W=W, A=A, B=B, lengths=lengths):
                out = mk.lora_apply(x, W, A, B, lengths, scale=0.5, backend=b)
                return [out, *torch.autograd.grad(out.to(acc).sum(), (x, A, B))]

            yield KernelCase(f"lora_apply fwd+bwd {dn} K={K} r={r}", dtype, lora)
    for dtype in (torch.float64, torch.float32):
        X = torch.randn(3, 1600, 768, device=dev, dtype=dtype)
        M = X.mT @ X / 1600 + 0.1 * torch.eye(768, device=dev, dtype=dtype)
        R = torch.randn(3, 24960, 768, device=dev, dtype=dtype)
        yield KernelCase(f"spd_solve batch=3 d=768 m=24960 {str(dtype).removeprefix('torch.')}", dtype,
                         lambda b, M=M, R=R: mk.spd_solve(M, R, backend=b))


def run_cases(cases: Iterable[KernelCase]) -> bool:
    """Each case's triton outputs against its torch outputs, a line each; True when all agree."""
    ok = True
    for case in cases:
        try:
            ok &= check(case.name, case.run("triton"), case.run("torch"), case.tolerance_dtype)
        except Exception as exc:  # a kernel that fails must not hide the others' results
            print(f"ERR {case.name:<60} {error_line(exc)}")
            ok = False
    return ok


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = "cuda"
    ok = run_cases(kernel_cases(dev))
    ok &= check_streamed_stages(dev)
    print("all ok" if ok else "MISMATCHES")
    return 0 if ok else 1


def check_streamed_stages(dev: str) -> bool:
    """The closed-form stages as mace erase runs them on a GPU: tokens from the text encoder on
    the GPU, projection weights on the CPU (mace.pipelines.components.edit_projections). Their statistics
    follow the tokens, the solves the weights; the result must equal an all-CPU run."""
    from mace.closed_form import LoraStack, fuse_weights_streamed, refine_weights_streamed

    ok = True
    torch.manual_seed(1)
    d, outs, n, r = 96, [40, 96, 7], 5, 3
    weights = [torch.randn(o, d) for o in outs]
    preserve = (lambda e: e.T @ e)(torch.randn(300, d, dtype=torch.float64))
    old = [torch.randn(int(k), d) for k in torch.randint(1, 400, (4,))]
    new = [t + 0.1 * torch.randn_like(t) for t in old]
    stack = LoraStack([torch.randn(n, r, d) for _ in outs], [0.1 * torch.randn(n, o, r) for o in outs])
    concept_tokens = [(i % n, torch.randn(int(k), d)) for i, k in enumerate(torch.randint(1, 300, (9,)))]
    for dtype in (torch.float64, torch.float32):
        for method in ("fast", "reference"):
            kw = dict(lam=0.1, preserve=preserve, preserve_scale=2.0, method=method, dtype=dtype)
            ref, _ = refine_weights_streamed(weights, zip(old, new, strict=True), **kw)
            got, _ = refine_weights_streamed(weights, [(a.to(dev), b.to(dev)) for a, b in zip(old, new, strict=True)], **kw)
            ok &= check(f"refinement, tokens on {dev} ({method}, {dtype})", got, ref, torch.float32)
            ref, _ = fuse_weights_streamed(weights, stack, concept_tokens, **kw, group=2)
            got, _ = fuse_weights_streamed(weights, stack, [(i, t.to(dev)) for i, t in concept_tokens], **kw, group=2)
            ok &= check(f"fusion, tokens on {dev} ({method}, {dtype})", got, ref, torch.float32)
    return ok


if __name__ == "__main__":
    sys.exit(main())
