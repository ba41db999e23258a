"""What the original MACE code computes, item by item (docs/fidelity.md)."""

import math
import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import mace
from mace.config import ConfigWarning, config_from_dict, config_warnings, load_config
from mace.erase import concept_pairs, erase
from mace.stages.fusion import FusionSettings
from mace.stages.lora import (
    AttentionTargets,
    LoraTrainingHooks,
    MultiConceptLoRA,
    clip_grad_norm_per_concept,
    concept_token_mask,
    train_step,
)
from mace.stages.lora_training import LoraTrainingSettings
from mace.stages.prepare import GenerationSettings, concept_data_files, generate_concept_data, load_concept_data
from mace.stages.refinement import RefinementSettings
from mace.utils.tokenizer import clip_tokenizer


def _config(**changes):
    body = {"multi_concept": [[["adam-driver", "celebrity"], ["ship", "object"]]], "mapping_concept": ["a person", "ground"],
            "pretrained_model_name_or_path": "builtin:tiny"}
    body.update(changes)
    return config_from_dict(body, check_paths=False)


# --- 1. use_pooler ------------------------------------------------------------------------------

def test_pooler_marks_end_of_text_and_padding_as_the_original():
    tok = clip_tokenizer()
    mask = concept_token_mask(tok, ["A photo of adam driver"], ["adam driver"], use_pooler=True)[0]
    assert int(mask.sum()) == 73  # "adam", "driver" and positions 6..76
    assert mask[4:].all() and not mask[:4].any()
    off = concept_token_mask(tok, ["A photo of adam driver"], ["adam driver"], use_pooler=False)[0]
    assert off.nonzero().flatten().tolist() == [4, 5]
    # Every occurrence of the name is marked.
    twice = concept_token_mask(tok, ["ship and another ship"], ["ship"], use_pooler=False)[0]
    assert twice.nonzero().flatten().tolist() == [1, 4]


def test_pooler_with_a_tokenizer_that_pads_with_bang_marks_the_end_token_only():
    """SD 2.x pads with '!': only the real end-of-text position holds its id."""
    tok = clip_tokenizer(pad_token="!")
    mask = concept_token_mask(tok, ["A photo of adam driver"], ["adam driver"], use_pooler=True)[0]
    assert mask.nonzero().flatten().tolist() == [4, 5, 6]


def test_sdxl_marks_by_its_first_tokenizer():
    pipe = mace.load_pipeline("builtin:tiny-sdxl")
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    mask = concept_token_mask(pipe.tokenizer, ["A photo of adam driver"], ["adam driver"], use_pooler=True)[0]
    assert int(mask.sum()) == 73


# --- 2. refinement preservation strength --------------------------------------------------------

def test_refinement_weights_the_caches_by_the_square_of_train_preserve_scale():
    config = _config(train_preserve_scale=1e-2, fuse_preserve_scale=1e-3, preserve_weight=0.5)
    assert RefinementSettings.from_config(config).preserve_scale == pytest.approx(1e-4, rel=1e-12)
    assert FusionSettings.from_config(config).preserve_scale == pytest.approx(1e-3, rel=1e-12)
    # Beyond max_memory concepts the original folds the concepts into the caches: one factor,
    # and fusion uses the train scale too.
    many = _config(train_preserve_scale=1e-2, fuse_preserve_scale=1e-3, max_memory=1)
    assert RefinementSettings.from_config(many).preserve_scale == pytest.approx(1e-2)
    assert FusionSettings.from_config(many).preserve_scale == pytest.approx(1e-2)
    assert ("max_memory" in dict(config_warnings(many))) and "max_memory" not in dict(config_warnings(config))


def test_erase_refines_with_the_squared_scale(tmp_path, tiny_pipe):
    cache = tmp_path / "prior.safetensors"
    mace.build_preservation_cache(tiny_pipe, ["a dog on a beach", "a red bus"], cache, progress=False)
    config = _config(train_preserve_scale=3.0, lamb=0.1, aug_length=4, prior_preservation_cache_path=str(cache),
                     output_dir=str(tmp_path / "out"))
    erase(config, ("refine",), progress=False)
    refined = mace.load_pipeline(tmp_path / "out" / "refined")
    pairs = [p for ps in concept_pairs(config).values() for p in ps]
    expected = mace.load_pipeline("builtin:tiny")
    mace.refine(expected, pairs, lam=0.1, preserve=mace.load_preservation_cache(cache), preserve_scale=9.0)
    for (_, a), (_, b) in zip(mace.cross_attention_projections(refined.unet), mace.cross_attention_projections(expected.unet),
                              strict=True):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


# --- 3. LoRA initialisation, optimiser, clipping, schedule --------------------------------------

@pytest.mark.parametrize("rank", [1, 4])
def test_lora_init_as_diffusers_lora_layer(tiny_pipe, rank):
    lora = MultiConceptLoRA(tiny_pipe.unet, 3, rank, concept_seeds=[1, 2, 3])
    a = torch.cat([A.flatten() for A in lora.A])
    assert abs(float(a.std()) - 1 / rank) < 0.05 / rank and abs(float(a.mean())) < 0.05 / rank
    assert all(float(B.abs().max()) == 0 for B in lora.B)


def test_settings_carry_the_original_optimiser():
    s = LoraTrainingSettings.from_config(_config(adam_beta1=0.8, adam_weight_decay=0.02, max_grad_norm=0.5,
                                                 lr_scheduler="linear", lr_warmup_steps=3, scale_lr=True,
                                                 gradient_accumulation_steps=2, train_batch_size=2,
                                                 learning_rate=1e-3), resolution=64)
    assert (s.adam_beta1, s.adam_beta2, s.adam_weight_decay, s.adam_epsilon) == (0.8, 0.999, 0.02, 1e-8)
    assert s.max_grad_norm == 0.5 and s.lr_scheduler == "linear" and s.lr_warmup_steps == 3
    assert s.optimiser_learning_rate == pytest.approx(1e-3 * 2 * 2)
    defaults = LoraTrainingSettings()
    assert (defaults.adam_weight_decay, defaults.max_grad_norm) == (0.01, 1.0)


def test_per_concept_clipping_equals_clipping_each_concept_alone(tiny_pipe):
    unet = tiny_pipe.unet
    lora = MultiConceptLoRA(unet, 3, 2)
    g = torch.Generator().manual_seed(0)
    for p in list(lora.A) + list(lora.B):
        p.grad = torch.randn(p.shape, generator=g) * torch.tensor([0.01, 1.0, 30.0]).view(-1, *[1] * (p.dim() - 1))
    singles = []
    for k in range(3):
        params = [torch.nn.Parameter(p.detach()[k].clone()) for p in list(lora.A) + list(lora.B)]
        for q, p in zip(params, list(lora.A) + list(lora.B), strict=True):
            q.grad = p.grad[k].clone()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        singles.append([q.grad for q in params])
    norms = clip_grad_norm_per_concept(lora, 1.0)
    assert float(norms[0]) < 1 < float(norms[1]) < float(norms[2])  # one untouched, two clipped
    for k in range(3):
        for p, expected in zip(list(lora.A) + list(lora.B), singles[k], strict=True):
            torch.testing.assert_close(p.grad[k], expected, rtol=1e-5, atol=1e-8)


def _tiny_batch(pipe, n=2):
    g = torch.Generator().manual_seed(0)
    prompts = ["a photo of ship", "a painting by Van Gogh"][:n]
    emb = mace.encode_prompts(pipe, prompts)
    latents = torch.randn(n, 4, 32, 32, generator=g)
    noise = torch.randn(n, 4, 32, 32, generator=g)
    t = torch.tensor([250, 600][:n])
    tokens = concept_token_mask(pipe.tokenizer, prompts, ["ship", "Van Gogh"][:n], use_pooler=True)
    return emb, latents, noise, t, AttentionTargets(tokens, None, [1] * n)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pipe):
    unet, sched = tiny_pipe.unet, tiny_pipe.scheduler
    emb, latents, noise, t, targets = _tiny_batch(tiny_pipe)
    grads = []
    for checkpointing in (False, True):
        lora = MultiConceptLoRA(unet, 2, 1, concept_seeds=[5, 6])
        with torch.no_grad():
            for B in lora.B:
                B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        if checkpointing:
            unet.enable_gradient_checkpointing()
        try:
            with LoraTrainingHooks(unet, lora) as hooks:
                train_step(unet, hooks, sched, latents, emb, targets, noise, t)
        finally:
            unet.disable_gradient_checkpointing()
        grads.append([p.grad.clone() for p in lora.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_mixed_precision_bf16_trains_close_to_float32(tiny_pipe):
    unet, sched = tiny_pipe.unet, tiny_pipe.scheduler
    emb, latents, noise, t, targets = _tiny_batch(tiny_pipe)
    out = {}
    for dtype in (None, torch.bfloat16):
        lora = MultiConceptLoRA(unet, 2, 1, concept_seeds=[5, 6])
        with LoraTrainingHooks(unet, lora) as hooks:
            loss = train_step(unet, hooks, sched, latents, emb, targets, noise, t, autocast_dtype=dtype)
        out[dtype] = (float(loss), torch.cat([p.grad.flatten() for p in lora.B if p.grad is not None]))  # B: A's is 0 at B = 0
        assert all(p.dtype == torch.float32 for p in lora.parameters())
    (l32, g32), (l16, g16) = out[None], out[torch.bfloat16]
    assert l16 != l32 and abs(l16 - l32) < 0.05 * l32  # autocast really ran, and stays close
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.95


def test_fp16_loss_scaling_brings_the_gradients_closer_to_float32(tiny_pipe):
    """fp16 activations round small gradients away; the scaled backward pass, unscaled before
    clipping (as accelerate does for fp16), keeps more of them. An overflowing scale skips the
    step and halves."""
    unet, sched = tiny_pipe.unet, tiny_pipe.scheduler
    emb, latents, noise, t, targets = _tiny_batch(tiny_pipe)
    grads = {}
    for name, dtype, scaler in (("fp32", None, None), ("fp16", torch.float16, None),
                                ("fp16 scaled", torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0**10))):
        lora = MultiConceptLoRA(unet, 2, 1, concept_seeds=[5, 6])
        with LoraTrainingHooks(unet, lora) as hooks:
            train_step(unet, hooks, sched, latents, emb, targets, noise, t, autocast_dtype=dtype, grad_scaler=scaler)
        if scaler is not None:
            scaler.unscale_(torch.optim.SGD(lora.parameters(), lr=0.0))
        grads[name] = torch.cat([p.grad.flatten() for p in lora.B if p.grad is not None])
    ref = grads["fp32"]

    def error(name):
        return float((grads[name] - ref).norm() / ref.norm())

    # Measured: 1.2e-3 unscaled, 5.3e-4 scaled (relative to the float32 gradient's norm).
    assert error("fp16 scaled") < 0.6 * error("fp16") < 0.01

    lora = MultiConceptLoRA(unet, 2, 1, concept_seeds=[5, 6])
    before = [p.detach().clone() for p in lora.parameters()]
    optimizer = torch.optim.SGD(lora.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # the scaled backward pass overflows fp16
    with LoraTrainingHooks(unet, lora) as hooks:
        train_step(unet, hooks, sched, latents, emb, targets, noise, t, autocast_dtype=torch.float16,
                   grad_scaler=scaler)
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**119
    assert all(torch.equal(a, b) for a, b in zip(before, lora.parameters(), strict=True))


def test_fp16_training_loop_scales_the_loss_and_stays_close_to_float32(tmp_path, tiny_pipe, monkeypatch):
    from safetensors.torch import load_file

    import mace.stages.lora_training as training

    _original_layout(tmp_path / "data", "ship", size=64)
    concepts = [("ship", "object", mace.concept_prompt_pairs("ship", "ground", "object", aug_length=2))]
    made = []
    real = torch.amp.GradScaler

    def recording_scaler(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(training.torch.amp, "GradScaler", recording_scaler)
    trained = {}
    for precision in (None, "fp16", "bf16"):
        settings = LoraTrainingSettings(max_train_steps=2, resolution=64, learning_rate=1e-2,
                                        mixed_precision=precision)
        result = training.train_concept_loras(tiny_pipe, concepts, settings, input_data_dir=tmp_path / "data",
                                              output_dir=tmp_path / f"out-{precision}", progress=False)
        trained[precision] = torch.cat([v.flatten().float() for _, v in sorted(load_file(str(result.files["ship"])).items())])
    assert [s.is_enabled() for s in made] == [False, True, False]  # loss scaling for fp16 only
    # torch's default first scale, 2^16, overflows this model's fp16 backward pass: that step is
    # skipped and the scale halves, as in any fp16 run's first steps.
    assert made[1].get_scale() == 2.0**15
    for precision in ("fp16", "bf16"):
        assert not torch.equal(trained[precision], trained[None])
        cos = torch.nn.functional.cosine_similarity(trained[precision], trained[None], dim=0)
        assert float(cos) > 0.99, (precision, float(cos))


def test_gradient_accumulation_halves_each_pass(tiny_pipe):
    unet, sched = tiny_pipe.unet, tiny_pipe.scheduler
    emb, latents, noise, t, targets = _tiny_batch(tiny_pipe, n=1)
    lora = MultiConceptLoRA(unet, 1, 1, concept_seeds=[5])
    with LoraTrainingHooks(unet, lora) as hooks:
        train_step(unet, hooks, sched, latents, emb, targets, noise, t)
        once = [p.grad.clone() for p in lora.B if p.grad is not None]
        lora.zero_grad()
        for _ in range(2):
            train_step(unet, hooks, sched, latents, emb, targets, noise, t, loss_scale=0.5)
    twice = [p.grad for p in lora.B if p.grad is not None]
    assert once and any(float(g.abs().max()) > 0 for g in once)
    for a, b in zip(once, twice, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


# --- 4 and 5. masks and the data layout ----------------------------------------------------------

def _original_layout(root, concept, n=2, size=32):
    """The original tools' files: <c>/<prompt>_<i>.jpg and '<c> mask'/<prompt>_<i>_mask.jpg."""
    rng = np.random.default_rng(0)
    (root / concept).mkdir(parents=True)
    (root / f"{concept} mask").mkdir()
    for i in range(n):
        stem = f"a-photo-of-the-{concept.replace(' ', '-')}_{i}"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / concept / f"{stem}.jpg")
        mask = np.zeros((size, size), np.uint8)
        mask[: size // 2 * (i + 1) // 2] = 255
        Image.fromarray(mask, mode="L").save(root / f"{concept} mask" / f"{stem}_mask.jpg")


def test_original_jpg_layout_is_read_and_masks_pair_by_name(tmp_path):
    _original_layout(tmp_path, "adam driver")
    files = concept_data_files(tmp_path, "adam driver", "celebrity")
    assert [f.name for f in files] == ["a-photo-of-the-adam-driver_0.jpg", "a-photo-of-the-adam-driver_0_mask.jpg",
                                       "a-photo-of-the-adam-driver_1.jpg", "a-photo-of-the-adam-driver_1_mask.jpg"]
    images, masks = load_concept_data(tmp_path, "adam driver", "celebrity", 16)
    assert images.shape == (2, 3, 16, 16) and masks.shape == (2, 1, 16, 16)
    assert float(masks[0].mean()) == pytest.approx(0.25, abs=0.05) and float(masks[1].mean()) == pytest.approx(0.5, abs=0.05)
    # use_gsam_mask: false, as the original: no mask, and none is needed.
    images, masks = load_concept_data(tmp_path, "adam driver", "celebrity", 16, with_masks=False)
    assert masks is None and images.shape[0] == 2
    for f in (tmp_path / "adam driver mask").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="_mask.jpg"):
        concept_data_files(tmp_path, "adam driver", "celebrity")
    assert len(concept_data_files(tmp_path, "adam driver", "celebrity", with_masks=False)) == 2


def test_prepare_keeps_original_data_and_makes_no_masks_when_they_are_off(tmp_path, tiny_pipe):
    _original_layout(tmp_path, "ship", size=64)
    settings = GenerationSettings(num_images=2, steps=2, batch_size=2, seed=0)
    assert generate_concept_data(tiny_pipe, "ship", "ground", "object", tmp_path, settings, progress=False) == 0
    assert generate_concept_data(tiny_pipe, "tower", "ground", "object", tmp_path, settings, progress=False,
                                 with_masks=False) == 2
    assert not (tmp_path / "tower mask").exists() and len(list((tmp_path / "tower").iterdir())) == 2


def test_use_gsam_mask_false_trains_without_masks(tmp_path, tiny_pipe, monkeypatch):
    """The attention loss then covers every pixel: the targets carry no mask."""
    import mace.stages.lora_training as training

    seen = []
    real = training.AttentionTargets

    def spy(*args, **kwargs):
        seen.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "AttentionTargets", spy)
    _original_layout(tmp_path / "data", "ship", size=64)
    pairs = mace.concept_prompt_pairs("ship", "ground", "object", aug_length=2)
    for use_masks in (True, False):
        settings = LoraTrainingSettings(max_train_steps=1, resolution=64, use_masks=use_masks)
        training.train_concept_loras(tiny_pipe, [("ship", "object", pairs)], settings, input_data_dir=tmp_path / "data",
                                     output_dir=tmp_path / f"out-{use_masks}", progress=False)
    assert seen[0] is not None and seen[0].shape[0] == 1 and seen[1] is None


def test_generate_data_false_uses_the_data_there_and_refuses_missing_data(tmp_path):
    body = dict(multi_concept=[[["ship", "object"]]], mapping_concept=["ground"], generate_data=False,
                input_data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"), pretrained_model_name_or_path="builtin:tiny")
    from mace.erase import StageError

    with pytest.raises(StageError, match="no data folder for 'ship'"):
        erase(config_from_dict(body), ("prepare",), progress=False)
    _original_layout(tmp_path / "data", "ship")
    summary = erase(config_from_dict(body), ("prepare",), progress=False)
    assert summary.skipped == ["prepare"] and sorted(p.suffix for p in (tmp_path / "data" / "ship").iterdir()) == [".jpg", ".jpg"]


# --- 6. keys accepted and never silently dropped --------------------------------------------------

def test_keys_without_effect_are_warned_about_by_name(tmp_path):
    values = {"use_8bit_adam": True, "num_train_epochs": 3, "checkpointing_steps": 10,
              "sam_checkpoint": "sam_vit_h.pth", "negative_guidance": 2.0, "lora": False}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"MACE": {"multi_concept": [[["ship", "object"]]], "mapping_concept": ["ground"],
                                             "max_train_steps": 50, **values}}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    for key, value in values.items():
        assert any(m.startswith(f"{key}={value!r} has no effect here") for m in messages), (key, messages)
    assert len(messages) == len(values)


def test_defaults_and_honoured_keys_do_not_warn():
    config = _config(use_gsam_mask=False, augment=False, train_seperate=False, mixed_precision="bf16",
                     gradient_checkpointing=True, gradient_accumulation_steps=2, adam_weight_decay=0.0,
                     max_grad_norm=2.0, lr_scheduler="cosine", generate_data=False, allow_tf32=True, revision="main",
                     no_real_image=True, checkpointing_steps=500)
    assert config_warnings(config) == []


def test_augment_false_gives_one_prompt_per_concept():
    pairs = concept_pairs(_config(augment=False))
    assert {k: [p.old for p in v] for k, v in pairs.items()} == {"adam driver": ["a photo of adam driver"],
                                                                 "ship": ["a photo of ship"]}
    assert all(len(v) == 30 for v in concept_pairs(_config()).values())


def test_train_seperate_false_trains_one_shared_lora(tmp_path, tiny_pipe):
    from safetensors.torch import load_file

    import mace.stages.lora_training as training

    concepts = []
    for name in ("ship", "tower"):
        _original_layout(tmp_path / "data", name, size=64)
        concepts.append((name, "object", mace.concept_prompt_pairs(name, "ground", "object", aug_length=2)))
    settings = LoraTrainingSettings(max_train_steps=2, resolution=64, separate=False, learning_rate=1e-2)
    result = training.train_concept_loras(tiny_pipe, concepts, settings, input_data_dir=tmp_path / "data",
                                          output_dir=tmp_path / "out", progress=False)
    a, b = (load_file(str(result.files[n])) for n in ("ship", "tower"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    assert result.fingerprints["ship"] == result.fingerprints["tower"]


# --- 8. cache magnitude ------------------------------------------------------------------------

def test_cache_records_prompt_and_token_counts(tmp_path, tiny_pipe):
    prompts = ["a dog", "a red bus in the street", "a bowl of fruit"]
    cache = mace.build_preservation_cache(tiny_pipe, prompts, tmp_path / "c.safetensors", progress=False)
    loaded = mace.load_preservation_cache(tmp_path / "c.safetensors")
    assert (loaded.prompts, loaded.tokens) == (3, 3 * 77) == (cache.prompts, cache.tokens)
    # A sum: twice the prompts, twice the statistic (what the scale multiplies).
    double = mace.build_preservation_cache(tiny_pipe, prompts * 2, tmp_path / "d.safetensors", progress=False)
    torch.testing.assert_close(double.cov, 2 * cache.cov, rtol=1e-5, atol=1e-5 * float(cache.cov.abs().max()))
    assert math.isclose(float(double.cov.trace()), 2 * float(cache.cov.trace()), rel_tol=1e-6)


def test_fusion_tokens_concept_fuses_only_the_name_and_later_positions(tiny_pipe):
    """fusion_tokens: concept equals the "all" solve given only the positions from the name on."""
    from mace.closed_form import fuse_weights
    from mace.pipelines.components import cross_attention_projections, encode_prompts, projection_weights, set_projection_weights
    from mace.stages.fusion import from_name_on, fuse, stack_loras

    mask = from_name_on(tiny_pipe.tokenizer, ["a photo of Qedark Draerba", "Qedark Draerba", "a dog"], "Qedark Draerba")
    assert mask[0].nonzero().min() == 4 and bool(mask[0, 4:].all())  # start, a, photo, of come first
    assert bool(mask[1, 1:].all()) and not bool(mask[1, 0]) and not bool(mask[2].any())
    only = from_name_on(tiny_pipe.tokenizer, ["a photo of Qedark Draerba"], "Qedark Draerba", name_only=True)[0]
    pieces = len(tiny_pipe.tokenizer("Qedark Draerba", add_special_tokens=False).input_ids)
    assert only.nonzero().squeeze(1).tolist() == list(range(4, 4 + pieces))

    projections = cross_attention_projections(tiny_pipe.unet)
    g = torch.Generator().manual_seed(0)
    lora = {n: (torch.randn(1, lin.in_features, generator=g), torch.randn(lin.out_features, 1, generator=g))
            for n, lin in projections}
    prompts = ["a photo of Qedark Draerba", "a drawing of Qedark Draerba"]
    before = [w.clone() for w in projection_weights(tiny_pipe.unet)]
    try:
        fuse(tiny_pipe, {"Qedark Draerba": lora}, {"Qedark Draerba": prompts}, lam=0.1, tokens="concept")
        got = projection_weights(tiny_pipe.unet)
        e = encode_prompts(tiny_pipe, prompts)
        keep = from_name_on(tiny_pipe.tokenizer, prompts, "Qedark Draerba")
        want, _ = fuse_weights(before, stack_loras([lora], projections), [e[keep]], lam=0.1)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="contains its name"):
            fuse(tiny_pipe, {"Qedark Draerba": lora}, {"Qedark Draerba": ["a dog"]}, lam=0.1, tokens="concept")
    finally:
        set_projection_weights(tiny_pipe.unet, before)
