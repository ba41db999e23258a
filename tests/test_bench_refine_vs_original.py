"""The refinement benchmark's re-statement of the original code and mace.refine both solve the
normal equations the float64 reference solves (tiny model, 2 concepts)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_refine_vs_original as bench  # noqa: E402

import mace  # noqa: E402
from mace.pipelines.components import cross_attention_projections, encode_prompts, projection_weights, set_projection_weights  # noqa: E402


def test_original_restatement_and_refine_match_the_float64_solve():
    torch.manual_seed(0)
    tokenizer, encoder, unet = bench.load_model("builtin:tiny")
    pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=encoder, unet=unet)
    # A ridge and a preservation weight large enough that each term moves the solution: leaving
    # either out of the re-statement, or misaligning the tokens, fails the tolerance below.
    lam, scale, weight = 0.5, 1e-2, 1e4
    s = scale**2
    emb = encode_prompts(pipe, bench.preserved_prompts()[:16]).double()
    C = torch.einsum("btd,bte->de", emb, emb)
    P = weight * C
    concepts = bench.concept_pairs(2, prompts=6)
    pairs = [p for c in concepts for p in c]
    original = [w.clone() for w in projection_weights(unet)]

    table = bench.encode_table(tokenizer, encoder, [q for p in pairs for q in (p.old, p.new)])
    c_oo, c_no, _, _ = bench.statistics(tokenizer, table, concepts)
    exact, _ = bench.exact_solution(original, c_oo, c_no, P, lam, s)

    mace.refine(pipe, pairs, lam=lam, preserve=P, preserve_scale=s)
    project = [w.clone() for w in projection_weights(unet)]
    set_projection_weights(unet, original)

    cache = bench.domain_cache_layers([lin for _, lin in cross_attention_projections(unet)], C)
    stored = bench.original_refinement(encoder, tokenizer, unet, concepts, cache, lamb=lam,
                                       train_preserve_scale=scale, preserve_weight=weight)
    restated = [w.clone() for w in projection_weights(unet)]
    assert stored > 0

    unedited = bench.errors(original, exact, original)["rel_error_of_edit"]
    assert unedited == 1.0
    project_err = bench.errors(project, exact, original)
    restated_err = bench.errors(restated, exact, original)
    assert project_err["max_layer_rel_error"] < 1e-6, project_err
    assert restated_err["rel_error_of_edit"] < 1e-2, restated_err  # float32 torch.inverse
    # Without the preservation term, or without the ridge, the solution is far from this one
    # (about 1x the edit): the tolerances can tell.
    for lam_, s_ in ((lam, 0.0), (0.0, s)):
        other, _ = bench.exact_solution(original, c_oo, c_no, P, lam_, s_)
        assert bench.errors(other, exact, original)["rel_error_of_edit"] > 0.3
