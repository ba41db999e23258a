"""The closed-form steps of MACE on plain tensors: refinement and multi-LoRA fusion.

Both minimise, for every projection W_l (out_l x d) of the cross-attention layers,

    sum ||W' e - target(e)||^2 + lam ||W' - W_anchor||^2 + s sum_p ||W' e_p - W0 e_p||^2

and both depend on the text embeddings only through d x d statistics, with a left-hand
matrix M shared by every layer. The fast path exploits that (docs/design.md, section 2):

    refinement  W'_l = W_l T,   T = (lam I + C_no + s P) M^-1,      M = lam I + C_oo + s P
    fusion      W*_l = [W_l (lam I + sum C_i) + sum_i B_il A_il C_i + s W0_l P] M^-1,
                M = lam I + sum_i C_i + s P

one d x d factorisation for all layers. The statistics are accumulated batch by batch
(``RefinementStatistics``, ``FusionStatistics``; ``refine_weights_streamed`` and
``fuse_weights_streamed`` take an iterable of token batches, e.g. a generator that encodes
prompts), so memory does not grow with the number of tokens. The paper-literal path
(``method="reference"``) projects every batch's tokens through every layer, accumulates
per-layer sums and solves per layer (in fusion, after fusing each concept's LoRA into a copy
of the weights); it is kept as the proof of the fast path and as the baseline the benchmarks
beat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

import mace_kernels as mk

METHODS = ("fast", "reference")

# Replaces a running sum by its sum over processes (mace.distributed.all_reduce_sum).
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _reduce_count(reduce: Reduce, count):
    """A token count (an int, or a list of ints) through ``reduce``."""
    out = reduce(torch.tensor(count if isinstance(count, list) else [count], dtype=torch.int64)).tolist()
    return out if isinstance(count, list) else out[0]


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
        M += scale * preserve.to(device=M.device, dtype=dtype)
    return M


def _solve(M: torch.Tensor, R: torch.Tensor, jitter: float | None) -> tuple[torch.Tensor, mk.SolveInfo]:
    """X M = R, always in float64: the d x d factorisation is cheap and text-embedding
    covariances are too ill-conditioned for a float32 solve; ``dtype`` sets the statistics."""
    X, info = mk.spd_solve(M.to(torch.float64), R.to(torch.float64), jitter=jitter, return_info=True)
    return X.to(R.dtype), info


# ----------------------------------------------------------------------------- refinement


# Tokens gathered for one token_covariance call. Small batches are gathered to amortise a call;
# larger gathers cost more in concatenation (copies into fresh pages) than they save. Float32,
# SD-1.4 width: one encoder batch of ~5,000 tokens per call is within 5% per token of one call
# over 350,000 held tokens, and 1000-concept refinement gathering 32,768 took 1.13x the wall
# time of gathering 4,096 (paired runs, 2 cores) and three times the memory above the model.
CALL_TOKENS = 4096


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """float64 statistics stay float64; anything else accumulates in float32, as token_covariance does."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RefinementStatistics:
    """Running (C_oo, C_no) = (sum e_o e_o^T, sum e_n e_o^T), fed one batch of aligned tokens at a time.

    Memory is two d x d matrices plus a buffer of at most ``buffer_tokens`` tokens, whatever the
    number of batches: batches smaller than that are gathered into one token_covariance call
    (:data:`CALL_TOKENS`); an encoder batch (about 5,000 tokens) goes straight through. float64
    statistics convert at most ``chunk`` tokens at a time.
    """

    def __init__(self, d: int, dtype: torch.dtype = torch.float64, chunk: int = 16384, buffer_tokens: int = CALL_TOKENS):
        self.dtype = dtype
        self.chunk = chunk
        self.buffer_tokens = buffer_tokens
        acc = _accumulation(dtype)
        self._c_oo = torch.zeros(d, d, dtype=acc)
        self._c_no = torch.zeros(d, d, dtype=acc)
        self._buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._buffered = 0
        self.tokens = 0

    def add(self, old_tokens: torch.Tensor, new_tokens: torch.Tensor) -> None:
        """Add the aligned (N, d) tokens e_o, e_n of one batch."""
        d = self._c_oo.shape[0]
        if old_tokens.shape != new_tokens.shape or old_tokens.dim() != 2 or old_tokens.shape[1] != d:
            raise ValueError(f"old and new tokens must both be (N, {d}), got {tuple(old_tokens.shape)} "
                             f"and {tuple(new_tokens.shape)}")
        if self.tokens == 0 and self._c_oo.device != old_tokens.device:  # the sums live where the tokens do
            self._c_oo, self._c_no = self._c_oo.to(old_tokens.device), self._c_no.to(old_tokens.device)
        self._buffer.append((old_tokens, new_tokens.to(old_tokens.device)))
        self._buffered += int(old_tokens.shape[0])
        self.tokens += int(old_tokens.shape[0])
        if self._buffered >= self.buffer_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        olds, news = zip(*self._buffer, strict=True)
        self._buffer, self._buffered = [], 0
        old_tokens = olds[0] if len(olds) == 1 else torch.cat(olds)
        new_tokens = news[0] if len(news) == 1 else torch.cat(news)
        del olds, news
        acc = self._c_oo.dtype
        step = self.chunk if acc == torch.float64 else max(self.chunk, old_tokens.shape[0])
        for start in range(0, old_tokens.shape[0], step):
            x, y = old_tokens[start:start + step], new_tokens[start:start + step]
            if acc == torch.float64:
                x, y = x.to(acc), y.to(acc)
            cxx, cyx = mk.token_covariance(x, y)
            self._c_oo += cxx.to(acc)
            self._c_no += cyx.to(acc)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C_oo, C_no) of every token added so far, in the accumulation dtype."""
        self._flush()
        return self._c_oo, self._c_no

    def reduce_sums(self, reduce: Reduce) -> None:
        """Replace each running sum S (C_oo, C_no, the token count) by ``reduce(S)``, e.g. its sum
        over processes that each added other batches (mace.distributed)."""
        self._flush()
        self._c_oo, self._c_no = reduce(self._c_oo), reduce(self._c_no)
        self.tokens = _reduce_count(reduce, self.tokens)


def refinement_statistics(old_tokens: torch.Tensor, new_tokens: torch.Tensor, dtype=torch.float64, chunk: int = 16384):
    """(C_oo, C_no) over aligned token pairs given all at once (one batch of
    :class:`RefinementStatistics`)."""
    stats = RefinementStatistics(old_tokens.shape[1], dtype, chunk)
    stats.add(old_tokens, new_tokens)
    return stats.finish()


def solve_refinement(
    weights: Sequence[torch.Tensor],
    stats: RefinementStatistics,
    *,
    lam: float,
    preserve: torch.Tensor | None = None,
    preserve_scale: float = 0.0,
    jitter: float | None = None,
) -> tuple[list[torch.Tensor], SolveReport]:
    """The fast refinement from its statistics: W'_l = W_l T for every projection, one d x d solve."""
    d, dtype = weights[0].shape[1], stats.dtype
    c_oo, c_no = stats.finish()
    if c_oo.shape[0] != d:
        raise ValueError(f"statistics are {c_oo.shape[0]} wide, the projections read {d}")
    M = _lhs(d, lam, c_oo, preserve, preserve_scale, dtype)
    N = _lhs(d, lam, c_no, preserve, preserve_scale, dtype)
    T, info = _solve(M, N, jitter)
    report = SolveReport(stats.tokens, float(info.jitter), float(info.condition_lower_bound))
    return mk.closed_form_edit(weights, T.to(weights[0].device)), report


class _ReferenceRefinement:
    """Paper-literal accumulation: every batch's new tokens projected through every layer."""

    def __init__(self, weights: Sequence[torch.Tensor], dtype: torch.dtype):
        self.weights = [w.to(dtype) for w in weights]
        self.dtype = dtype
        d = weights[0].shape[1]
        self.mat1 = [torch.zeros_like(w) for w in self.weights]  # sum (W e_n) e_o^T per layer
        self.mat2 = [torch.zeros(d, d, dtype=dtype, device=w.device) for w in self.weights]  # sum e_o e_o^T per layer
        self.tokens = 0

    def add(self, old_tokens: torch.Tensor, new_tokens: torch.Tensor) -> None:
        device = self.weights[0].device
        x, y = old_tokens.to(device, self.dtype), new_tokens.to(device, self.dtype)
        for W, m1, m2 in zip(self.weights, self.mat1, self.mat2, strict=True):
            values = y @ W.T  # W e_n for every token
            m1 += values.T @ x
            m2 += x.T @ x
        self.tokens += int(old_tokens.shape[0])

    def reduce_sums(self, reduce: Reduce) -> None:
        self.mat1 = [reduce(m) for m in self.mat1]
        self.mat2 = [reduce(m) for m in self.mat2]
        self.tokens = _reduce_count(reduce, self.tokens)

    def solve(self, weights, lam, preserve, preserve_scale, jitter):
        eye = torch.eye(weights[0].shape[1], dtype=self.dtype, device=self.weights[0].device)
        return _solve_per_layer(weights, [lam * w + m1 for w, m1 in zip(self.weights, self.mat1, strict=True)],
                                [lam * eye + m2 for m2 in self.mat2], self.weights, preserve, preserve_scale, jitter,
                                self.tokens)


def _solve_per_layer(weights, mat1s, mat2s, anchors, preserve, scale, jitter, tokens) -> tuple[list[torch.Tensor], SolveReport]:
    """The paper-literal solves, one per layer: X_l (mat2_l + s P) = mat1_l + s W0_l P, with
    W0_l = ``anchors[l]``; each result in its projection's dtype."""
    out, jit = [], 0.0
    for w, mat1, mat2, w0 in zip(weights, mat1s, mat2s, anchors, strict=True):
        if preserve is not None and scale:
            p = preserve.to(mat2.device, mat2.dtype)
            mat1 = mat1 + scale * w0.to(mat2.device, mat2.dtype) @ p
            mat2 = mat2 + scale * p
        X, info = _solve((mat2 + mat2.T) / 2, mat1, jitter)
        jit = max(jit, float(info.jitter))
        out.append(X.to(w.dtype))
    return out, SolveReport(tokens, jit)


def refine_weights_streamed(
    weights: Sequence[torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    lam: float,
    preserve: torch.Tensor | None = None,
    preserve_scale: float = 0.0,
    method: str = "fast",
    dtype: torch.dtype = torch.float64,
    jitter: float | None = None,
    combine: Callable[[object], bool] | None = None,
    preserve_per_token: bool = False,
) -> tuple[list[torch.Tensor], SolveReport]:
    """Closed-form refinement from aligned token batches (e.g. a generator that encodes prompts).

    Each batch is (old_tokens, new_tokens), both (N_b, d); only the running statistics are
    kept between batches. Same result as :func:`refine_weights` on the concatenated tokens.
    With ``preserve_per_token`` the preservation weight is ``preserve_scale`` times the number
    of token pairs (a per-token mean statistic ``preserve`` then weighs one preserved token
    ``preserve_scale`` times as much as one erased token, whatever the counts).
    ``combine(statistics)``, when given, runs once every batch is in: it may merge other
    processes' statistics in place (``mace.distributed.combine_statistics``) and says whether
    this call solves; when it does not, the weights come back unchanged.
    """
    _check_method(method)
    d = weights[0].shape[1]
    acc = RefinementStatistics(d, dtype) if method == "fast" else _ReferenceRefinement(weights, dtype)
    for old_tokens, new_tokens in batches:
        if old_tokens.shape != new_tokens.shape or old_tokens.dim() != 2 or old_tokens.shape[1] != d:
            raise ValueError(f"old and new tokens must both be (N, {d}), got {tuple(old_tokens.shape)} "
                             f"and {tuple(new_tokens.shape)}")
        acc.add(old_tokens, new_tokens)
    if combine is not None and not combine(acc):
        return list(weights), SolveReport(acc.tokens)
    if preserve_per_token:  # s counts per erased token pair (every process's, once combined)
        preserve_scale = preserve_scale * acc.tokens
    if method == "fast":
        return solve_refinement(weights, acc, lam=lam, preserve=preserve, preserve_scale=preserve_scale, jitter=jitter)
    return acc.solve(weights, lam, preserve, preserve_scale, jitter)


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
    Returns the new weights (each in its input dtype) and a report. The tokens are one batch
    of :func:`refine_weights_streamed`.
    """
    d = weights[0].shape[1]
    if old_tokens.shape != new_tokens.shape or old_tokens.shape[-1] != d:
        raise ValueError(f"old and new tokens must both be (N, {d}), got {tuple(old_tokens.shape)} and {tuple(new_tokens.shape)}")
    return refine_weights_streamed(weights, [(old_tokens, new_tokens)], lam=lam, preserve=preserve,
                                   preserve_scale=preserve_scale, method=method, dtype=dtype, jitter=jitter)


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
