"""Stage 3's solve: the concepts' LoRAs fused into one edit of every projection,
W*_l = [W_l (lam I + sum C_i) + sum_i B_il A_il C_i + s W0_l P] M^-1 with M = lam I + sum_i C_i + s P."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

import mace_kernels as mk
from mace.closed_form.common import (
    CALL_TOKENS,
    Reduce,
    SolveReport,
    _accumulation,
    _check_method,
    _lhs,
    _reduce_count,
    _solve,
    _solve_per_layer,
)


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


class FusionStatistics:
    """What the fast fusion needs from every concept's tokens, fed one batch at a time.

    The solve reads the tokens only through sum_i C_i (d x d) and, per layer, the LoRA term
    sum_i B_il A_il C_i (out_l x d). Both are linear in each C_i, so a batch's partial C_i can
    be folded in as soon as it is known: batches of one concept may come in any order and
    interleave with other concepts'. Partial C_i wait in a group of at most ``group`` concepts
    and are folded by one fuse_loras call per group, so memory is ``group`` d x d matrices, the
    LoRA term (the size of the projections) and a buffer of at most ``max_tokens_per_call``
    tokens, never all concepts' C_i nor their tokens.
    """

    def __init__(self, loras: LoraStack, d: int, dtype: torch.dtype = torch.float64, *, group: int = 64,
                 max_tokens_per_call: int = CALL_TOKENS):
        if group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        self.loras = loras
        self.dtype = dtype
        self.group = group
        self.max_tokens_per_call = max_tokens_per_call
        acc = _accumulation(dtype)
        self.sum_c = torch.zeros(d, d, dtype=acc)
        self.lora_term: list[torch.Tensor] | None = None  # per layer; allocated by the first fold
        self.tokens = [0] * loras.num_concepts
        self._pending: dict[int, torch.Tensor] = {}
        # Batches wait here until max_tokens_per_call tokens or ``group`` concepts, then one
        # segmented token_covariance call covers them (several small calls are slower per token).
        self._buffer: list[tuple[int, torch.Tensor]] = []
        self._buffered = 0
        self._buffered_concepts: set[int] = set()

    def add(self, concept: int, tokens: torch.Tensor) -> None:
        """Add (N, d) tokens of concept ``concept`` (an index into the LoRA stack)."""
        d, n = self.sum_c.shape[0], self.loras.num_concepts
        if not 0 <= concept < n:
            raise ValueError(f"concept index {concept} outside the {n} LoRAs")
        if tokens.dim() != 2 or tokens.shape[1] != d:
            raise ValueError(f"tokens of concept {concept} must be (N, {d}), got {tuple(tokens.shape)}")
        self.tokens[concept] += int(tokens.shape[0])
        if tokens.shape[0] == 0:
            return
        if sum(self.tokens) == tokens.shape[0] and self.sum_c.device != tokens.device:  # the first tokens
            self.sum_c = self.sum_c.to(tokens.device)  # the sums live where the tokens do
        self._buffer.append((concept, tokens.to(self.sum_c.device)))
        self._buffered += int(tokens.shape[0])
        self._buffered_concepts.add(concept)
        if self._buffered >= self.max_tokens_per_call or len(self._buffered_concepts) >= self.group:
            self._covariances()

    def _covariances(self) -> None:
        """Turn the buffered batches into partial C_i (one segment per concept) and pend them."""
        if not self._buffer:
            return
        buffer, self._buffer, self._buffered = self._buffer, [], 0
        self._buffered_concepts = set()
        concepts = list(dict.fromkeys(c for c, _ in buffer))
        segment = {c: k for k, c in enumerate(concepts)}
        x = buffer[0][1] if len(buffer) == 1 else torch.cat([t for _, t in buffer])
        seg = torch.repeat_interleave(torch.tensor([segment[c] for c, _ in buffer], device=x.device),
                                      torch.tensor([t.shape[0] for _, t in buffer], device=x.device))
        del buffer
        acc = self.sum_c.dtype
        parts = torch.zeros(len(concepts), *self.sum_c.shape, dtype=acc, device=x.device)
        for start in range(0, x.shape[0], self.max_tokens_per_call):
            part = x[start:start + self.max_tokens_per_call]
            cxx, _ = mk.token_covariance(part.to(acc) if acc == torch.float64 else part,
                                         segment_ids=seg[start:start + self.max_tokens_per_call],
                                         num_segments=len(concepts))
            parts += cxx.to(acc)
        del x
        for c, cov in zip(concepts, parts, strict=True):
            if c in self._pending:
                self._pending[c] += cov
            else:
                if len(self._pending) >= self.group:
                    self._fold()
                self._pending[c] = cov

    def _fold(self) -> None:
        if not self._pending:
            return
        lora_device = self.loras.A[0].device
        ids = torch.tensor(list(self._pending), device=lora_device)
        C = torch.stack(list(self._pending.values())).to(self.dtype)
        self._pending = {}
        self.sum_c += C.sum(0).to(self.sum_c.dtype)
        term = mk.fuse_loras([a[ids] for a in self.loras.A], [b[ids] for b in self.loras.B], C.to(lora_device))
        if self.lora_term is None:
            self.lora_term = term
        else:
            for acc, t in zip(self.lora_term, term, strict=True):
                acc += t

    def finish(self) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(sum_i C_i, per-layer sum_i B_il A_il C_i) in ``dtype``; the LoRA term is None when
        no token was added."""
        self._covariances()
        self._fold()
        term = None if self.lora_term is None else [t.to(self.dtype) for t in self.lora_term]
        return self.sum_c.to(self.dtype), term

    def reduce_sums(self, reduce: Reduce) -> None:
        """Replace each running sum S (sum C_i, the LoRA term, the token counts) by ``reduce(S)``,
        e.g. its sum over processes that each added other batches (mace.distributed)."""
        self._covariances()
        self._fold()
        if self.lora_term is None:  # no token here; other processes may have some
            d = self.sum_c.shape[0]
            self.lora_term = [torch.zeros(b.shape[1], d, dtype=_accumulation(self.dtype), device=b.device)
                              for b in self.loras.B]
        self.sum_c = reduce(self.sum_c)
        self.lora_term = [reduce(t) for t in self.lora_term]
        self.tokens = _reduce_count(reduce, self.tokens)


def solve_fusion(
    weights: Sequence[torch.Tensor],
    stats: FusionStatistics,
    *,
    lam: float,
    preserve: torch.Tensor | None = None,
    preserve_scale: float = 0.0,
    original: Sequence[torch.Tensor] | None = None,
    jitter: float | None = None,
) -> tuple[list[torch.Tensor], SolveReport]:
    """The fast fusion from its statistics: one d x d solve for every layer's rows.

    The numerator W_l (lam I + sum C_i) + sum_i B_il A_il C_i + s W0_l P: the base terms are
    packed GEMMs (closed_form_edit) with the same shared d x d transforms as before.
    """
    d, dtype = weights[0].shape[1], stats.dtype
    if stats.sum_c.shape[0] != d:
        raise ValueError(f"statistics are {stats.sum_c.shape[0]} wide, the projections read {d}")
    sum_c, lora_term = stats.finish()
    sum_c = sum_c.to(weights[0].device)
    with_preserve = preserve is not None and preserve_scale != 0.0
    M = _lhs(d, lam, sum_c, preserve, preserve_scale if with_preserve else 0.0, dtype)
    wd = [w.to(dtype) for w in weights]
    if with_preserve and original is None:
        numer = mk.closed_form_edit(wd, M)  # W (lam I + sum C) + s W P = W M
    else:
        numer = mk.closed_form_edit(wd, _lhs(d, lam, sum_c, None, 0.0, dtype))
        if with_preserve:
            anchored = mk.closed_form_edit([w0.to(dtype) for w0 in original],
                                           preserve_scale * preserve.to(device=M.device, dtype=dtype))
            for a, b in zip(numer, anchored, strict=True):
                a += b
            del anchored
    del wd
    if lora_term is not None:
        for a, b in zip(numer, lora_term, strict=True):  # in place: each term is as large as the projections
            a += b.to(a.device)
    X, info = _solve(M, torch.cat(numer), jitter)
    new = [part.to(w.dtype) for part, w in zip(torch.split(X, [w.shape[0] for w in weights]), weights, strict=True)]
    return new, SolveReport(sum(stats.tokens), float(info.jitter), float(info.condition_lower_bound))


class _ReferenceFusion:
    """Paper-literal accumulation: each batch's tokens through every layer with its concept's LoRA fused in."""

    def __init__(self, weights: Sequence[torch.Tensor], loras: LoraStack, lam: float, dtype: torch.dtype):
        self.weights = [w.to(dtype) for w in weights]
        self.loras = loras
        self.dtype = dtype
        self.lam = lam
        d = weights[0].shape[1]
        self.mat1 = [torch.zeros_like(w) for w in self.weights]  # sum ((W + dW_i) e) e^T per layer
        self.mat2 = [torch.zeros(d, d, dtype=dtype, device=w.device) for w in self.weights]  # sum e e^T per layer
        self.tokens = 0

    def add(self, concept: int, tokens: torch.Tensor) -> None:
        e = tokens.to(self.weights[0].device, self.dtype)
        for lay, w in enumerate(self.weights):
            A = self.loras.A[lay][concept].to(w.device, self.dtype)
            B = self.loras.B[lay][concept].to(w.device, self.dtype)
            fused = w + B @ A  # W_r + dW_i
            values = e @ fused.T
            self.mat1[lay] += values.T @ e
            self.mat2[lay] += e.T @ e
        self.tokens += int(tokens.shape[0])

    def reduce_sums(self, reduce: Reduce) -> None:
        self.mat1 = [reduce(m) for m in self.mat1]
        self.mat2 = [reduce(m) for m in self.mat2]
        self.tokens = _reduce_count(reduce, self.tokens)

    def solve(self, weights, preserve, scale, anchor, jitter):
        eye = torch.eye(weights[0].shape[1], dtype=self.dtype, device=self.weights[0].device)
        return _solve_per_layer(weights, [self.lam * w + m1 for w, m1 in zip(self.weights, self.mat1, strict=True)],
                                [self.lam * eye + m2 for m2 in self.mat2], anchor if anchor is not None else weights,
                                preserve, scale, jitter, self.tokens)


def fuse_weights_streamed(
    weights: Sequence[torch.Tensor],
    loras: LoraStack,
    batches: Iterable[tuple[int, torch.Tensor]],
    *,
    lam: float,
    preserve: torch.Tensor | None = None,
    preserve_scale: float = 0.0,
    original: Sequence[torch.Tensor] | None = None,
    method: str = "fast",
    dtype: torch.dtype = torch.float64,
    jitter: float | None = None,
    max_tokens_per_call: int = CALL_TOKENS,
    group: int = 64,
    combine: Callable[[object], bool] | None = None,
    preserve_per_token: bool = False,
) -> tuple[list[torch.Tensor], SolveReport]:
    """Closed-form fusion from token batches (e.g. a generator that encodes each concept's prompts).

    Each batch is (concept index i, (N_b, d) tokens of concept i's prompts); only running
    statistics are kept between batches. Same result as :func:`fuse_weights` on the
    concatenated tokens of each concept. ``combine`` and ``preserve_per_token`` as in
    :func:`refine_weights_streamed` (the count: every token of every concept's prompts).
    """
    _check_method(method)
    n, d = loras.num_concepts, weights[0].shape[1]
    if len(loras.A) != len(weights):
        raise ValueError(f"LoRAs cover {len(loras.A)} projections, the model has {len(weights)}")
    anchor = list(original) if original is not None else None
    with_preserve = preserve is not None and preserve_scale != 0.0
    if method == "fast":
        acc = FusionStatistics(loras, d, dtype, group=group, max_tokens_per_call=max_tokens_per_call)
    else:
        acc = _ReferenceFusion(weights, loras, lam, dtype)
    for concept, tokens in batches:
        if not 0 <= concept < n:
            raise ValueError(f"concept index {concept} outside the {n} LoRAs")
        if tokens.dim() != 2 or tokens.shape[1] != d:
            raise ValueError(f"tokens of concept {concept} must be (N, {d}), got {tuple(tokens.shape)}")
        acc.add(concept, tokens)
    if combine is not None and not combine(acc):
        tokens = acc.tokens
        return list(weights), SolveReport(sum(tokens) if isinstance(tokens, list) else tokens)
    if preserve_per_token:  # s counts per token of the concepts' prompts (every process's, once combined)
        preserve_scale = preserve_scale * (sum(acc.tokens) if isinstance(acc.tokens, list) else acc.tokens)
    if method == "fast":
        return solve_fusion(weights, acc, lam=lam, preserve=preserve, preserve_scale=preserve_scale,
                            original=anchor, jitter=jitter)
    return acc.solve(weights, preserve if with_preserve else None, preserve_scale, anchor, jitter)


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
    max_tokens_per_call: int = CALL_TOKENS,
) -> tuple[list[torch.Tensor], SolveReport]:
    """Closed-form fusion of n concept LoRAs into the projections ``weights`` (W_r).

    concept_tokens[i]: (N_i, d) embeddings of every token of concept i's prompts. original:
    the weights W0 that preservation anchors to (default: ``weights``). Each concept's tokens
    are one batch of :func:`fuse_weights_streamed`.
    """
    n = loras.num_concepts
    if len(concept_tokens) != n:
        raise ValueError(f"{n} LoRAs but token embeddings for {len(concept_tokens)} concepts")
    return fuse_weights_streamed(weights, loras, enumerate(concept_tokens), lam=lam, preserve=preserve,
                                 preserve_scale=preserve_scale, original=original, method=method, dtype=dtype,
                                 jitter=jitter, max_tokens_per_call=max_tokens_per_call)
