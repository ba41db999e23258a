"""RECE (Gong et al., ECCV 2024, "Reliable and Efficient Concept Erasure of Text-to-Image Diffusion
Models"): UCE followed by rounds that each find, in closed form, the embeddings that bring an
erased concept back, and erase those in closed form too; on the mace_kernels ops.

W0_l are the original projections, W_l the current ones (after UCE, then after each round).
Round k, for every token c of the erased texts' embeddings (all 77 positions of each text):

    adversarial  c' = argmin_x  sum_l ||W_l x - W0_l c||^2 + rho ||x||^2
                    = (rho I + sum_l W_l^T W_l)^-1 (sum_l W_l^T W0_l) c

    edit         W_l <- argmin_W'  s_e sum ||W' c' - W_l g||^2 + s_p sum_p ||W' e_p - W_l e_p||^2
                                     + lam ||W' - W_l||^2
                  = W_l (lam I + s_e C_gc' + s_p P) (lam I + s_e C_c'c' + s_p P)^-1

with g the guide text's token at the same position, C_c'c' = sum c' c'^T, C_gc' = sum g c'^T, e_p
every token of the empty prompt and of each preserved text (P = sum e_p e_p^T), rho =
``regularization``, s_e = ``erase_scale``, s_p = ``preserve_scale``. The sums over layers run
over every cross-attention key and value projection; sum_l W_l^T W_l and sum_l W_l^T W0_l are one
``token_covariance`` call over the stacked rows of all layers, c' one ``spd_solve`` for all tokens,
and the edit is the refinement solve of :mod:`mace.closed_form` (one d x d solve, one
``closed_form_edit``). Before the first round, :func:`mace.methods.uce.uce` runs with the same lam,
erase and preserve scales and preserved concepts (``start_with_uce``).

Deliberate differences from the reference code (github.com/CharlesGong12/RECE; the
``close_regzero`` embedding, ``edit_model_adversarial`` with ``technique='replace'``):

- The UCE step runs here, with mace.methods.uce's tokens; the reference loads a UCE checkpoint made
  beforehand (its paper's settings: lam = 0.1, preserve scale 0.1, as the defaults here).
- The reference keeps the round whose images score best on a validation set of prompts with a
  detector; here every round is kept (there is no detector for an arbitrary concept).
- Solves are in float64 (the reference inverts float32 matrices); the edit is the same least
  squares, solved once for all layers through the shared d x d matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import mace_kernels as mk
from mace.closed_form import SolveReport, refine_weights
from mace.methods.uce import uce
from mace.pipelines.components import edit_projections, encode_prompts, projection_weights


def adversarial_embeddings(
    weights: Sequence[torch.Tensor],
    original: Sequence[torch.Tensor],
    tokens: torch.Tensor,
    *,
    regularization: float = 0.1,
    jitter: float | None = None,
) -> torch.Tensor:
    """RECE's closed-form adversarial embeddings: for each row c of ``tokens`` (N, d), the x
    minimising sum_l ||W_l x - W0_l c||^2 + regularization ||x||^2 (W: ``weights``, the edited
    projections; W0: ``original``). Returns (N, d) float64."""
    weights, original = list(weights), list(original)
    if not weights or len(weights) != len(original):
        raise ValueError(f"rece: {len(weights)} edited projections but {len(original)} original ones")
    for w, w0 in zip(weights, original, strict=True):
        if w.shape != w0.shape:
            raise ValueError(f"rece: an edited projection is {tuple(w.shape)}, its original {tuple(w0.shape)}")
    d = weights[0].shape[1]
    if tokens.dim() != 2 or tokens.shape[1] != d:
        raise ValueError(f"rece: tokens must be (N, {d}), got {tuple(tokens.shape)}")
    if regularization < 0:
        raise ValueError(f"rece: regularization must be >= 0, got {regularization}")
    f64 = torch.float64
    W = torch.cat([w.to(f64) for w in weights])
    W0 = torch.cat([w.to(f64) for w in original])
    gram, cross = mk.token_covariance(W, W0)  # sum_l W_l^T W_l, sum_l W0_l^T W_l (the rows as tokens)
    gram.diagonal().add_(regularization)
    return mk.spd_solve(gram, tokens.to(cross.device, f64) @ cross, jitter=jitter)


def rece_weights(
    weights: Sequence[torch.Tensor],
    original: Sequence[torch.Tensor],
    concept_tokens: torch.Tensor,
    guide_tokens: torch.Tensor,
    *,
    rounds: int = 3,
    lam: float = 0.1,
    preserve: torch.Tensor | None = None,
    preserve_scale: float = 0.1,
    erase_scale: float = 1.0,
    regularization: float = 0.1,
    jitter: float | None = None,
) -> tuple[list[torch.Tensor], SolveReport]:
    """RECE's rounds (module docstring) on plain tensors, starting from ``weights`` (e.g. after UCE).

    concept_tokens, guide_tokens: (N, d) aligned tokens of the erased texts and their guides;
    preserve: (d, d) sum of the preserved tokens' outer products. Returns the new weights (each
    in its input dtype) and a report whose extra holds ``adversarial``, the last round's (N, d)
    adversarial embeddings, and ``shift``, per round the mean of ||c' - c|| / ||c||.
    """
    if rounds < 1:
        raise ValueError(f"rece: rounds must be >= 1, got {rounds}")
    if concept_tokens.shape != guide_tokens.shape or concept_tokens.dim() != 2 or concept_tokens.shape[0] == 0:
        raise ValueError(f"rece: concept and guide tokens must both be (N >= 1, d), got {tuple(concept_tokens.shape)} "
                         f"and {tuple(guide_tokens.shape)}")
    if erase_scale <= 0:
        raise ValueError(f"rece: erase_scale must be > 0, got {erase_scale}")
    scale = erase_scale**0.5  # on both token sets: the erase term weighs erase_scale
    # The rounds run where the weights are (mace.pipelines.components.edit_projections hands them over on the
    # CPU); the tokens come from the text encoder's device.
    device = weights[0].device
    guide = guide_tokens.to(device, torch.float64) * scale
    concept = concept_tokens.to(device, torch.float64)
    current = list(weights)
    jit, shifts, adversarial = 0.0, [], None
    for _ in range(rounds):
        adversarial = adversarial_embeddings(current, original, concept, regularization=regularization, jitter=jitter)
        shifts.append(float(((adversarial - concept).norm(dim=1) / concept.norm(dim=1).clamp_min(1e-12)).mean()))
        current, report = refine_weights(current, adversarial * scale, guide, lam=lam, preserve=preserve,
                                         preserve_scale=preserve_scale if preserve is not None else 0.0, jitter=jitter)
        jit = max(jit, report.jitter)
    return current, SolveReport(int(concept.shape[0]), jit, report.condition_lower_bound,
                                extra={"rounds": rounds, "shift": shifts, "adversarial": adversarial})


def rece(
    pipe,
    erase: Sequence[str],
    guide: str | Sequence[str],
    preserve: Sequence[str] = (),
    *,
    rounds: int = 3,
    lam: float = 0.1,
    preserve_scale: float = 0.1,
    erase_scale: float = 1.0,
    regularization: float = 0.1,
    start_with_uce: bool = True,
    jitter: float | None = None,
) -> SolveReport:
    """Erase the ``erase`` concepts from ``pipe`` in place by RECE: UCE onto ``guide`` (one text,
    or one per concept) preserving ``preserve``, then ``rounds`` rounds of closed-form
    adversarial embeddings erased in closed form. The original model is the pipe as passed in."""
    erase, preserve = list(erase), list(preserve)
    if not erase:
        raise ValueError("rece: no concepts to erase")
    guides = [guide] * len(erase) if isinstance(guide, str) else list(guide)
    if len(guides) != len(erase):
        raise ValueError(f"rece: {len(erase)} concepts but {len(guides)} guides")
    if rounds < 1:
        raise ValueError(f"rece: rounds must be >= 1, got {rounds}")
    if regularization < 0:
        raise ValueError(f"rece: regularization must be >= 0, got {regularization}")
    original = [w.detach().cpu().clone() for w in projection_weights(pipe.unet)]
    d = original[0].shape[1]
    concept = encode_prompts(pipe, erase).reshape(-1, d)
    guide_tokens = encode_prompts(pipe, guides).reshape(-1, d)
    kept = encode_prompts(pipe, [""] + preserve).reshape(-1, d)
    P, _ = mk.token_covariance(kept.to(torch.float64))
    if start_with_uce:
        uce(pipe, erase, guides, preserve, lam=lam, preserve_scale=preserve_scale, erase_scale=erase_scale, jitter=jitter)
    report = edit_projections(pipe.unet, lambda weights: rece_weights(
        weights, original, concept, guide_tokens, rounds=rounds, lam=lam, preserve=P, preserve_scale=preserve_scale,
        erase_scale=erase_scale, regularization=regularization, jitter=jitter,
    ))
    report.extra.update(erased=len(erase), preserved=len(preserve), uce=start_with_uce)
    return report
