"""SPEED (Li et al., 2025, "SPEED: Scalable, Precise, and Efficient Concept Erasure for Diffusion
Models"): a closed-form edit of the cross-attention projections restricted to the null space of
the retained concepts' embeddings, on the mace_kernels ops.

Per edited projection W (out x d), with n target tokens c_t (each erased text's last word piece),
the aligned anchor tokens c_a (the guide's last word piece) and a retain set of prior tokens:

    C_1 = (1/n) sum c_t c_t^T,   D = (1/n) sum (c_a - c_t) c_t^T
    C_r = mean over the refined retain set of r r^T,   P = U_0 U_0^T
          (U_0: eigenvectors of C_r with eigenvalue < threshold, the approximate null space)
    K   = invariants (d x k): the start token of the empty prompt and ``null_clusters`` k-means
          centres of its other 76 positions (Invariant Equality Constraints)

    dW = argmin ||(W + dW P) C_t - W C_a||^2 + alpha ||dW P||^2   s.t.  dW P K = 0
       = W D P (I - M K (K^T P M K + mu I)^-1 K^T P) M,   M = (C_1 P + alpha I)^-1

with alpha = ``retain_scale`` and mu = ``constraint_ridge`` (0: the constraint holds exactly).
Computed as W' = W T with T = I + D (Q - Q K G^-1 K^T Q), Q = P S^-1, S = P C_1 P + alpha I,
G = K^T Q K + mu I: S and G are SPD (``spd_solve``), Q is symmetric and Q = P M, so this is the
formula above. Since dW = dW P, every retained direction (eigenvalue >= threshold) keeps its
output exactly, and W' K = W K when mu = 0.

The retain set is refined per layer ("prior knowledge refinement"):

- Influence-based Prior Filtering (``prior_filter``): with the unconstrained edit
  E = W D (I + C_1)^-1, keep the prior tokens r with ||E r|| at or above their mean.
- Directed Prior Augmentation (``augment`` samples per kept token): r + z v, z ~ N(0, 1), v the
  right singular vector of W with the smallest singular value (so W r barely moves; sign fixed
  so that v's largest-magnitude entry is positive); of these, keep those with ||E r'|| at or
  above their mean, and add them to the kept tokens. Draws: for each edited projection in
  order, one (kept, augment) block of float64 standard normals from ``generator``.

Without filtering and augmentation every layer shares one C_r, P and T (one ``closed_form_edit``
call); otherwise each layer has its own.

Deliberate differences from the reference code (github.com/Ouxiang-Li/SPEED, train_erase_null.py):

- k-means for the invariants starts from evenly spaced positions and runs Lloyd iterations to a
  fixed point (deterministic); the reference uses kmeans_pytorch with a random start.
- The augmentation draws z directly (the reference projects a d-dim normal onto v, which has the
  same distribution), and its influence filter compares each sample with the mean over all of the
  layer's samples, not per chunk of 128 prior tokens; ties with the mean are kept (">=" instead of
  ">", so a single prior token is not filtered away to nothing).
- Filtering and augmentation are independent switches (the reference filters only when it
  augments).
- With mu = 0 the constraint is imposed on an orthonormal basis of the span of P K (the same
  solution when P K has full column rank; well defined when it does not, e.g. a null space of
  fewer than k dimensions), where the reference inverts K^T P M K as it is.
- Without prior texts the retain set is the empty prompt's 76 end-of-text/padding tokens, as in
  the reference; prior texts that name an erased concept (whole word, any case) are dropped, as
  in the reference, and counted in the report.
- The per-layer solves are in float64 whatever the model's dtype.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

import mace_kernels as mk
from mace.closed_form import SolveReport
from mace.pipelines.components import cross_attention_projections, edit_projections, encode_prompts
from mace.stages.prompts import last_word_piece

PROJECTIONS = ("k", "v", "kv")


# ----------------------------------------------------------------------------- tokens


def last_piece_tokens(pipe, texts: Sequence[str]) -> torch.Tensor:
    """(len(texts), d): each text's embedding at its last word piece (the token before
    end-of-text; the start token for the empty text)."""
    texts = list(texts)
    emb = encode_prompts(pipe, texts)
    ids = pipe.tokenizer(texts, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
    return torch.stack([emb[b, last_word_piece(i)] for b, i in enumerate(ids)]) if texts else emb[:, 0]


def kmeans(x: torch.Tensor, k: int, iterations: int = 100) -> torch.Tensor:
    """(k, d) k-means centres of the rows of x (N, d), deterministic: the start centres are rows
    at evenly spaced positions, then Lloyd iterations until the assignment stops changing."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: k must be in [1, {n}], got {k}")
    x = x.to(torch.float64)
    centres = x[[int((i + 0.5) * n / k) for i in range(k)]].clone()
    assign = None
    for _ in range(iterations):
        new = torch.cdist(x, centres).argmin(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centres[j] = members.mean(0)
    return centres


def invariant_tokens(pipe, clusters: int = 3) -> torch.Tensor:
    """(1 + clusters, d): the empty prompt's start token and ``clusters`` k-means centres of its
    other positions (end-of-text and padding) — what SPEED keeps exactly."""
    null = encode_prompts(pipe, [""])[0].to(torch.float64)
    if clusters == 0:
        return null[:1]
    return torch.cat([null[:1], kmeans(null[1:], clusters)])


# ----------------------------------------------------------------------------- the edit


def _smallest_right_singular_vector(W: torch.Tensor) -> torch.Tensor:
    gram, _ = mk.token_covariance(W)  # W^T W: the rows of W as tokens
    v = torch.linalg.eigh(gram).eigenvectors[:, 0]
    return v if v[v.abs().argmax()] >= 0 else -v


def _at_or_above_mean(tokens: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    norm = (tokens @ E.T).norm(dim=1)
    return tokens[norm >= norm.mean()]


def _constraint_basis(P: torch.Tensor, K: torch.Tensor, ridge: float) -> torch.Tensor:
    """(d, j) columns the equality constraint acts on: K itself with a ridge, else an orthonormal
    basis of the span of P K (the constraint dW K = dW P K = 0 depends only on that span)."""
    if K.shape[1] == 0 or ridge > 0:
        return K
    U, s, _ = torch.linalg.svd(P @ K, full_matrices=False)
    scale = float(torch.linalg.matrix_norm(K, 2))
    return U[:, s > 1e-9 * scale]


def speed_weights(
    weights: Sequence[torch.Tensor],
    target: torch.Tensor,
    anchor: torch.Tensor,
    retain: torch.Tensor,
    invariants: torch.Tensor | None = None,
    *,
    threshold: float = 0.1,
    retain_scale: float = 1.0,
    constraint_ridge: float = 0.0,
    augment: int = 10,
    prior_filter: bool = True,
    generator: torch.Generator | None = None,
    jitter: float | None = None,
) -> tuple[list[torch.Tensor], SolveReport]:
    """SPEED's edit of every projection in ``weights`` (module docstring), on plain tensors.

    target, anchor: (n, d) aligned erased/guide tokens; retain: (m, d) prior tokens, m >= 1;
    invariants: (k, d) tokens whose outputs must not change (None: none). Returns the new
    weights (each in its input dtype) and a report (extra: null-space dimension, prior tokens
    used and constraint columns, per layer).
    """
    weights = list(weights)
    if not weights:
        raise ValueError("speed: no projections to edit")
    d = weights[0].shape[1]
    for name, t in (("target", target), ("anchor", anchor), ("retain", retain)):
        if t.dim() != 2 or t.shape[1] != d:
            raise ValueError(f"speed: {name} tokens must be (N, {d}), got {tuple(t.shape)}")
    if target.shape != anchor.shape or target.shape[0] == 0:
        raise ValueError(f"speed: target and anchor tokens must both be (n >= 1, {d}), got {tuple(target.shape)} "
                         f"and {tuple(anchor.shape)}")
    if retain.shape[0] == 0:
        raise ValueError("speed: the retain set is empty")
    if invariants is not None and (invariants.dim() != 2 or invariants.shape[1] != d):
        raise ValueError(f"speed: invariants must be (k, {d}), got {tuple(invariants.shape)}")
    if not threshold > 0:
        raise ValueError(f"speed: threshold must be > 0, got {threshold}")
    if not retain_scale > 0:
        raise ValueError(f"speed: retain_scale must be > 0 (it keeps P C P + alpha I definite), got {retain_scale}")
    if constraint_ridge < 0:
        raise ValueError(f"speed: constraint_ridge must be >= 0, got {constraint_ridge}")
    if augment < 0:
        raise ValueError(f"speed: augment must be >= 0, got {augment}")

    # The edit runs where the weights are (mace.pipelines.components.edit_projections hands them over on the
    # CPU); the tokens come from the text encoder's device.
    f64, device = torch.float64, weights[0].device
    eye = torch.eye(d, dtype=f64, device=device)
    t, a, r = (x.to(device, f64) for x in (target, anchor, retain))
    K = torch.zeros(d, 0, dtype=f64, device=device) if invariants is None else invariants.to(device, f64).T
    n = t.shape[0]
    c1, cat_ = mk.token_covariance(t, a)  # sum t t^T, sum a t^T
    c1, D = c1 / n, (cat_ - c1) / n
    Wd = [w.to(f64) for w in weights]

    per_layer = prior_filter or augment > 0
    if per_layer:
        # The unconstrained edit E_l = W_l D (I + C_1)^-1 of every layer at once: it ranks the priors.
        E = torch.split(mk.spd_solve(eye + c1, torch.cat(Wd) @ D), [w.shape[0] for w in Wd])
        sets = []
        for W, E_l in zip(Wd, E, strict=True):
            kept = _at_or_above_mean(r, E_l) if prior_filter else r
            if augment:
                v = _smallest_right_singular_vector(W)
                # Drawn on the CPU: a seed gives the same edit on every device.
                z = torch.randn(kept.shape[0], augment, generator=generator, dtype=f64).to(device)
                moved = (kept[:, None, :] + z[..., None] * v).reshape(-1, d)
                kept = torch.cat([kept, _at_or_above_mean(moved, E_l)])
            sets.append(kept)
        sizes = torch.tensor([len(s) for s in sets])
        seg = torch.repeat_interleave(torch.arange(len(sets)), sizes).to(device)
        cr, _ = mk.token_covariance(torch.cat(sets), segment_ids=seg, num_segments=len(sets))
        cr = cr / sizes.to(device, f64)[:, None, None]
    else:
        sizes = torch.tensor([r.shape[0]])
        cr = (mk.token_covariance(r)[0] / r.shape[0])[None]

    evals, evecs = torch.linalg.eigh(cr)
    null = evals < threshold
    P = (evecs * null[:, None, :].to(f64)) @ evecs.mT
    S = P @ c1 @ P
    S = (S + S.mT) / 2 + retain_scale * eye
    Q, info = mk.spd_solve(S, P, jitter=jitter, return_info=True)  # P S^-1 (P and S commute)
    Q = (Q + Q.mT) / 2
    jit, cond = float(info.jitter.max()), float(info.condition_lower_bound.max())

    transforms, columns = [], []
    for P_l, Q_l in zip(P, Q, strict=True):
        B = _constraint_basis(P_l, K, constraint_ridge)
        delta = Q_l
        if B.shape[1]:
            QB = Q_l @ B
            G = B.T @ QB
            G = (G + G.T) / 2 + constraint_ridge * torch.eye(B.shape[1], dtype=f64, device=device)
            X, g_info = mk.spd_solve(G, QB, jitter=jitter, return_info=True)  # Q B G^-1
            jit = max(jit, float(g_info.jitter))
            delta = Q_l - X @ QB.T
        transforms.append(eye + D @ delta)
        columns.append(int(B.shape[1]))

    if len(transforms) == 1:
        new = mk.closed_form_edit(weights, transforms[0])
    else:
        new = [mk.closed_form_edit([w], T)[0] for w, T in zip(weights, transforms, strict=True)]
    null_dims = [int(v) for v in null.sum(-1)]
    prior = [int(v) for v in sizes]
    report = SolveReport(n, jit, cond, extra={
        "null_dim": null_dims if per_layer else null_dims * len(weights),
        "prior_tokens": prior if per_layer else prior * len(weights),
        "constraints": columns if per_layer else columns * len(weights),
    })
    return new, report


# ----------------------------------------------------------------------------- on a pipeline


def _names_concept(text: str, concepts: Sequence[str]) -> bool:
    return any(re.search(r"\b" + re.escape(c.lower()) + r"\b", text.lower()) for c in concepts)


def speed(
    pipe,
    erase: Sequence[str],
    guide: str | Sequence[str],
    preserve: Sequence[str] = (),
    *,
    threshold: float = 0.1,
    retain_scale: float = 1.0,
    constraint_ridge: float = 0.0,
    augment: int = 10,
    prior_filter: bool = True,
    null_clusters: int = 3,
    projections: str = "v",
    seed: int = 0,
    jitter: float | None = None,
) -> SolveReport:
    """Erase the ``erase`` concepts from ``pipe`` in place by SPEED, mapping each onto ``guide``
    (one text, or one per concept) within the null space of the ``preserve`` concepts.

    projections: which cross-attention projections to edit, "v" (the reference's default), "k"
    or "kv". The report's extra also says which projections were edited and how many
    preserved texts were dropped for naming an erased concept.
    """
    erase, preserve = list(erase), list(preserve)
    if not erase:
        raise ValueError("speed: no concepts to erase")
    guides = [guide] * len(erase) if isinstance(guide, str) else list(guide)
    if len(guides) != len(erase):
        raise ValueError(f"speed: {len(erase)} concepts but {len(guides)} guides")
    if projections not in PROJECTIONS:
        raise ValueError(f"speed: projections must be one of {PROJECTIONS}, got {projections!r}")
    if not 0 <= null_clusters <= pipe.tokenizer.model_max_length - 1:
        raise ValueError(f"speed: null_clusters must be in [0, {pipe.tokenizer.model_max_length - 1}], got {null_clusters}")
    kept = [p for p in preserve if not _names_concept(p, erase)]
    target, anchor = last_piece_tokens(pipe, erase), last_piece_tokens(pipe, guides)
    retain = last_piece_tokens(pipe, kept) if kept else encode_prompts(pipe, [""])[0, 1:]
    invariants = invariant_tokens(pipe, null_clusters)
    names = [name for name, _ in cross_attention_projections(pipe.unet)]
    suffixes = tuple(f".to_{p}" for p in projections)
    chosen = [i for i, name in enumerate(names) if name.endswith(suffixes)]
    generator = torch.Generator().manual_seed(seed)

    def edit(weights):
        new, report = speed_weights([weights[i] for i in chosen], target, anchor, retain, invariants,
                                    threshold=threshold, retain_scale=retain_scale, constraint_ridge=constraint_ridge,
                                    augment=augment, prior_filter=prior_filter, generator=generator, jitter=jitter)
        out = list(weights)
        for i, w in zip(chosen, new, strict=True):
            out[i] = w
        return out, report

    report = edit_projections(pipe.unet, edit)
    report.extra.update(erased=len(erase), preserved=len(kept), dropped=len(preserve) - len(kept),
                        projections=projections)
    return report
