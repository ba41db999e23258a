"""The fast closed-form refinement and fusion equal the paper-literal reference."""

import pytest
import torch

import mace
from mace.closed_form import LoraStack, fuse_weights, refine_weights
from mace_kernels import NotPositiveDefiniteError, SPDJitterWarning

SD14_OUT = [320] * 2 + [640] * 2 + [1280] * 3 + [1280] * 3 + [640] * 3 + [320] * 3  # 16 attn2 layers


def _rel(a, b):
    assert len(a) == len(b) > 0, (len(a), len(b))  # zip would silently compare fewer layers
    return max(float((x.double() - y.double()).norm() / y.double().norm()) for x, y in zip(a, b))


def _refine_residual(W2, W, old, new, lam, P=None, s=0.0):
    """Relative gradient of sum ||W2 e_o - W e_n||^2 + lam ||W2 - W||^2 + s sum_p ||(W2 - W) e_p||^2
    at W2: zero at the minimiser (the normal equations), written out here, not by mace."""
    grad = (old @ W2.T - new @ W.T).T @ old + lam * (W2 - W)
    if P is not None:
        grad = grad + s * (W2 - W) @ P
    return float(grad.norm() / ((new @ W.T).T @ old).norm())


def _fuse_residual(W2, W, deltas, covs, lam, P=None, s=0.0, W0=None):
    """Relative gradient of sum_i sum_e ||W2 e - (W + dW_i) e||^2 + lam ||W2 - W||^2
    + s sum_p ||W2 e_p - W0 e_p||^2 at W2 (C_i = sum e e^T of concept i's tokens)."""
    grad = lam * (W2 - W)
    scale = 0.0
    for dW, C in zip(deltas, covs, strict=True):
        grad = grad + (W2 - W - dW) @ C
        scale = scale + float((dW @ C).norm())
    if P is not None:
        grad = grad + s * (W2 - (W if W0 is None else W0)) @ P
    return float(grad.norm()) / scale


def _pairs():
    return [p for c in ("Emma Stone", "Van Gogh", "ship") for p in
            mace.concept_prompt_pairs(c, "a person", "celebrity", aug_length=4)]


def _weights(pipe, dtype=torch.float64):
    return [lin.weight.detach().to(dtype).clone() for _, lin in mace.cross_attention_projections(pipe.unet)]


@pytest.fixture(scope="module")
def preserve(tiny_path):
    pipe = mace.load_pipeline(tiny_path)
    prompts = [f"a photo of a {w} on a table" for w in ("cat", "dog", "cup", "book", "lamp", "shoe")] * 4
    return mace.build_preservation_cache(pipe, prompts, tiny_path.parent / "coco.safetensors", progress=False)


@pytest.mark.parametrize("with_preserve", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_refine_fast_equals_reference_on_builtin(tiny_path, preserve, with_preserve, dtype, tol):
    results = {}
    for method in ("fast", "reference"):
        pipe = mace.load_pipeline(tiny_path).to(torch.float64)  # float64 weights: compare beyond fp32
        before = _weights(pipe)
        mace.refine(pipe, _pairs(), lam=0.5, preserve=preserve if with_preserve else None,
                    preserve_scale=1e-2 if with_preserve else 0.0, method=method, dtype=dtype)
        results[method] = _weights(pipe)
    assert _rel(results["fast"], results["reference"]) <= tol
    assert _rel(results["fast"], before) > 1e-3  # the edit did something
    if dtype == torch.float64:
        # Both methods against the objective itself: its gradient vanishes at the result.
        from mace.refinement import aligned_pair_tokens

        old, new = (t.double() for t in aligned_pair_tokens(pipe, _pairs()))
        P, s = (preserve.cov, 1e-2) if with_preserve else (None, 0.0)
        for w2, w in zip(results["fast"], before):
            assert _refine_residual(w2, w, old, new, 0.5, P, s) < 1e-8


def test_refinement_maps_old_tokens_onto_new_outputs(tiny_pipe):
    from mace.refinement import aligned_pair_tokens

    pairs = _pairs()
    old, new = aligned_pair_tokens(tiny_pipe, pairs)
    W = _weights(tiny_pipe)
    mace.refine(tiny_pipe, pairs, lam=1e-3)
    W2 = _weights(tiny_pipe)
    assert len(W) == len(W2) == 14
    old, new = old.double(), new.double()
    for w, w2 in zip(W, W2):
        before = (old @ w.T - new @ w.T).norm()
        after = (old @ w2.T - new @ w.T).norm()
        assert float(after) < 0.5 * float(before)  # measured 0.29: 900 tokens, 64 dimensions
        # W' is the minimiser: the gradient of the objective vanishes (normal equations).
        grad = (old @ w2.T - new @ w.T).T @ old + 1e-3 * (w2 - w)
        assert float(grad.norm()) < 1e-4 * float(((new @ w.T).T @ old).norm())


def _sd14_problem(n_concepts, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o, 768, generator=g, dtype=torch.float64) / 28 for o in SD14_OUT for _ in "kv"]
    tokens = [torch.randn(3 * 77, 768, generator=g, dtype=torch.float64) for _ in range(n_concepts)]
    A = [torch.randn(n_concepts, 1, 768, generator=g, dtype=torch.float64) / 28 for _ in weights]
    B = [torch.randn(n_concepts, w.shape[0], 1, generator=g, dtype=torch.float64) / 28 for w in weights]
    P = torch.randn(2000, 768, generator=g, dtype=torch.float64)
    return weights, tokens, LoraStack(A, B), P.T @ P


@pytest.mark.parametrize("with_preserve", [False, True])
def test_sd14_shaped_refine_and_fuse_fast_equal_reference(with_preserve):
    weights, tokens, loras, P = _sd14_problem(3)
    kw = dict(preserve=P, preserve_scale=1e-3) if with_preserve else {}
    old = torch.cat(tokens)
    new = old + 0.1 * torch.randn_like(old)
    fast, _ = refine_weights(weights, old, new, lam=0.1, method="fast", **kw)
    ref, _ = refine_weights(weights, old, new, lam=0.1, method="reference", **kw)
    assert _rel(fast, ref) <= 1e-6
    for i in (0, len(weights) - 1):  # the normal equations, on the first and last layer
        assert _refine_residual(fast[i], weights[i], old, new, 0.1, P if with_preserve else None, 1e-3) < 1e-8
    original = [w + 0.01 for w in weights] if with_preserve else None
    fast, _ = fuse_weights(weights, loras, tokens, lam=0.1, original=original, method="fast", **kw)
    ref, _ = fuse_weights(weights, loras, tokens, lam=0.1, original=original, method="reference", **kw)
    assert _rel(fast, ref) <= 1e-6
    covs = [t.T @ t for t in tokens]
    for i in (0, len(weights) - 1):
        deltas = [loras.B[i][k] @ loras.A[i][k] for k in range(3)]
        W0 = original[i] if original is not None else None
        assert _fuse_residual(fast[i], weights[i], deltas, covs, 0.1, P if with_preserve else None, 1e-3, W0) < 1e-8
    fast32, _ = fuse_weights(weights, loras, tokens, lam=0.1, original=original, method="fast", dtype=torch.float32, **kw)
    assert _rel(fast32, ref) <= 1e-3


def test_fuse_on_builtin_reads_diffusers_loras_and_saves_a_loadable_pipeline(tiny_path, tmp_path, preserve):
    from diffusers import StableDiffusionPipeline

    pipe = mace.load_pipeline(tiny_path).to(torch.float64)
    names = [(n, lin.weight.shape) for n, lin in mace.cross_attention_projections(pipe.unet)]
    g = torch.Generator().manual_seed(1)
    loras, prompts, raw = {}, {}, {}
    for i, concept in enumerate(["Emma Stone", "Van Gogh", "ship"]):
        lora = {n: (torch.randn(2, s[1], generator=g) * 0.1, torch.randn(s[0], 2, generator=g) * 0.1) for n, s in names}
        raw[concept] = lora
        mace.save_lora(tmp_path / f"lora{i}", lora, alpha=4.0)  # scale alpha / r = 2
        loras[concept] = tmp_path / f"lora{i}"
        prompts[concept] = [p.old for p in mace.concept_prompt_pairs(concept, "a person", "celebrity", aug_length=3)]
    results = {}
    for method in ("fast", "reference"):
        p = mace.load_pipeline(tiny_path).to(torch.float64)
        mace.fuse(p, loras, prompts, lam=0.3, preserve=preserve, preserve_scale=1e-2, method=method)
        results[method] = (p, _weights(p))
    assert _rel(results["fast"][1], results["reference"][1]) <= 1e-6
    # The fusion objective, written out here with each file's LoRA at its scale alpha / r = 2:
    # its gradient vanishes at the result (with scale 1 it would not: the files' alpha is read).
    base = _weights(mace.load_pipeline(tiny_path))
    covs = [e.T @ e for e in (mace.encode_prompts(pipe, prompts[c]).reshape(-1, 64).double() for c in loras)]
    for (name, _), w2, w in zip(names, results["fast"][1], base, strict=True):
        deltas = [2.0 * (raw[c][name][1] @ raw[c][name][0]).double() for c in loras]
        assert _fuse_residual(w2, w, deltas, covs, 0.3, preserve.cov, 1e-2) < 1e-6  # measured 1.4e-8; scale 1: 0.29
    # The fused pipeline saves as an ordinary diffusers folder that loads back with these weights.
    fused = results["fast"][0]
    fused.to(torch.float32).save_pretrained(tmp_path / "fused")
    back = StableDiffusionPipeline.from_pretrained(tmp_path / "fused")
    assert len(mace.cross_attention_projections(back.unet)) == len(results["fast"][1]) == 14
    for (_, a), b in zip(mace.cross_attention_projections(back.unet), results["fast"][1]):
        torch.testing.assert_close(a.weight.double(), b, rtol=1e-6, atol=1e-6)


def test_single_lora_is_reproduced_on_its_prompts(tiny_pipe, tmp_path):
    """With one concept and lam -> 0, fusion gives W* e = (W + dW) e for that concept's tokens."""
    names = [(n, lin.weight.shape) for n, lin in mace.cross_attention_projections(tiny_pipe.unet)]
    g = torch.Generator().manual_seed(2)
    lora = {n: (torch.randn(1, s[1], generator=g), torch.randn(s[0], 1, generator=g)) for n, s in names}
    prompts = {"ship": [p.old for p in mace.concept_prompt_pairs("ship", "ground", "object", aug_length=5)]}
    W = _weights(tiny_pipe)
    mace.fuse(tiny_pipe, {"ship": lora}, prompts, lam=1e-6)
    e = mace.encode_prompts(tiny_pipe, prompts["ship"]).reshape(-1, 64).double()
    assert len(W) == len(lora) == 14
    for (name, lin), w in zip(mace.cross_attention_projections(tiny_pipe.unet), W):
        A, B = lora[name]
        target = e @ (w + B.double() @ A.double()).T
        got = e @ lin.weight.detach().double().T
        assert float((got - target).norm() / target.norm()) < 1e-3


def test_external_peft_lora_scale_matches_diffusers_fuse(tiny_path, tmp_path):
    """A LoRA saved by diffusers from a peft adapter is read with the same scale diffusers applies."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = mace.load_pipeline(tiny_path)
    base = _weights(pipe)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=6, init_lora_weights="gaussian",
                                     target_modules=["attn2.to_k", "attn2.to_v", "attn1.to_q"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_()
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "ext", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata={"r": 2, "lora_alpha": 6, "target_modules": ["attn2.to_k", "attn2.to_v", "attn1.to_q"]})
    names = [n for n, _ in mace.cross_attention_projections(pipe.unet)]
    with pytest.warns(UserWarning, match="not cross-attention key/value"):
        read = mace.read_lora(tmp_path / "ext", names)
    ref = mace.load_pipeline(tiny_path)
    ref.load_lora_weights(tmp_path / "ext")
    ref.fuse_lora(lora_scale=1.0)
    assert sorted(read) == sorted(names) and len(base) == 14  # every attn2 to_k / to_v, nothing else
    for (name, lin), w in zip(mace.cross_attention_projections(ref.unet), base):
        A, B = read[name]
        torch.testing.assert_close((lin.weight.double() - w), (B @ A).double(), rtol=1e-4, atol=1e-5)


def test_lam_zero_with_few_tokens_is_an_error_not_noise(tiny_pipe):
    W = _weights(tiny_pipe)
    with pytest.raises(NotPositiveDefiniteError, match="not numerically positive definite"):
        mace.refine(tiny_pipe, [("a photo of Emma Stone", "a photo of a person")], lam=0.0)
    assert all(torch.equal(a, b) for a, b in zip(W, _weights(tiny_pipe)))  # nothing was written


def test_lam_zero_with_jitter_reports_it_and_stays_finite(tiny_pipe):
    with pytest.warns(SPDJitterWarning):
        report = mace.refine(tiny_pipe, [("a photo of Emma Stone", "a photo of a person")], lam=0.0, jitter=1e-6)
    assert report.jitter > 0
    assert all(torch.isfinite(w).all() for w in _weights(tiny_pipe))


def test_sdxl_refine_and_fuse_fast_equal_reference():
    """SDXL: 2048-wide-style context from two encoders (64 here); same factorisation."""
    results = {}
    for method in ("fast", "reference"):
        pipe = mace.load_pipeline("builtin:tiny-sdxl").to(torch.float64)
        mace.refine(pipe, _pairs(), lam=0.5, method=method)
        names = [(n, lin.weight.shape) for n, lin in mace.cross_attention_projections(pipe.unet)]
        g = torch.Generator().manual_seed(3)
        loras = {c: {n: (torch.randn(1, s[1], generator=g, dtype=torch.float64) * 0.1,
                         torch.randn(s[0], 1, generator=g, dtype=torch.float64) * 0.1) for n, s in names}
                 for c in ("ship", "Van Gogh")}
        prompts = {c: [f"a photo of {c}", f"a painting of {c}"] for c in loras}
        mace.fuse(pipe, loras, prompts, lam=0.3, method=method)
        results[method] = _weights(pipe)
    assert all(w.shape[1] == 64 for w in results["fast"])
    assert _rel(results["fast"], results["reference"]) <= 1e-6


def test_refinement_encodes_each_distinct_prompt_once(tiny_pipe, monkeypatch):
    import mace.refinement as refinement

    pairs = [p for c in ("Emma Stone", "Tom Hanks", "Brad Pitt")
             for p in mace.concept_prompt_pairs(c, "a person", "celebrity", aug_length=5, seed=0)]
    encoded = []
    real = refinement.encode_prompts

    def counting(pipe, prompts, batch_size=64):
        encoded.extend(prompts)
        return real(pipe, prompts, batch_size)

    monkeypatch.setattr(refinement, "encode_prompts", counting)
    got = refinement.aligned_pair_tokens(tiny_pipe, pairs)
    # 15 old prompts, and the new prompts of all three concepts are the same 5 templates at most
    # (the template choice depends on the concept's name): every distinct prompt exactly once.
    assert len(encoded) == len(set(encoded)) == len({p.old for p in pairs} | {p.new for p in pairs}) < 30
    # Rows are those of each prompt encoded on its own, at the aligned positions.
    tok, rows = tiny_pipe.tokenizer, 0
    for pair in pairs[:3]:
        po, pn = mace.align_tokens(tok(pair.old).input_ids, tok(pair.new).input_ids, tok.model_max_length)
        e_old, e_new = real(tiny_pipe, [pair.old])[0], real(tiny_pipe, [pair.new])[0]
        torch.testing.assert_close(got[0][rows:rows + len(po)], e_old[po], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1][rows:rows + len(pn)], e_new[pn], rtol=0, atol=1e-5)
        rows += len(po)
