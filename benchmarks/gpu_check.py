"""On a CUDA machine: every op's Triton kernel against the torch reference on the GPU.

    python benchmarks/gpu_check.py        # exits non-zero on a mismatch; then run bench_kernels.py

The CPU test suite runs the Triton kernels through the interpreter; this checks the compiled
kernels (including the fp16/bf16 tensor-core paths the interpreter never takes) on odd
shapes and several dtypes.
"""

from __future__ import annotations

import math
import sys

import torch

import mace_kernels as mk

TOL = {torch.float32: 2e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def check(name, got, ref, dtype):
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    # Outputs must pair up: a missing or extra result (or None for a tensor) is a mismatch.
    worst = 0.0 if got and len(got) == len(ref) else float("inf")
    for g, r in zip(got, ref):
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


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = "cuda"
    ok = True
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, d, e, S in ((1, 7, 3, 1), (1000, 123, 17, 5), (20000, 768, 768, 100)):
            x = torch.randn(n, d, device=dev).to(dtype)
            y = torch.randn(n, e, device=dev).to(dtype)
            seg = torch.randint(0, S, (n,), device=dev)
            w = torch.rand(n, device=dev)
            for kw in ({}, {"weights": w}):
                got = mk.token_covariance(x, y, segment_ids=seg, num_segments=S, backend="triton", **kw)
                ref = mk.token_covariance(x, y, segment_ids=seg, num_segments=S, backend="torch", **kw)
                ok &= check(f"token_covariance n={n} d={d} S={S} w={bool(kw)}", got, ref, torch.float32)
        outs = [320, 5, 1280, 37]
        weights = [torch.randn(o, 768, device=dev).to(dtype) for o in outs]
        T = torch.randn(768, 768, device=dev)
        ok &= check("closed_form_edit", torch.cat(mk.closed_form_edit(weights, T, backend="triton")).float(),
                    torch.cat(mk.closed_form_edit(weights, T, backend="torch")).float(), dtype)
        for n, r in ((1, 1), (100, 4)):
            A = [torch.randn(n, r, 768, device=dev).to(dtype) for _ in outs]
            B = [torch.randn(n, o, r, device=dev).to(dtype) for o in outs]
            C = torch.randn(n, 768, 768, device=dev)
            got = mk.fuse_loras(A, B, C, base=[w.float() for w in weights], base_transform=T, backend="triton")
            ref = mk.fuse_loras(A, B, C, base=[w.float() for w in weights], base_transform=T, backend="torch")
            ok &= check(f"fuse_loras n={n} r={r}", got, ref, torch.float32)
        for K, r in ((3, 1), (64, 16)):
            seg = torch.randint(0, 80, (K,))
            seg[0] = 0
            T_ = int(seg.sum())
            x = torch.randn(T_, 768, device=dev).to(dtype).requires_grad_()
            W = torch.randn(320, 768, device=dev).to(dtype)
            A = torch.randn(K, r, 768, device=dev).to(dtype).requires_grad_()
            B = torch.randn(K, 320, r, device=dev).to(dtype).requires_grad_()
            grads = {}
            for backend in ("triton", "torch"):
                out = mk.lora_apply(x, W, A, B, seg, scale=0.5, backend=backend)
                gx, ga, gb = torch.autograd.grad(out.float().sum(), (x, A, B))
                grads[backend] = [out, gx, ga, gb]
            ok &= check(f"lora_apply fwd+bwd K={K} r={r}", grads["triton"], grads["torch"], dtype)
    for dtype in (torch.float64, torch.float32):
        X = torch.randn(3, 1600, 768, device=dev, dtype=dtype)
        M = X.mT @ X / 1600 + 0.1 * torch.eye(768, device=dev, dtype=dtype)
        R = torch.randn(3, 24960, 768, device=dev, dtype=dtype)
        got = mk.spd_solve(M, R, backend="triton")
        res = float((got @ M - R).norm() / R.norm())
        good = res < (1e-10 if dtype == torch.float64 else 1e-4)
        print(f"{'ok ' if good else 'BAD'} spd_solve batch=3 d=768 m=24960 {dtype} residual {res:.2e}")
        ok &= good
    ok &= check_streamed_stages(dev)
    print("all ok" if ok else "MISMATCHES")
    return 0 if ok else 1


def check_streamed_stages(dev: str) -> bool:
    """The closed-form stages as mace erase runs them on a GPU: tokens from the text encoder on
    the GPU, projection weights on the CPU (mace.models.edit_projections). Their statistics
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
            ref, _ = refine_weights_streamed(weights, zip(old, new), **kw)
            got, _ = refine_weights_streamed(weights, [(a.to(dev), b.to(dev)) for a, b in zip(old, new)], **kw)
            ok &= check(f"refinement, tokens on {dev} ({method}, {dtype})", got, ref, torch.float32)
            ref, _ = fuse_weights_streamed(weights, stack, concept_tokens, **kw, group=2)
            got, _ = fuse_weights_streamed(weights, stack, [(i, t.to(dev)) for i, t in concept_tokens], **kw, group=2)
            ok &= check(f"fusion, tokens on {dev} ({method}, {dtype})", got, ref, torch.float32)
    return ok


if __name__ == "__main__":
    sys.exit(main())
