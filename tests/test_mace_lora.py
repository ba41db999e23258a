import pytest
import torch

import mace
from mace.stages.lora import (
    AttentionTargets,
    LoraTrainingHooks,
    MultiConceptLoRA,
    concept_token_mask,
    importance_weights,
    sample_timesteps,
    train_step,
)


def test_importance_weights_favour_200_to_400():
    w = importance_weights()
    assert abs(float(w.sum()) - 1) < 1e-12
    inside = float(w[200:401].sum())
    assert inside > 0.8  # most of the mass
    t = sample_timesteps(4000, 1000, True, torch.Generator().manual_seed(0))
    assert 0.75 < float(((t >= 200) & (t <= 400)).float().mean()) < 0.9
    # The paper's f(t) = sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400)), normalised.
    steps = torch.arange(1000, dtype=torch.float64)
    f = torch.sigmoid(0.05 * (steps - 200)) - torch.sigmoid(0.05 * (steps - 400))
    torch.testing.assert_close(w, f / f.sum(), rtol=1e-12, atol=1e-15)
    assert int(w.argmax()) in (299, 300) and float(w[0]) < 1e-3 * float(w.max())
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < 1000
    # Without importance sampling: uniform over [0, 1000), about 20% in [200, 400].
    u = sample_timesteps(4000, 1000, False, torch.Generator().manual_seed(0))
    assert 0 <= int(u.min()) and int(u.max()) < 1000
    assert 0.17 < float(((u >= 200) & (u <= 400)).float().mean()) < 0.23


# The value projection of the last attn2 layer the tiny UNet runs (the up blocks run after the
# mid block, whatever the order of the module list): no attention map depends on it.
LAST_VALUE = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"


def _batch(pipe, concepts, per_concept, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts, names, masks = [], [], []
    for concept, mapping, kind in concepts:
        for pair in mace.concept_prompt_pairs(concept, mapping, kind, aug_length=per_concept, seed=seed):
            prompts.append(pair.old)
            names.append(concept)
            mask = (torch.rand(1, 32, 32, generator=g) > 0.5).float() if kind != "style" else torch.ones(1, 32, 32)
            masks.append(mask)
    n = len(prompts)
    emb = mace.encode_prompts(pipe, prompts)
    latents = torch.randn(n, 4, 32, 32, generator=g)
    noise = torch.randn(n, 4, 32, 32, generator=g)
    t = sample_timesteps(n, 1000, True, g)
    tokens = concept_token_mask(pipe.tokenizer, prompts, names, use_pooler=True)
    return emb, latents, noise, t, tokens, torch.stack(masks)


def _single_concept_copy(unet, lora, k: int) -> MultiConceptLoRA:
    """A one-concept MultiConceptLoRA holding concept k's weights of ``lora``."""
    single = MultiConceptLoRA(unet, 1, rank=lora.A[0].shape[1])
    with torch.no_grad():
        for dst, src in zip(list(single.A) + list(single.B), list(lora.A) + list(lora.B), strict=True):
            dst.copy_(src[k:k + 1])
    return single


def _randomise(lora, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(lora.A) + list(lora.B):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_batched_step_equals_separate_single_concept_steps(tiny_pipe, backend, monkeypatch):
    monkeypatch.setenv("MACE_KERNELS_BACKEND", backend)
    unet, sched = tiny_pipe.unet, tiny_pipe.scheduler
    concepts = [("Emma Stone", "a person", "celebrity"), ("Van Gogh", "art", "style"), ("ship", "ground", "object")]
    per = 2
    emb, latents, noise, t, tokens, masks = _batch(tiny_pipe, concepts, per)

    lora = MultiConceptLoRA(unet, len(concepts), rank=2)
    _randomise(lora, 1)
    hooks = LoraTrainingHooks(unet, lora)
    targets = AttentionTargets(tokens, masks, [per] * len(concepts))
    batched_loss = train_step(unet, hooks, sched, latents, emb, targets, noise, t)
    hooks.remove()

    total = 0.0
    for k in range(len(concepts)):
        single = _single_concept_copy(unet, lora, k)
        h = LoraTrainingHooks(unet, single)
        rows = slice(k * per, (k + 1) * per)
        loss = train_step(unet, h, sched, latents[rows], emb[rows], AttentionTargets(tokens[rows], masks[rows], [per]),
                          noise[rows], t[rows])
        h.remove()
        total += float(loss)
        for p_batched, p_single in zip(list(lora.A) + list(lora.B), list(single.A) + list(single.B), strict=True):
            # The last attn2 layer's value LoRA cannot change any attention map: no gradient.
            assert (p_batched.grad is None) == (p_single.grad is None)
            if p_batched.grad is not None:
                torch.testing.assert_close(p_batched.grad[k], p_single.grad[0], rtol=1e-4, atol=1e-6)
    assert abs(float(batched_loss) - total) < 1e-4 * total
    assert any(float(p.grad.abs().max()) > 0 for p in lora.A)
    # Exactly the last attn2 layer's value LoRA has no gradient; every other one has a nonzero one.
    last_value = lora.names.index(LAST_VALUE)
    for params in (lora.A, lora.B):
        assert [i for i, p in enumerate(params) if p.grad is None] == [last_value]
        assert all(float(p.grad.abs().max()) > 0 for i, p in enumerate(params) if i != last_value)


def test_hooks_remove_restores_the_model(tiny_pipe):
    unet = tiny_pipe.unet
    before = {n: type(m.processor) for n, m in unet.named_modules() if n.endswith("attn2")}
    originals = {n: m.processor for n, m in unet.named_modules() if n.endswith("attn2")}
    assert len(originals) == 7
    hooks = LoraTrainingHooks(unet, MultiConceptLoRA(unet, 2, rank=1))
    # While installed, every attn2 layer runs another processor ...
    assert all(m.processor is not originals[n] for n, m in unet.named_modules() if n.endswith("attn2"))
    hooks.remove()
    assert {n: type(m.processor) for n, m in unet.named_modules() if n.endswith("attn2")} == before
    # ... and removing them gives each layer back its own processor object.
    assert all(m.processor is originals[n] for n, m in unet.named_modules() if n.endswith("attn2"))


# --- prior preservation -------------------------------------------------------------------------

PRESERVE_PROMPT = "a photo of a dog"


def _with_prior(pipe, emb, latents, noise, t, num_concepts, per, seed=7):
    """The batch with per preservation samples after each concept's per samples."""
    g = torch.Generator().manual_seed(seed)
    n = num_concepts * per
    p_emb = mace.encode_prompts(pipe, [PRESERVE_PROMPT]).expand(n, -1, -1)
    p_latents = torch.randn(n, *latents.shape[1:], generator=g)
    p_noise = torch.randn(n, *latents.shape[1:], generator=g)
    p_t = sample_timesteps(n, 1000, True, g)

    def mix(a, b):
        return torch.cat([x for k in range(num_concepts) for x in (a[k * per:(k + 1) * per], b[k * per:(k + 1) * per])])

    return mix(emb, p_emb), mix(latents, p_latents), mix(noise, p_noise), mix(t, p_t)


def _grads(lora):
    return [None if p.grad is None else p.grad.clone() for p in list(lora.A) + list(lora.B)]


def test_targets_layout():
    targets = AttentionTargets(torch.zeros(3, 77, dtype=torch.bool), None, [1, 2], prior_sizes=[2, 1])
    assert targets.segment_sizes == [3, 3]
    assert targets.concept_rows().tolist() == [0, 3, 4]
    assert targets.prior_rows().tolist() == [1, 2, 5]
    assert AttentionTargets(torch.zeros(3, 77, dtype=torch.bool), None, [1, 2]).segment_sizes == [1, 2]


def test_batched_step_with_prior_preservation_equals_separate_steps(tiny_pipe):
    unet, sched = tiny_pipe.unet, tiny_pipe.scheduler
    concepts = [("Emma Stone", "a person", "celebrity"), ("Van Gogh", "art", "style"), ("ship", "ground", "object")]
    per, weight = 1, 0.5
    emb, latents, noise, t, tokens, masks = _batch(tiny_pipe, concepts, per)
    emb2, latents2, noise2, t2 = _with_prior(tiny_pipe, emb, latents, noise, t, len(concepts), per)

    lora = MultiConceptLoRA(unet, len(concepts), rank=2)
    _randomise(lora, 1)
    hooks = LoraTrainingHooks(unet, lora)
    targets = AttentionTargets(tokens, masks, [per] * len(concepts), prior_sizes=[per] * len(concepts))
    batched_loss = train_step(unet, hooks, sched, latents2, emb2, targets, noise2, t2, prior_loss_weight=weight)
    hooks.remove()
    # The preservation loss reaches every LoRA, the last value projection's included.
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in list(lora.A) + list(lora.B))

    total = 0.0
    for k in range(len(concepts)):
        single = _single_concept_copy(unet, lora, k)
        h = LoraTrainingHooks(unet, single)
        rows, concept_rows = slice(2 * k * per, 2 * (k + 1) * per), slice(k * per, (k + 1) * per)
        loss = train_step(unet, h, sched, latents2[rows], emb2[rows],
                          AttentionTargets(tokens[concept_rows], masks[concept_rows], [per], prior_sizes=[per]),
                          noise2[rows], t2[rows], prior_loss_weight=weight)
        h.remove()
        total += float(loss)
        for p_batched, p_single in zip(list(lora.A) + list(lora.B), list(single.A) + list(single.B), strict=True):
            torch.testing.assert_close(p_batched.grad[k], p_single.grad[0], rtol=1e-4, atol=1e-6)
    assert abs(float(batched_loss) - total) < 1e-4 * total


def test_prior_loss_is_attention_loss_plus_weighted_mse_of_the_fused_model(tiny_pipe):
    unet, sched = tiny_pipe.unet, tiny_pipe.scheduler
    assert sched.config.prediction_type == "epsilon"
    concepts = [("Emma Stone", "a person", "celebrity"), ("Van Gogh", "art", "style")]
    per, weight = 2, 30.0  # the attention loss covers the ~70 end-of-text positions
    emb, latents, noise, t, tokens, masks = _batch(tiny_pipe, concepts, per)
    emb2, latents2, noise2, t2 = _with_prior(tiny_pipe, emb, latents, noise, t, len(concepts), per)
    lora = MultiConceptLoRA(unet, len(concepts), rank=2)
    _randomise(lora, 3)

    hooks = LoraTrainingHooks(unet, lora)
    with_prior = train_step(unet, hooks, sched, latents2, emb2,
                            AttentionTargets(tokens, masks, [per] * 2, prior_sizes=[per] * 2), noise2, t2,
                            prior_loss_weight=weight)
    attention_only = train_step(unet, hooks, sched, latents, emb, AttentionTargets(tokens, masks, [per] * 2), noise, t)
    hooks.remove()

    # The preservation half alone, through each concept's LoRA fused into the weights, with the
    # UNet's own attention processors.
    modules = dict(unet.named_modules())
    mse = 0.0
    for k in range(len(concepts)):
        rows = slice((2 * k + 1) * per, (2 * k + 2) * per)
        with torch.no_grad():
            saved = {}
            for i, name in enumerate(lora.names):
                saved[name] = modules[name].weight.clone()
                modules[name].weight += lora.B[i][k] @ lora.A[i][k]
            noisy = sched.add_noise(latents2[rows], noise2[rows], t2[rows])
            prediction = unet(noisy, t2[rows], encoder_hidden_states=emb2[rows]).sample
            for name, w in saved.items():
                modules[name].weight.copy_(w)
        mse += float(((prediction - noise2[rows]) ** 2).mean())
    expected = float(attention_only) + weight * mse
    assert weight * mse > 0.1 * float(attention_only)  # both terms matter
    assert abs(float(with_prior) - expected) < 1e-4 * expected


def test_prior_loss_weight_zero_gives_the_gradients_without_preservation(tiny_pipe):
    unet, sched = tiny_pipe.unet, tiny_pipe.scheduler
    concepts = [("ship", "ground", "object"), ("Van Gogh", "art", "style")]
    per = 1
    emb, latents, noise, t, tokens, masks = _batch(tiny_pipe, concepts, per)
    emb2, latents2, noise2, t2 = _with_prior(tiny_pipe, emb, latents, noise, t, len(concepts), per)
    lora = MultiConceptLoRA(unet, len(concepts), rank=2)
    _randomise(lora, 5)
    hooks = LoraTrainingHooks(unet, lora)
    plain = train_step(unet, hooks, sched, latents, emb, AttentionTargets(tokens, masks, [per] * 2), noise, t)
    expected = _grads(lora)
    lora.zero_grad(set_to_none=True)
    zero = train_step(unet, hooks, sched, latents2, emb2, AttentionTargets(tokens, masks, [per] * 2, prior_sizes=[per] * 2),
                      noise2, t2, prior_loss_weight=0.0)
    hooks.remove()
    torch.testing.assert_close(zero, plain, rtol=1e-5, atol=0)
    for got, want in zip(_grads(lora), expected, strict=True):
        if want is None:
            assert got is None or float(got.abs().max()) == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_prediction_target_follows_the_scheduler():
    from diffusers import DDIMScheduler

    from mace.stages.lora import prediction_target

    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    assert prediction_target(DDIMScheduler(), latents, noise, t) is noise
    v = DDIMScheduler(prediction_type="v_prediction")
    torch.testing.assert_close(prediction_target(v, latents, noise, t), v.get_velocity(latents, noise, t))
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_target(DDIMScheduler(prediction_type="sample"), latents, noise, t)


def _image(path, size, color=(200, 30, 30)):
    from PIL import Image

    Image.new("RGB", (size, size), color).save(path)


def test_preservation_images_are_pngs_and_jpgs_resized(tmp_path):
    from mace.stages.lora_training import load_preservation_images

    _image(tmp_path / "b.png", 40)
    _image(tmp_path / "a.JPG", 100, (0, 0, 255))
    _image(tmp_path / "c.jpeg", 64)
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_preservation_images(tmp_path, 32)
    assert images.shape == (3, 3, 32, 32)
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    assert torch.allclose(images[0, 2], torch.ones(32, 32), atol=0.02)  # a.JPG first: blue
    assert load_preservation_images(tmp_path, 16, max_images=2).shape == (2, 3, 16, 16)
    # Sorted by name (a.JPG, b.png, c.jpeg), each filled with its own colour scaled to [-1, 1].
    for image, rgb in zip(images, [(0, 0, 255), (200, 30, 30), (200, 30, 30)], strict=True):
        expected = torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, 32, 32) / 127.5 - 1
        assert torch.allclose(image, expected, atol=0.03), rgb
    torch.testing.assert_close(load_preservation_images(tmp_path, 16, max_images=2)[:, :, 0, 0], images[:2, :, 0, 0],
                               atol=0.03, rtol=0)  # the first two


def _prior_config(**changes):
    body = dict(multi_concept=[["ship", "object"]], mapping_concept=["ground"], pretrained_model_name_or_path="builtin:tiny",
                with_prior_preservation=True, preserve_prompt="a photo of a dog")
    body.update(changes)
    return body


def test_prior_preservation_config_errors(tmp_path):
    from mace.config import ConfigError, config_from_dict

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    full = tmp_path / "full"
    full.mkdir()
    _image(full / "0.png", 64)
    cases = [
        (dict(preserve_data_dir=str(full), preserve_prompt=None), "needs preserve_prompt"),
        (dict(preserve_data_dir=str(full), preserve_prompt="  "), "needs preserve_prompt"),
        (dict(), "needs preserve_data_dir"),
        (dict(preserve_data_dir=str(tmp_path / "missing")), "is not a folder"),
        (dict(preserve_data_dir=str(empty)), "holds no PNG/JPG images"),
        (dict(preserve_data_dir=str(full), prior_loss_weight=-1.0), "prior_loss_weight must be >= 0"),
    ]
    for changes, message in cases:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(_prior_config(**changes))
    assert config_from_dict(_prior_config(preserve_data_dir=str(full))).preserve_data_dir == str(full)
    # Off: the original files' preservation keys need not point anywhere.
    config_from_dict(_prior_config(with_prior_preservation=False, preserve_data_dir="data/a person"))


def _prepared(tmp_path, pipe, names):
    import numpy as np
    from PIL import Image

    from mace.stages.prepare import concept_folders

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rng = np.random.default_rng(0)
    concepts = []
    for name in names:
        images, masks = concept_folders(tmp_path / "data", name)
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / "0.png")
        Image.fromarray((rng.random((size, size)) > 0.5).astype(np.uint8) * 255, mode="L").save(masks / "0.png")
        concepts.append((name, "object", mace.concept_prompt_pairs(name, "a thing", "object", aug_length=3)))
    return concepts, size


def test_train_concept_loras_with_prior_preservation(tiny_pipe, tmp_path):
    from safetensors.torch import load_file

    from mace.config import ConfigError
    from mace.stages.lora_training import LoraTrainingSettings, train_concept_loras

    concepts, size = _prepared(tmp_path, tiny_pipe, ["ship", "tower"])
    keep = tmp_path / "keep"
    keep.mkdir()
    _image(keep / "0.png", size)
    _image(keep / "1.jpg", size * 2, (20, 160, 40))
    common = dict(rank=1, learning_rate=1e-3, max_train_steps=1, train_batch_size=1,
                  importance_sampling=True, use_pooler=True, concepts_per_batch=2, resolution=size, seed=0)
    where = dict(input_data_dir=tmp_path / "data", progress=False)

    # Errors come before any training (the settings refuse them).
    with pytest.raises(ConfigError, match="is not a folder"):
        LoraTrainingSettings(**common, with_prior_preservation=True, preserve_prompt="a photo",
                             preserve_data_dir=tmp_path / "missing")
    with pytest.raises(ConfigError, match="needs preserve_prompt"):
        LoraTrainingSettings(**common, with_prior_preservation=True, preserve_data_dir=keep)
    assert not (tmp_path / "bad").exists()

    plain = train_concept_loras(tiny_pipe, concepts, LoraTrainingSettings(**common), output_dir=tmp_path / "plain", **where)
    prior = train_concept_loras(tiny_pipe, concepts, LoraTrainingSettings(**common, with_prior_preservation=True,
                                preserve_prompt=PRESERVE_PROMPT, preserve_data_dir=keep, prior_loss_weight=1.0),
                                output_dir=tmp_path / "prior", **where)
    assert sorted(plain.files) == sorted(prior.files) == ["ship", "tower"]
    plain, prior = [plain.files[c] for c in ("ship", "tower")], [prior.files[c] for c in ("ship", "tower")]
    assert len(prior) == 2
    last_value = f"unet.{LAST_VALUE}.lora_B.weight"
    for a, b in zip(plain, prior, strict=True):
        w_plain, w_prior = load_file(str(a)), load_file(str(b))
        ups = [k for k in w_prior if "lora_B" in k]
        assert ups and all(torch.isfinite(w_prior[k]).all() for k in w_prior)
        assert len(ups) == 14 and sorted(w_plain) == sorted(w_prior)
        # After one step, a LoRA up weight moves iff it has a gradient: the attention loss leaves
        # the last value projection alone, the preservation loss does not.
        assert all(float(w_prior[k].abs().max()) > 0 for k in ups)
        assert any(float(w_plain[k].abs().max()) == 0 for k in ups)
        assert [k for k in ups if float(w_plain[k].abs().max()) == 0] == [last_value]


def test_preservation_penalty_is_the_relative_squared_change_on_the_preserved_tokens(tiny_pipe):
    from mace.pipelines.components import projection_weights

    lora = MultiConceptLoRA(tiny_pipe.unet, 3, 2, seed=1)
    _randomise(lora, seed=2)
    tokens = torch.randn(40, lora.A[0].shape[-1], generator=torch.Generator().manual_seed(3))
    P = tokens.T @ tokens
    weights = projection_weights(tiny_pipe.unet)
    norms = [(tokens @ w.T).pow(2).sum() for w in weights]
    got = lora.preservation_penalty(P, norms)
    for k in range(3):
        want = sum((tokens @ (b[k] @ a[k]).T).pow(2).sum() / n for a, b, n in zip(lora.A, lora.B, norms, strict=True))
        torch.testing.assert_close(got[k], want.detach(), rtol=1e-4, atol=1e-6)
    # Each concept's penalty depends on its own LoRA only (batched steps stay per concept).
    got[1].backward()
    assert all(float(p.grad[[0, 2]].abs().max()) == 0 and float(p.grad[1].abs().max()) > 0 for p in lora.A)


def test_lora_preserve_scale_makes_loras_leave_the_preserved_tokens_alone(tiny_pipe, tmp_path):
    """With the penalty, the LoRA changes the preserved prompts' keys/values far less, and the
    fingerprint covers the preservation statistic."""
    from mace.config import ConfigError
    from mace.pipelines.components import cross_attention_projections, encode_prompts, projection_weights
    from mace.pipelines.lora_io import read_lora
    from mace.stages.lora_training import LoraTrainingSettings, expected_fingerprints, train_concept_loras

    concepts, size = _prepared(tmp_path, tiny_pipe, ["ship"])
    kept = encode_prompts(tiny_pipe, ["a photo of a tree", "a red car", "a bowl of soup"]).reshape(-1, 64)
    P = kept.T @ kept
    common = dict(rank=1, learning_rate=5e-2, max_train_steps=6, train_batch_size=1, importance_sampling=True,
                  use_pooler=True, resolution=size, seed=0)
    names = [n for n, _ in cross_attention_projections(tiny_pipe.unet)]
    weights = projection_weights(tiny_pipe.unet)

    def change(settings, out, preserve=None):
        result = train_concept_loras(tiny_pipe, concepts, settings, input_data_dir=tmp_path / "data", output_dir=tmp_path / out,
                                     progress=False, preserve=preserve)
        lora = read_lora(result.files["ship"], names)
        return sum(float((kept @ (B @ A).T).pow(2).sum() / (kept @ w.T).pow(2).sum())
                   for (A, B), w in zip((lora[n] for n in names), weights, strict=True)), result

    free, free_result = change(LoraTrainingSettings(**common), "free")
    held, held_result = change(LoraTrainingSettings(**common, preserve_scale=100.0), "held", P)
    assert free > 0 and held < 0.2 * free
    assert free_result.fingerprints["ship"] != held_result.fingerprints["ship"]
    other = expected_fingerprints(tiny_pipe, concepts, LoraTrainingSettings(**common, preserve_scale=100.0),
                                  tmp_path / "data", 2 * P)
    assert other["ship"] != held_result.fingerprints["ship"]  # another statistic: another LoRA
    with pytest.raises(ConfigError, match="needs a preservation cache"):
        train_concept_loras(tiny_pipe, concepts, LoraTrainingSettings(**common, preserve_scale=1.0),
                            input_data_dir=tmp_path / "data", output_dir=tmp_path / "none", progress=False)


def _scalar_reads(pipe, concepts, size, data_dir, out, steps, progress, monkeypatch):
    """Which functions read a tensor's value back to Python (a device sync on a GPU) inside the
    training loop, by the innermost frame in mace, mace_kernels or torch.optim."""
    import collections
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from mace.stages import lora_training
    reads: collections.Counter = collections.Counter()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                frames = [f for f in traceback.extract_stack()
                          if any(part in f.filename for part in ("/mace/", "/mace_kernels/", "/torch/optim/"))]
                reads[frames[-1].name if frames else "?"] += 1
            return func(*args, **(kwargs or {}))

    loop = getattr(lora_training._train_group, "__wrapped__", lora_training._train_group)

    def recorded(*args, **kwargs):
        with Recorder():
            return loop(*args, **kwargs)

    recorded.__wrapped__ = loop  # a second call wraps the loop itself, not this wrapper

    monkeypatch.setattr(lora_training, "_train_group", recorded)
    settings = lora_training.LoraTrainingSettings(rank=1, learning_rate=1e-3, max_train_steps=steps, train_batch_size=1,
                                                  importance_sampling=True, use_pooler=True, concepts_per_batch=2,
                                                  resolution=size, seed=0)
    lora_training.train_concept_loras(pipe, concepts, settings, input_data_dir=data_dir, output_dir=out, progress=progress)
    return reads


def test_a_training_step_reads_back_only_host_values(tiny_pipe, tmp_path, monkeypatch):
    """Profiled on the CPU: per step, the values read back to Python are the sampler's index
    draws (CPU generators) and the optimiser's step counters (CPU tensors), none from the
    model's outputs (lora_apply takes its segment lengths as a list of ints, so it reads none);
    the loss is read (one device sync per step) only when the progress bar shows it."""
    concepts, size = _prepared(tmp_path, tiny_pipe, ["ship", "tower"])
    data = tmp_path / "data"
    quiet = _scalar_reads(tiny_pipe, concepts, size, data, tmp_path / "a", 2, False, monkeypatch)
    assert set(quiet) <= {"_sample_batch", "_single_tensor_adam", "_multi_tensor_adam",
                          "_get_value", "_fused_adam", "adamw", "adam"}, quiet
    assert quiet["_sample_batch"] == 2 * 2  # one image index per concept and step
    shown = _scalar_reads(tiny_pipe, concepts, size, data, tmp_path / "b", 2, True, monkeypatch)
    assert {k: shown[k] - quiet[k] for k in shown if shown[k] != quiet[k]} == {"_train_group": 2}


def test_the_preservation_term_is_part_of_the_one_loss_train_step_optimises(tiny_pipe):
    """lora_preserve_scale's term lives in train_step's loss: the loss returned (and logged) is
    attention loss + scale * penalty, and its gradient is the sum of both terms' gradients,
    at any loss_scale (gradient accumulation adds it once per optimiser step)."""
    from mace.stages.lora import LoraPreservation

    unet, sched = tiny_pipe.unet, tiny_pipe.scheduler
    concepts = [("Emma Stone", "a person", "celebrity"), ("ship", "ground", "object")]
    emb, latents, noise, t, tokens, masks = _batch(tiny_pipe, concepts, 1)
    kept = torch.randn(30, emb.shape[-1], generator=torch.Generator().manual_seed(4))
    lora = MultiConceptLoRA(unet, 2, rank=2)
    _randomise(lora, 5)
    preservation = LoraPreservation.for_unet(unet, lora, kept.T @ kept, scale=3.0)

    def grads_and_loss(with_term: bool, loss_scale: float = 1.0):
        lora.zero_grad(set_to_none=True)
        with LoraTrainingHooks(unet, lora) as hooks:
            loss = train_step(unet, hooks, sched, latents, emb, AttentionTargets(tokens, masks, [1, 1]), noise, t,
                              loss_scale=loss_scale, preservation=preservation if with_term else None)
        return [None if p.grad is None else p.grad.clone() for p in list(lora.A) + list(lora.B)], loss

    plain_grads, plain = grads_and_loss(False)
    both_grads, both = grads_and_loss(True)
    term = preservation.loss()
    assert float(term) > 0
    torch.testing.assert_close(both, plain + term.detach())
    lora.zero_grad(set_to_none=True)
    term.backward()
    for g_both, g_plain, p in zip(both_grads, plain_grads, list(lora.A) + list(lora.B), strict=True):
        expected = p.grad if g_plain is None else g_plain + p.grad
        torch.testing.assert_close(g_both, expected, rtol=1e-5, atol=1e-8)
    # Two micro-steps at loss_scale 1/2 give the single step's gradient.
    half_grads, _ = grads_and_loss(True, 0.5)
    for g_half, g_both in zip(half_grads, both_grads, strict=True):
        torch.testing.assert_close(2 * g_half, g_both, rtol=1e-5, atol=1e-8)
