"""The closed-form steps of MACE on plain tensors: refinement and multi-LoRA fusion.

Both minimise, for every projection W_l (out_l x d) of the cross-attention layers,

    sum ||W' e - target(e)||^2 + lam ||W' - W_anchor||^2 + s sum_p ||W' e_p - W0 e_p||^2

and both depend on the text embeddings only through d x d statistics, with a left-hand
matrix M shared by every layer. The fast path exploits that (docs/design.md, section 2):

    refinement  W'_l = W_l T,   T = (lam I + C_no + s P) M^-1,      M = lam I + C_oo + s P
    fusion      W*_l = [W_l (lam I + sum C_i) + sum_i B_il A_il C_i + s W0_l P] M^-1,
                M = lam I + sum_i C_i + s P

one d x d factorisation for all layers. The paper-literal path (``method="reference"``)
projects every token through every layer, accumulates per-layer sums and solves per layer
(in fusion, after fusing each concept's LoRA into a copy of the weights); it is kept as the
proof of the fast path and as the baseline the benchmarks beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import mace_kernels as mk

METHODS = ("fast", "reference")


@dataclass
class SolveReport:
    """What a closed-form step did: token counts and the solve's conditioning and jitter."""

    tokens: int
    jitter: float = 0.0
    condition_lower_bound: float = float("nan")
    extra: dict = field(default_factory=dict)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose 'fast' or 'reference'")


def _lhs(d: int, lam: float, cov: torch.Tensor, preserve: torch.Tensor | None, scale: float, dtype) -> torch.Tensor:
    """lam I + cov + s P, the matrix every layer's solve shares."""
    M = cov.to(dtype).clone()
    M.diagonal().add_(lam)
    if preserve is not None and scale:
        M += scale * preserve.to(dtype)
    return M


def _solve(M: torch.Tensor, R: torch.Tensor, jitter: float | None) -> tuple[torch.Tensor, mk.SolveInfo]:
    """X M = R, always in float64: the d x d factorisation is cheap and text-embedding
    covariances are too ill-conditioned for a float32 solve; ``dtype`` sets the statistics."""
    X, info = mk.spd_solve(M.to(torch.float64), R.to(torch.float64), jitter=jitter, return_info=True)
    return X.to(R.dtype), info


# ----------------------------------------------------------------------------- refinement


def refinement_statistics(old_tokens: torch.Tensor, new_tokens: torch.Tensor, dtype=torch.float64, chunk: int = 65536):
    """(C_oo, C_no) = (sum e_o e_o^T, sum e_n e_o^T) over aligned token pairs.

    float32 statistics stream through token_covariance directly; float64 ones convert one
    chunk of tokens at a time, so memory stays bounded for millions of tokens.
    """
    if dtype != torch.float64:
        return mk.token_covariance(old_tokens, new_tokens)
    d = old_tokens.shape[1]
    c_oo = torch.zeros(d, d, dtype=dtype)
    c_no = torch.zeros(d, d, dtype=dtype)
    for start in range(0, old_tokens.shape[0], chunk):
        cxx, cyx = mk.token_covariance(old_tokens[start:start + chunk].to(dtype), new_tokens[start:start + chunk].to(dtype))
        c_oo += cxx
        c_no += cyx
    return c_oo, c_no


def refine_weights(
    weights: Sequence[torch.Tensor],
    old_tokens: torch.Tensor,
    new_tokens: torch.Tensor,
    *,
    lam: float,
    preserve: torch.Tensor | None = None,
    preserve_scale: float = 0.0,
    method: str = "fast",
    dtype: torch.dtype = torch.float64,
    jitter: float | None = None,
) -> tuple[list[torch.Tensor], SolveReport]:
    """Closed-form refinement of every projection: map old-prompt tokens onto new-prompt outputs.

    old_tokens, new_tokens: (N, d) aligned token embeddings e_o, e_n. preserve: (d, d) P.
    Returns the new weights (each in its input dtype) and a report.
    """
    _check_method(method)
    d = weights[0].shape[1]
    if old_tokens.shape != new_tokens.shape or old_tokens.shape[-1] != d:
        raise ValueError(f"old and new tokens must both be (N, {d}), got {tuple(old_tokens.shape)} and {tuple(new_tokens.shape)}")
    if method == "fast":
        c_oo, c_no = (c.to(dtype) for c in refinement_statistics(old_tokens, new_tokens, dtype))
        M = _lhs(d, lam, c_oo, preserve, preserve_scale, dtype)
        N = _lhs(d, lam, c_no, preserve, preserve_scale, dtype)
        T, info = _solve(M, N, jitter)
        new = mk.closed_form_edit(weights, T)
        return new, SolveReport(old_tokens.shape[0], float(info.jitter), float(info.condition_lower_bound))
    # Paper-literal: per layer, project the new tokens, accumulate, solve.
    x = old_tokens.to(dtype)
    y = new_tokens.to(dtype)
    eye = torch.eye(d, dtype=dtype)
    out, jit = [], 0.0
    for W in weights:
        W64 = W.to(dtype)
        values = y @ W64.T  # W e_n for every token
        mat1 = lam * W64 + values.T @ x
        mat2 = lam * eye + x.T @ x
        if preserve is not None and preserve_scale:
            mat1 = mat1 + preserve_scale * W64 @ preserve.to(dtype)
            mat2 = mat2 + preserve_scale * preserve.to(dtype)
        X, info = _solve((mat2 + mat2.T) / 2, mat1, jitter)
        jit = max(jit, float(info.jitter))
        out.append(X.to(W.dtype))
    return out, SolveReport(old_tokens.shape[0], jit)


# ----------------------------------------------------------------------------- fusion


@dataclass
class LoraStack:
    """The LoRAs of n concepts on the same L projections, scale folded into B.

    A[l]: (n, r, d), B[l]: (n, out_l, r). A concept without a LoRA on a layer has zeros there.
    """

    A: list[torch.Tensor]
    B: list[torch.Tensor]

    @property
    def num_concepts(self) -> int:
        return self.A[0].shape[0]


def fuse_weights(
    weights: Sequence[torch.Tensor],
    loras: LoraStack,
    concept_tokens: Sequence[torch.Tensor],
    *,
    lam: float,
    preserve: torch.Tensor | None = None,
    preserve_scale: float = 0.0,
    original: Sequence[torch.Tensor] | None = None,
    method: str = "fast",
    dtype: torch.dtype = torch.float64,
    jitter: float | None = None,
    max_tokens_per_call: int = 131_072,
) -> tuple[list[torch.Tensor], SolveReport]:
    """Closed-form fusion of n concept LoRAs into the projections ``weights`` (W_r).

    concept_tokens[i]: (N_i, d) embeddings of every token of concept i's prompts. original:
    the weights W0 that preservation anchors to (default: ``weights``).
    """
    _check_method(method)
    n, d = loras.num_concepts, weights[0].shape[1]
    if len(concept_tokens) != n:
        raise ValueError(f"{n} LoRAs but token embeddings for {len(concept_tokens)} concepts")
    if len(loras.A) != len(weights):
        raise ValueError(f"LoRAs cover {len(loras.A)} projections, the model has {len(weights)}")
    anchor = list(original) if original is not None else None
    with_preserve = preserve is not None and preserve_scale != 0.0
    if method == "reference":
        return _fuse_reference(weights, loras, concept_tokens, lam, preserve if with_preserve else None,
                               preserve_scale, anchor, dtype, jitter)
    C = concept_covariances(concept_tokens, d, dtype, max_tokens_per_call)
    sum_c = C.sum(0)
    M = _lhs(d, lam, sum_c, preserve, preserve_scale if with_preserve else 0.0, dtype)
    base_t = _lhs(d, lam, sum_c, None, 0.0, dtype)
    if with_preserve and anchor is None:
        base_t = M  # W (lam I + sum C) + s W P = W M
        base = list(weights)
    elif with_preserve:
        base = [torch.cat([w.to(dtype), w0.to(dtype)], 1) for w, w0 in zip(weights, anchor)]
        base_t = torch.cat([base_t, preserve_scale * preserve.to(dtype)])
    else:
        base = list(weights)
    numer = mk.fuse_loras(loras.A, loras.B, C, base=base, base_transform=base_t)
    X, info = _solve(M, torch.cat(numer), jitter)
    new = [part.to(w.dtype) for part, w in zip(torch.split(X, [w.shape[0] for w in weights]), weights)]
    tokens = sum(int(t.shape[0]) for t in concept_tokens)
    return new, SolveReport(tokens, float(info.jitter), float(info.condition_lower_bound))


def concept_covariances(concept_tokens: Sequence[torch.Tensor], d: int, dtype, max_tokens_per_call: int) -> torch.Tensor:
    """C_i = sum e e^T over each concept's tokens, (n, d, d): few segmented token_covariance calls.

    Concepts are grouped so that one call sees at most ``max_tokens_per_call`` tokens (one
    concept with more is split across calls), which bounds the memory of the float64 copies.
    """
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    C = torch.zeros(len(concept_tokens), d, d, dtype=acc)
    pieces: list[tuple[int, torch.Tensor]] = []
    count = 0

    def flush():
        nonlocal pieces, count
        if not pieces:
            return
        ids = [i for i, _ in pieces]
        x = torch.cat([t.to(acc) if acc == torch.float64 else t for _, t in pieces])
        seg = torch.repeat_interleave(torch.arange(len(pieces)), torch.tensor([t.shape[0] for _, t in pieces]))
        cxx, _ = mk.token_covariance(x, segment_ids=seg, num_segments=len(pieces))
        for k, i in enumerate(ids):
            C[i] += cxx[k].to(acc)
        pieces, count = [], 0

    for i, tokens in enumerate(concept_tokens):
        for start in range(0, tokens.shape[0], max_tokens_per_call):
            part = tokens[start:start + max_tokens_per_call]
            if count + part.shape[0] > max_tokens_per_call:
                flush()
            pieces.append((i, part))
            count += part.shape[0]
    flush()
    return C.to(dtype)


def _fuse_reference(weights, loras, concept_tokens, lam, preserve, scale, anchor, dtype, jitter):
    """Paper-literal fusion: fuse each LoRA into a copy of the model, project every token."""
    d = weights[0].shape[1]
    eye = torch.eye(d, dtype=dtype)
    mat1 = [lam * w.to(dtype) for w in weights]
    mat2 = [lam * eye.clone() for _ in weights]
    for i, tokens in enumerate(concept_tokens):
        e = tokens.to(dtype)
        for lay, w in enumerate(weights):
            fused = w.to(dtype) + loras.B[lay][i].to(dtype) @ loras.A[lay][i].to(dtype)  # W_r + dW_i
            values = e @ fused.T
            mat1[lay] += values.T @ e
            mat2[lay] += e.T @ e
    out, jit = [], 0.0
    for lay, w in enumerate(weights):
        if preserve is not None:
            w0 = (anchor[lay] if anchor is not None else w).to(dtype)
            mat1[lay] += scale * w0 @ preserve.to(dtype)
            mat2[lay] += scale * preserve.to(dtype)
        X, info = _solve((mat2[lay] + mat2[lay].T) / 2, mat1[lay], jitter)
        jit = max(jit, float(info.jitter))
        out.append(X.to(w.dtype))
    return out, SolveReport(sum(int(t.shape[0]) for t in concept_tokens), jit)
