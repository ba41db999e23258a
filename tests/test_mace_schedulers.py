"""Schedulers as the real models ship them, and training noise that never depends on the sampler.

The builtins carry their family's published scheduler (SD 1.4 and SD 2.x base: PNDM; SD 2.x
768-v: DDIM with v-prediction; SDXL: Euler). Training noise, the prior-preservation target and
the soft attack follow the model's forward process (DDPM's, from the scheduler's betas):
a sampler's own ``add_noise`` (Euler's x + sigma * noise) is never used for training.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

import mace
from mace.pipelines.builtin import _final_layer_norm
from mace.stages.lora import AttentionTargets, LoraTrainingHooks, MultiConceptLoRA, forward_process, train_step

FAMILIES = {  # builtin -> (the scheduler class its family ships, prediction type)
    "builtin:tiny": (PNDMScheduler, "epsilon"),
    "builtin:tiny-sd2-base": (PNDMScheduler, "epsilon"),
    "builtin:tiny-sd2": (DDIMScheduler, "v_prediction"),
    "builtin:tiny-sdxl": (EulerDiscreteScheduler, "epsilon"),
}
SAMPLERS = [DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
            DPMSolverMultistepScheduler]


def _alphas_cumprod() -> torch.Tensor:
    """SD's training betas, written out: scaled_linear from 0.00085 to 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


@pytest.fixture(scope="module")
def family_pipes():
    return {name: mace.load_pipeline(name) for name in FAMILIES}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_builtins_ship_their_familys_scheduler(family_pipes, name):
    cls, prediction = FAMILIES[name]
    scheduler = family_pipes[name].scheduler
    assert type(scheduler) is cls
    assert scheduler.config.prediction_type == prediction
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), _alphas_cumprod(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda c: c.__name__)
def test_training_noise_is_ddpm_forward_process_whatever_the_sampler(family_pipes, name, sampler):
    """What train_step hands the UNet is sqrt(abar_t) x + sqrt(1 - abar_t) eps, for the builtin's
    own scheduler and for every sampler a user swaps in (its prediction type kept)."""
    pipe = family_pipes[name]
    scheduler = sampler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 499, 999])
    abar = _alphas_cumprod()[t].float().view(-1, 1, 1, 1)
    expected = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    process = forward_process(scheduler)
    torch.testing.assert_close(process.add_noise(latents, noise, t), expected, rtol=1e-5, atol=1e-5)
    if pipe.scheduler.config.prediction_type == "v_prediction":
        torch.testing.assert_close(process.get_velocity(latents, noise, t),
                                   abar.sqrt() * noise - (1 - abar).sqrt() * latents, rtol=1e-5, atol=1e-5)
    if sampler in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler):
        # The bug this guards against: Euler's add_noise is x + sigma * noise, far from the above.
        scheduler.set_timesteps(1000)
        t = torch.tensor([1, 500, 999])  # on its schedule
        abar = _alphas_cumprod()[t].float().view(-1, 1, 1, 1)
        expected = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        assert (scheduler.add_noise(latents, noise, t) - expected).abs().max() > 1.0


def test_train_step_feeds_the_unet_the_forward_process_under_euler(tiny_pipe):
    """The UNet's input in a training step is the DDPM-noised latent under an Euler pipeline too."""
    unet = tiny_pipe.unet
    lora = MultiConceptLoRA(unet, 1, 1, concept_seeds=[0])
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([10, 900])
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    tokens = torch.zeros(2, 77, dtype=torch.bool)
    tokens[:, 1:3] = True
    seen = []
    handle = unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        with LoraTrainingHooks(unet, lora) as hooks:
            train_step(unet, hooks, EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config), latents, emb,
                       AttentionTargets(tokens, None, [2]), noise, t)
    finally:
        handle.remove()
    abar = _alphas_cumprod()[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(seen[0], abar.sqrt() * latents + (1 - abar).sqrt() * noise, rtol=1e-5, atol=1e-5)


def test_loras_trained_under_ddim_euler_and_dpm_solver_pipelines_are_identical(tiny_path, tmp_path):
    from safetensors.torch import load_file

    from mace.stages.lora_training import LoraTrainingSettings, train_concept_loras
    from tests.test_mace_lora import _prepared

    runs = {}
    for sampler in (DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        pipe = mace.load_pipeline(tiny_path)
        pipe.scheduler = sampler.from_config(pipe.scheduler.config)
        concepts, size = _prepared(tmp_path / sampler.__name__, pipe, ["ship"])
        settings = LoraTrainingSettings(rank=1, learning_rate=1e-3, max_train_steps=2, train_batch_size=1,
                                        importance_sampling=True, use_pooler=True, resolution=size, seed=0)
        result = train_concept_loras(pipe, concepts, settings, output_dir=tmp_path / sampler.__name__ / "out",
                                     input_data_dir=tmp_path / sampler.__name__ / "data", progress=False)
        runs[sampler.__name__] = load_file(str(result.files["ship"]))
    ddim = runs.pop("DDIMScheduler")
    assert any(float(w.abs().max()) > 0 for k, w in ddim.items() if "lora_B" in k)  # it trained
    for other in runs.values():
        assert sorted(other) == sorted(ddim)
        for k in ddim:
            torch.testing.assert_close(other[k], ddim[k], rtol=0, atol=0)


def test_soft_attack_is_the_same_under_ddim_and_euler(tiny_path):
    from mace.attacks import SoftPromptAttack, soft_prompt_attack

    def targets(concept, n, seed):
        return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    found = []
    for sampler in (DDIMScheduler, EulerDiscreteScheduler):
        pipe = mace.load_pipeline(tiny_path)
        pipe.scheduler = sampler.from_config(pipe.scheduler.config)
        found.append(soft_prompt_attack(pipe, "ship", targets, settings=SoftPromptAttack(budget=2, num_tokens=2,
                                        target_images=2, batch_size=2, probe_size=2), seed=0))
    assert found[0].loss_start == found[1].loss_start and found[0].loss_end == found[1].loss_end
    torch.testing.assert_close(found[0].embeddings, found[1].embeddings, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["builtin:tiny", "builtin:tiny-sd2"])
def test_builtin_text_encoders_fill_every_direction(family_pipes, name):
    """A trained CLIP's final LayerNorm has a bias; without one every token is zero-mean and
    the token statistic has rank d - 1, so a solve with lamb = 0 is singular."""
    from mace.pipelines.components import encode_prompts

    pipe = family_pipes[name]
    norm = _final_layer_norm(pipe.text_encoder)
    assert float(norm.bias.abs().max()) > 0.1
    tokens = encode_prompts(pipe, [f"a photo of thing number {i}" for i in range(8)]).reshape(-1, norm.bias.numel())
    assert torch.linalg.matrix_rank(tokens.double().T @ tokens.double()) == norm.bias.numel()


def test_fusion_with_lamb_zero_is_solvable_and_exact_on_builtin_tiny(tiny_pipe):
    """The original configs' ``lamb: 0``: one concept's LoRA is reproduced exactly on every
    direction its tokens span, which is all of them (it was singular with a bias-free LayerNorm)."""
    names = [(n, lin.weight.shape) for n, lin in mace.cross_attention_projections(tiny_pipe.unet)]
    g = torch.Generator().manual_seed(3)
    lora = {n: (torch.randn(1, s[1], generator=g), torch.randn(s[0], 1, generator=g)) for n, s in names}
    prompts = {"ship": [p.old for p in mace.concept_prompt_pairs("ship", "ground", "object", aug_length=5)]}
    before = [lin.weight.detach().double().clone() for _, lin in mace.cross_attention_projections(tiny_pipe.unet)]
    try:
        mace.fuse(tiny_pipe, {"ship": lora}, prompts, lam=0.0)
        for (name, lin), w in zip(mace.cross_attention_projections(tiny_pipe.unet), before, strict=True):
            A, B = lora[name]
            torch.testing.assert_close(lin.weight.detach().double(), w + B.double() @ A.double(), rtol=1e-4, atol=1e-4)
    finally:
        with torch.no_grad():
            for (_, lin), w in zip(mace.cross_attention_projections(tiny_pipe.unet), before, strict=True):
                lin.weight.copy_(w.to(lin.weight.dtype))
