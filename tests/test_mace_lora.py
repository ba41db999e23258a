import pytest
import torch

import mace
from mace.lora import (
    AttentionTargets,
    LoraTrainingHooks,
    MultiConceptLoRA,
    concept_token_mask,
    importance_weights,
    sample_timesteps,
    train_step,
)
from mace.prompts import concept_token_positions


def test_importance_weights_favour_200_to_400():
    w = importance_weights()
    assert abs(float(w.sum()) - 1) < 1e-12
    inside = float(w[200:401].sum())
    assert inside > 0.8  # most of the mass
    t = sample_timesteps(4000, 1000, True, torch.Generator().manual_seed(0))
    assert 0.75 < float(((t >= 200) & (t <= 400)).float().mean()) < 0.9


def _batch(pipe, concepts, per_concept, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts, positions, masks = [], [], []
    for concept, mapping, kind in concepts:
        for pair in mace.concept_prompt_pairs(concept, mapping, kind, aug_length=per_concept, seed=seed):
            ids_o = pipe.tokenizer(pair.old).input_ids
            ids_n = pipe.tokenizer(pair.new).input_ids
            prompts.append(pair.old)
            positions.append(concept_token_positions(ids_o, ids_n))
            mask = (torch.rand(1, 32, 32, generator=g) > 0.5).float() if kind != "style" else torch.ones(1, 32, 32)
            masks.append(mask)
    n = len(prompts)
    emb = mace.encode_prompts(pipe, prompts)
    latents = torch.randn(n, 4, 32, 32, generator=g)
    noise = torch.randn(n, 4, 32, 32, generator=g)
    t = sample_timesteps(n, 1000, True, g)
    tokens = concept_token_mask(pipe.tokenizer, prompts, positions, use_pooler=True)
    return emb, latents, noise, t, tokens, torch.stack(masks)


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
        single = MultiConceptLoRA(unet, 1, rank=2)
        with torch.no_grad():
            for dst, src in zip(list(single.A) + list(single.B), list(lora.A) + list(lora.B)):
                dst.copy_(src[k:k + 1])
        h = LoraTrainingHooks(unet, single)
        rows = slice(k * per, (k + 1) * per)
        loss = train_step(unet, h, sched, latents[rows], emb[rows], AttentionTargets(tokens[rows], masks[rows], [per]),
                          noise[rows], t[rows])
        h.remove()
        total += float(loss)
        for p_batched, p_single in zip(list(lora.A) + list(lora.B), list(single.A) + list(single.B)):
            # The last attn2 layer's value LoRA cannot change any attention map: no gradient.
            assert (p_batched.grad is None) == (p_single.grad is None)
            if p_batched.grad is not None:
                torch.testing.assert_close(p_batched.grad[k], p_single.grad[0], rtol=1e-4, atol=1e-6)
    assert abs(float(batched_loss) - total) < 1e-4 * total
    assert any(float(p.grad.abs().max()) > 0 for p in lora.A)


def test_hooks_remove_restores_the_model(tiny_pipe):
    unet = tiny_pipe.unet
    before = {n: type(m.processor) for n, m in unet.named_modules() if n.endswith("attn2")}
    hooks = LoraTrainingHooks(unet, MultiConceptLoRA(unet, 2, rank=1))
    hooks.remove()
    assert {n: type(m.processor) for n, m in unet.named_modules() if n.endswith("attn2")} == before
