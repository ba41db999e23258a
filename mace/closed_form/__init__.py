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

from mace.closed_form.common import CALL_TOKENS, METHODS, SolveReport
from mace.closed_form.fusion import FusionStatistics, LoraStack, fuse_weights, fuse_weights_streamed, solve_fusion
from mace.closed_form.refinement import (
    RefinementStatistics,
    refine_weights,
    refine_weights_streamed,
    refinement_statistics,
    solve_refinement,
)

__all__ = [
    "CALL_TOKENS", "METHODS", "FusionStatistics", "LoraStack", "RefinementStatistics", "SolveReport", "fuse_weights",
    "fuse_weights_streamed", "refine_weights", "refine_weights_streamed", "refinement_statistics", "solve_fusion",
    "solve_refinement",
]
