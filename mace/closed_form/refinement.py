"""Stage 1's solve: every projection W_l becomes W_l T, T = (lam I + C_no + s P) M^-1 with
M = lam I + C_oo + s P, from token statistics fed batch by batch (or the paper-literal per-layer path)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

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
