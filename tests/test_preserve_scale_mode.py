"""preserve_scale_mode: per_token, the preservation weights that carry across concept counts and
cache sizes (MACEConfig's comment gives the formula), against the absolute default."""

from dataclasses import replace

import pytest
import torch

import mace
from mace.closed_form import LoraStack, fuse_weights_streamed, refine_weights_streamed
from mace.config import ConfigError, load_config
from mace.stages.cache import PreservationSettings
from mace.stages.fusion import FusionSettings
from mace.stages.refinement import RefinementSettings
from mace.utils.fingerprint import digest

D, OUTS = 12, (7, 5)


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(out, D, generator=g, dtype=torch.float64) for out in OUTS]
    old = torch.randn(9, D, generator=g, dtype=torch.float64)
    new = torch.randn(9, D, generator=g, dtype=torch.float64)
    kept = torch.randn(40, D, generator=g, dtype=torch.float64)
    return weights, old, new, kept


def _rel(a, b):
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_per_token_refinement_is_the_absolute_solve_with_the_counted_scale(method):
    weights, old, new, kept = _problem()
    mean_p = kept.T @ kept / len(kept)
    per_token, _ = refine_weights_streamed(weights, [(old, new)], lam=0.1, preserve=mean_p, preserve_scale=0.3,
                                           method=method, preserve_per_token=True)
    absolute, _ = refine_weights_streamed(weights, [(old, new)], lam=0.1, preserve=mean_p, preserve_scale=0.3 * len(old),
                                          method=method)
    assert _rel(per_token, absolute) < 1e-12
    plain, _ = refine_weights_streamed(weights, [(old, new)], lam=0.1, preserve=mean_p, preserve_scale=0.3, method=method)
    assert _rel(per_token, plain) > 1e-2  # the count changed the solve


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_per_token_refinement_does_not_move_when_the_erased_set_repeats(method):
    """Erasing the same pairs three times over (three times the erased tokens) leaves the
    per-token solve where it was; the absolute one gives the preserved tokens a third of the say."""
    weights, old, new, kept = _problem(1)
    mean_p = kept.T @ kept / len(kept)
    results = {}
    for per_token in (True, False):
        once, _ = refine_weights_streamed(weights, [(old, new)], lam=0.0, preserve=mean_p, preserve_scale=0.5,
                                          method=method, preserve_per_token=per_token)
        thrice, _ = refine_weights_streamed(weights, [(old, new)] * 3, lam=0.0, preserve=mean_p, preserve_scale=0.5,
                                            method=method, preserve_per_token=per_token)
        results[per_token] = _rel(thrice, once)
    assert results[True] < 1e-10
    assert results[False] > 1e-2


def _loras(n: int, seed: int = 2) -> LoraStack:
    g = torch.Generator().manual_seed(seed)
    return LoraStack([torch.randn(n, 1, D, generator=g, dtype=torch.float64) for _ in OUTS],
                     [0.3 * torch.randn(n, out, 1, generator=g, dtype=torch.float64) for out in OUTS])


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_per_token_fusion_counts_every_concepts_tokens(method):
    weights, old, _, kept = _problem(3)
    mean_p = kept.T @ kept / len(kept)
    loras = _loras(2)
    batches = [(0, old[:4]), (1, old[4:]), (0, old[:2])]  # 11 tokens over two concepts
    per_token, _ = fuse_weights_streamed(weights, loras, batches, lam=0.1, preserve=mean_p, preserve_scale=0.2,
                                         method=method, preserve_per_token=True)
    absolute, _ = fuse_weights_streamed(weights, loras, batches, lam=0.1, preserve=mean_p, preserve_scale=0.2 * 11,
                                        method=method)
    assert _rel(per_token, absolute) < 1e-12
    # The same concepts fused with every prompt twice: the per-token solve stays (lam 0).
    twice = batches + batches
    a, _ = fuse_weights_streamed(weights, loras, batches, lam=0.0, preserve=mean_p, preserve_scale=0.2, method=method,
                                 preserve_per_token=True)
    b, _ = fuse_weights_streamed(weights, loras, twice, lam=0.0, preserve=mean_p, preserve_scale=0.2, method=method,
                                 preserve_per_token=True)
    assert _rel(b, a) < 1e-10


@pytest.fixture(scope="module")
def caches(tiny_path):
    pipe = mace.load_pipeline(tiny_path)
    prompts = [f"a photo of a {w} on a table" for w in ("cat", "dog", "cup", "book", "lamp", "shoe")]
    once = mace.build_preservation_cache(pipe, prompts, tiny_path.parent / "keep-once.safetensors", progress=False)
    mace.build_preservation_cache(pipe, prompts * 2, tiny_path.parent / "keep-twice.safetensors", progress=False)
    mace.build_preservation_cache(pipe, ["a painting", "a dog"], tiny_path.parent / "prior.safetensors", progress=False)
    # The same statistic written as twice the prompts, bit for bit (the encoded cache above
    # differs from it by the float32 statistics' rounding, 3e-7).
    replace(once, cov=2 * once.cov, tokens=2 * once.tokens, prompts=2 * once.prompts).save(
        tiny_path.parent / "keep-doubled.safetensors")
    return pipe, tiny_path.parent


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    return float((a - b).norm() / b.norm()) < tol


def test_per_token_matrix_is_the_weighted_mean_of_the_caches(caches):
    pipe, folder = caches
    once, twice, prior = (str(folder / f) for f in ("keep-once.safetensors", "keep-twice.safetensors", "prior.safetensors"))
    a = PreservationSettings(prior, once, preserve_weight=3.0, per_token=True).matrix(pipe)
    b = PreservationSettings(prior, twice, preserve_weight=3.0, per_token=True).matrix(pipe)
    # A cache of the same prompts twice over: the same P (to the float32 statistics' rounding).
    assert _close(a, b)
    c_prior, c_once = (mace.load_preservation_cache(p) for p in (prior, once))
    expected = c_prior.cov / c_prior.tokens + 3.0 * c_once.cov / c_once.tokens
    assert _close(a, expected, 1e-12)
    absolute = PreservationSettings(prior, twice, preserve_weight=3.0).matrix(pipe)
    assert _close(absolute, c_prior.cov + 6.0 * c_once.cov)  # the absolute sum doubles
    assert not _close(a, absolute, 1e-1)


def test_per_token_refine_on_a_pipeline_ignores_repeats_and_cache_size(caches, tiny_path):
    _, folder = caches
    pairs = mace.concept_prompt_pairs("Emma Stone", "a person", "celebrity", aug_length=3)

    def refined(pairs, cache, per_token, lam):
        pipe = mace.load_pipeline(tiny_path).to(torch.float64)
        preserve = PreservationSettings(domain_cache=str(folder / cache), preserve_weight=1.0, per_token=per_token)
        mace.refine(pipe, pairs, lam=lam, preserve=preserve.matrix(pipe), preserve_scale=0.5,
                    preserve_per_token=per_token)
        return [lin.weight.detach().clone() for _, lin in mace.cross_attention_projections(pipe.unet)]

    for per_token, moves in ((True, False), (False, True)):
        # The erased prompts twice over (lamb 0: nothing else counts tokens).
        base = refined(pairs, "keep-once.safetensors", per_token, 0.0)
        assert (_rel(refined(pairs * 2, "keep-once.safetensors", per_token, 0.0), base) > 1e-3) == moves
        # A cache of its prompts twice over.
        change = _rel(refined(pairs, "keep-doubled.safetensors", per_token, 0.0), base)
        assert change > 1e-3 if moves else change < 1e-10


def _config(tmp_path, **extra):
    lines = ["multi_concept: [[Emma Stone, celebrity], [ship, object]]", "mapping_concept: a person",
             "train_preserve_scale: 3.0", "fuse_preserve_scale: 2.0", "max_memory: 1"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path = tmp_path / "c.yaml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path)


def test_config_reads_the_mode_and_its_scales(tmp_path):
    absolute = _config(tmp_path)
    per_token = _config(tmp_path, preserve_scale_mode="per_token")
    # Absolute: the original's effective scales (beyond max_memory concepts, train_preserve_scale once, twice).
    assert RefinementSettings.from_config(absolute).preserve_scale == 3.0
    assert FusionSettings.from_config(absolute).preserve_scale == 3.0
    # Per token: each stage's own scale, once, whatever max_memory; the caches as means.
    refine, fuse = RefinementSettings.from_config(per_token), FusionSettings.from_config(per_token)
    assert (refine.preserve_scale, fuse.preserve_scale) == (3.0, 2.0)
    assert refine.preserve_per_token and fuse.preserve_per_token and refine.preserve.per_token
    # The resume fingerprints differ: a stage finished under one mode is never reused under the other.
    assert digest({"s": RefinementSettings.from_config(absolute)}) != digest({"s": refine})
    assert refine.preserve.identity() != RefinementSettings.from_config(absolute).preserve.identity()


def test_unknown_mode_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="preserve_scale_mode must be 'absolute' or 'per_token', got 'per-token'"):
        _config(tmp_path, preserve_scale_mode="per-token")


def test_count_exponent_divides_both_scales_by_the_concept_count_to_that_power(tmp_path):
    """preserve_count_exponent: with 4 erased concepts and exponent 0.5 both per-token scales
    halve (exponent 1: per concept's tokens, a quarter); the fingerprints change with it."""
    from mace.config import config_from_dict

    def four(**extra):
        return config_from_dict({"multi_concept": [["Emma Stone", "celebrity"], ["ship", "object"], ["tower", "object"],
                                                   ["Van Gogh", "style"]], "mapping_concept": "a thing",
                                 "train_preserve_scale": 3.0, "fuse_preserve_scale": 2.0,
                                 "preserve_scale_mode": "per_token", **extra}, check_paths=False)

    plain, half, whole = four(), four(preserve_count_exponent=0.5), four(preserve_count_exponent=1)
    for config, factor in ((plain, 1.0), (half, 0.5), (whole, 0.25)):
        assert RefinementSettings.from_config(config).preserve_scale == pytest.approx(3.0 * factor)
        assert FusionSettings.from_config(config).preserve_scale == pytest.approx(2.0 * factor)
    assert digest({"s": RefinementSettings.from_config(plain)}) != digest({"s": RefinementSettings.from_config(half)})
    with pytest.raises(ConfigError, match="preserve_count_exponent must be between 0 and 1, got 2"):
        _config(tmp_path, preserve_scale_mode="per_token", preserve_count_exponent=2)
    with pytest.raises(ConfigError, match="preserve_count_exponent needs preserve_scale_mode: per_token"):
        _config(tmp_path, preserve_count_exponent=0.5)
