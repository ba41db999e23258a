"""Device contracts for CUDA, checked without a GPU.

torch's fake tensors carry a device ("cuda:0") without memory and raise a device-mismatch error
when CUDA and CPU tensors meet (the real "Expected all tensors to be on the same device", or
"found two different devices" from torch releases before 2.13). The workflow's own code
that runs between the model and the host (masks, token positions, statistics, images leaving
the pipeline) is run here on fake CUDA inputs: each test failed before its fix. Whole UNet
forward passes cannot run this way (diffusers and torch guard CUDA devices on a CPU build);
benchmarks/gpu_check.sh runs `mace erase` on a GPU. The closed-form stages, which read values
that fake tensors do not have, run on a simulated GPU (tests/simulated_gpu.py) with real numbers.
"""

import argparse
import contextlib
import copy
from pathlib import Path

import pytest
import torch
from simulated_gpu import SimulatedGPU
from torch._subclasses.fake_tensor import FakeTensorMode

import mace_kernels as mk
from mace_kernels import _backend


@pytest.fixture
def fake_cuda(monkeypatch):
    """(mode, cuda device): inside ``mode`` tensors made on the device are fake CUDA tensors."""
    # The ops' default on CUDA is Triton, which needs real memory: the torch reference runs here.
    monkeypatch.setenv("MACE_KERNELS_BACKEND", "torch")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        device = torch.empty(0, device="cuda").device
    return mode, device


def _moved(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of ``module`` with its parameters and buffers on ``device`` (inside the fake mode)."""
    module = copy.deepcopy(module)
    with torch.no_grad():
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = b.to(device)
    return module


def test_the_fake_device_raises_the_real_mismatch(fake_cuda):
    mode, cuda = fake_cuda
    with mode, pytest.raises(RuntimeError, match="same device|two different devices"):
        torch.ones(2, device=cuda) * torch.ones(2)


def test_lora_parameters_live_beside_the_projections_they_adapt(fake_cuda, tiny_pipe):
    from mace.stages.lora import MultiConceptLoRA

    mode, cuda = fake_cuda
    with mode:
        lora = MultiConceptLoRA(_moved(tiny_pipe.unet, cuda), 3, 2, concept_seeds=[1, 2, 3])
    assert all(p.device == cuda for p in lora.parameters())


def test_a_seed_gives_the_same_lora_on_the_gpu_as_on_the_cpu(tiny_pipe):
    from mace.stages.lora import MultiConceptLoRA

    # The initial A is drawn on the CPU and then moved: the simulated GPU has real values.
    with SimulatedGPU():
        unet = copy.deepcopy(tiny_pipe.unet).to("cuda")
        on_gpu = MultiConceptLoRA(unet, 3, 2, concept_seeds=[1, 2, 3])
        assert all(SimulatedGPU.on_gpu(a) for a in on_gpu.A)
        drawn = [a.detach().cpu() for a in on_gpu.A]
    cpu = MultiConceptLoRA(tiny_pipe.unet, 3, 2, concept_seeds=[1, 2, 3])
    assert all(torch.equal(a.detach(), b) for a, b in zip(cpu.A, drawn, strict=True))
    assert not torch.equal(drawn[0], MultiConceptLoRA(tiny_pipe.unet, 3, 2, concept_seeds=[4, 5, 6]).A[0].detach())


def test_the_attention_loss_takes_host_token_positions_to_the_probabilities(fake_cuda, tiny_pipe):
    from mace.stages.lora import AttentionTargets, LoraTrainingHooks, MultiConceptLoRA, concept_token_mask

    mode, cuda = fake_cuda
    # As _sample_batch makes them: token positions from the tokenizer (CPU), masks on the device.
    # (Without preservation samples or masks: indexing a fake CUDA tensor trips torch's CUDA guard.)
    positions = concept_token_mask(tiny_pipe.tokenizer, ["a photo of ship", "a photo of tower"],
                                   ["ship", "tower"], use_pooler=True)
    with mode:
        unet = _moved(tiny_pipe.unet, cuda)
        hooks = LoraTrainingHooks(unet, MultiConceptLoRA(unet, 2, 1))
        hooks.targets = AttentionTargets(positions, None, [1, 1])
        heads, pixels = 2, 16
        hooks.record(torch.rand(2 * heads, pixels, 77, device=cuda), batch=2)
        norms = hooks.targets.layer_norms[-1]
    hooks.remove()
    assert norms.device == cuda and norms.shape == (2,)


def test_attention_maps_of_generation_read_cuda_probabilities(fake_cuda):
    from mace.pipelines.attention import AttentionMapRecorder

    mode, cuda = fake_cuda
    positions = torch.zeros(2, 77, dtype=torch.bool)
    positions[:, 4] = True
    with mode:
        recorder = AttentionMapRecorder(positions, cond_offset=2, side=8)
        recorder._record(torch.rand(4 * 2, 16, 77, device=cuda), batch=4)  # uncond + cond halves, 2 heads
        maps = recorder.maps
    assert maps.device.type == "cpu" and maps.shape == (2, 8, 8)


def test_generated_images_leave_the_device(fake_cuda):
    from mace.utils.sampling import generate_images

    mode, cuda = fake_cuda

    class Pipe:
        def __call__(self, prompts, **kwargs):
            # diffusers' output_type="pt" leaves the images on the model's device
            return argparse.Namespace(images=torch.rand(len(prompts), 3, 8, 8, device=cuda))

    with mode:
        images = generate_images(Pipe(), ["a", "b", "c"], [0, 1, 2], steps=1, guidance_scale=1.0, batch_size=2,
                                 progress=False)
    assert images.device.type == "cpu" and images.shape == (3, 3, 8, 8)


def test_a_preservation_cache_sums_cuda_embeddings_on_the_host(fake_cuda, tiny_pipe, tmp_path, monkeypatch):
    import mace.stages.cache as cache_module

    mode, cuda = fake_cuda
    saved = []
    width = cache_module.text_width(tiny_pipe)
    monkeypatch.setattr(cache_module, "text_encoder_fingerprint", lambda pipe: "fingerprint")
    # The statistic as the op returns it, on the embeddings' device (the reference indexes, which
    # fake CUDA tensors cannot).
    monkeypatch.setattr(cache_module.mk, "token_covariance", lambda x: (x.T @ x, None))
    monkeypatch.setattr(cache_module, "encode_prompts",
                        lambda pipe, prompts, batch_size=64: torch.rand(len(prompts), 77, width, device=cuda))
    monkeypatch.setattr(cache_module.PreservationCache, "save",
                        lambda self, path, partial=False: saved.append((self.cov.device, self.tokens, partial)))
    with mode:
        cache_module.build_preservation_cache(tiny_pipe, ["a ship", "a tower", "a tree"], tmp_path / "c.safetensors",
                                              batch_size=2, progress=False)
    assert saved == [(torch.device("cpu"), 3 * 77, False)]


def test_triton_kernels_launch_with_the_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device; a tensor on cuda:1 must not run on cuda:0."""
    entered = []

    @contextlib.contextmanager
    def current(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(_backend.torch.cuda, "device", current)
    monkeypatch.delenv("MACE_KERNELS_BACKEND", raising=False)
    calls = []
    table = {"triton": lambda x: calls.append(("triton", list(entered))) or x,
             "torch": lambda x: calls.append(("torch", list(entered))) or x}
    primitives = {"triton": (table["triton"], table["triton"]), "torch": (table["torch"], table["torch"])}
    gpu1 = torch.device("cuda", 1)
    for backend in (None, "triton"):  # chosen by default (guarded) and named
        _backend.implementation("test_op", table, backend, gpu1)(0)
        for primitive in _backend.implementation("test_op", primitives, backend, gpu1):
            primitive(0)
    assert [c[0] for c in calls] == ["triton"] * 6
    assert all(c[1][-1] == gpu1 for c in calls) and len(entered) == 6
    assert "test_op" not in mk.triton_failures()


def test_eval_runs_on_the_configs_device_unless_told_otherwise(tmp_path):
    import yaml

    from mace.cli import _models_and_concepts

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"MACE": {"multi_concept": [[["ship", "object"]]], "mapping_concept": ["ground"],
                                             "final_save_path": str(tmp_path / "final"), "device": "cuda:1"}}))

    def args(device):
        return argparse.Namespace(model=None, original=None, erased=None, config=str(path), set=[], device=device)

    given = args(None)
    _models_and_concepts(given)
    assert given.device == "cuda:1"
    told = args("cpu")
    _models_and_concepts(told)
    assert told.device == "cpu"


def test_fp16_generation_decodes_with_an_upcast_vae_in_float32(tmp_path):
    """Under fp16 autocast, a VAE that asks for force_upcast (SDXL's) decodes in float32."""
    import mace
    from mace.config import MACEConfig
    from mace.erase import _precision

    pipe = mace.load_pipeline("builtin:tiny-sdxl")
    assert pipe.vae.config.force_upcast
    seen = []
    hook = pipe.vae.decoder.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    z = torch.randn(1, pipe.vae.config.latent_channels, 4, 4)
    try:
        for precision in ("fp16", "bf16"):
            with _precision(MACEConfig(mixed_precision=precision, device="cpu"), pipe):
                pipe.vae.decode(z)
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert "decode" not in vars(pipe.vae)  # the class's method again


def test_the_simulated_gpu_raises_where_a_gpu_would():
    on_gpu = SimulatedGPU.on_gpu
    with SimulatedGPU():
        gpu = SimulatedGPU.put(torch.ones(3))
        with pytest.raises(RuntimeError, match="same device"):
            gpu + torch.ones(3)
        assert gpu.device == torch.device("cuda", 0)
        assert on_gpu(gpu * 2) and on_gpu(gpu.double()) and on_gpu(torch.zeros(2, device=gpu.device))
        assert on_gpu(torch.ones(3).to("cuda")) and on_gpu(torch.ones(3).to(gpu.device, torch.float64))
        assert not on_gpu(gpu.cpu()) and not on_gpu(gpu.to("cpu", torch.float64)) and not on_gpu(gpu.to("cpu"))
        assert gpu.cpu().device.type == "cpu"
        assert float((gpu.cpu() + torch.ones(3)).sum()) == 6.0 and float((gpu + torch.tensor(1.0)).sum()) == 6.0
        assert float(gpu[torch.tensor([0, 2])].sum()) == 2.0  # a CPU index into GPU memory
        layer = torch.nn.Linear(2, 2).to("cuda")
        assert layer.weight.device == torch.device("cuda", 0) and on_gpu(layer.weight.data)
        with pytest.raises(RuntimeError, match="same device"):
            layer(torch.ones(1, 2))
        assert layer(torch.ones(1, 2).to(layer.weight.device)).device == torch.device("cuda", 0)
        assert not on_gpu(layer.cpu().weight)
        assert torch.nn.Parameter(torch.ones(2).to("cuda")).device == torch.device("cuda", 0)
    assert vars(torch.nn.Parameter)["__new__"].__func__ is torch.nn.Parameter.__new__  # restored


def _encoding_on_the_gpu(monkeypatch, *modules):
    """Text encodings come back on the simulated GPU, as from a CUDA text encoder."""
    from mace.pipelines import components as models

    def encode(pipe, prompts, batch_size=64):
        return SimulatedGPU.put(models.encode_prompts(pipe, prompts, batch_size))

    for module in modules:
        monkeypatch.setattr(module, "encode_prompts", encode)


@pytest.mark.parametrize("method", ["uce", "rece", "speed"])
def test_closed_form_baselines_edit_host_weights_from_gpu_encodings(method, tiny_path, monkeypatch):
    """UCE, RECE and SPEED on a model whose text encoder is on the GPU: the same weights as on the CPU."""
    import mace
    import mace.methods.rece
    import mace.methods.speed
    import mace.methods.uce
    from mace.pipelines.components import projection_weights

    monkeypatch.setenv("MACE_KERNELS_BACKEND", "torch")
    run = {"uce": mace.methods.uce.uce, "rece": lambda *a: mace.methods.rece.rece(*a, rounds=2), "speed": mace.methods.speed.speed}[method]
    args = (["ship", "tower"], "a glyph", ["a tree", "a boat"])
    host = mace.load_pipeline(tiny_path)
    run(host, *args)
    expected = [w.clone() for w in projection_weights(host.unet)]

    pipe = mace.load_pipeline(tiny_path)
    _encoding_on_the_gpu(monkeypatch, mace.methods.uce, mace.methods.rece, mace.methods.speed)
    with SimulatedGPU():
        run(pipe, *args)
    for got, want in zip(projection_weights(pipe.unet), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_refinement_and_fusion_edit_host_weights_from_gpu_encodings(method, tiny_path, monkeypatch):
    """MACE's closed-form stages with the text encoder on the GPU: the same weights as on the CPU."""
    import mace
    import mace.stages.fusion
    import mace.stages.refinement
    from mace.pipelines.components import cross_attention_projections, projection_weights

    monkeypatch.setenv("MACE_KERNELS_BACKEND", "torch")
    pairs = [("a photo of a ship", "a photo of a glyph"), ("a tower by the sea", "a glyph by the sea")]
    prompts = {"ship": ["a ship at sea", "a red ship"], "tower": ["a tall tower"]}
    torch.manual_seed(0)
    loras = {}
    for concept in prompts:
        loras[concept] = {name: (torch.randn(2, lin.in_features) * 0.1, torch.randn(lin.out_features, 2) * 0.1)
                          for name, lin in cross_attention_projections(mace.load_pipeline(tiny_path).unet)}

    def run(pipe):
        width = projection_weights(pipe.unet)[0].shape[1]
        preserve = torch.eye(width, dtype=torch.float64)
        mace.stages.refinement.refine(pipe, pairs, lam=0.1, preserve=preserve, preserve_scale=0.5, method=method)
        for tokens in ("all", "concept"):
            mace.stages.fusion.fuse(pipe, loras, prompts, lam=0.1, preserve=preserve, preserve_scale=0.5, method=method,
                             tokens=tokens)
        return [w.clone() for w in projection_weights(pipe.unet)]

    expected = run(mace.load_pipeline(tiny_path))
    _encoding_on_the_gpu(monkeypatch, mace.stages.refinement, mace.stages.fusion)
    with SimulatedGPU():
        got = run(mace.load_pipeline(tiny_path))
    for g, w in zip(got, expected, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_mace_erase_on_the_simulated_gpu_gives_the_cpus_model(tmp_path, monkeypatch):
    """Every stage of `mace erase` (prepare, refine, train, fuse, report) with `device: cuda`:
    the model, the LoRAs and everything made from them on the simulated GPU, the preservation
    cache read from disk on the host. No tensor meets one on the other device, and the final
    model is the CPU run's."""
    from safetensors.torch import load_file

    from mace.config import config_from_dict, load_config
    from mace.erase import erase
    from mace.pipelines.builtin import builtin_model_path
    from mace.pipelines.loading import load_pipeline
    from mace.stages.cache import build_preservation_cache

    monkeypatch.setenv("MACE_KERNELS_BACKEND", "torch")
    root = Path(__file__).resolve().parent.parent
    cache = tmp_path / "keep.safetensors"
    build_preservation_cache(load_pipeline("builtin:world"), ["a photo of Dorkpyx Zuthmyrk", "a photo of a glyph"],
                             cache, model_id="builtin:world", progress=False)

    def run(device: str) -> dict[str, torch.Tensor]:
        values = load_config(root / "configs" / "world_erase.yaml", check_paths=False).to_dict()
        out = tmp_path / device
        values.update(multi_concept=[["Qedark Draerba", "object"], ["Laengrur Zarourknourk", "object"]],
                      mapping_concept=["a glyph"] * 2, output_dir=str(out), input_data_dir=str(out / "data"),
                      final_save_path=str(out / "final"), domain_preservation_cache_path=str(cache),
                      report_prompts=["a photo of Dorkpyx Zuthmyrk"], device=device, max_train_steps=3,
                      num_images_per_concept=2, generation_steps=3)
        erase(config_from_dict({"MACE": values}), progress=False)
        return load_file(next((out / "final" / "unet").glob("*.safetensors")))

    expected = run("cpu")
    with SimulatedGPU():
        got = run("cuda")
    assert set(got) == set(expected)
    original = load_file(next((Path(builtin_model_path("builtin:world")) / "unet").glob("*.safetensors")))
    edited = [k for k in expected if not torch.equal(expected[k], original[k])]
    assert edited and all("attn2.to_k" in k or "attn2.to_v" in k for k in edited)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_mace_eval_and_cache_on_the_simulated_gpu_give_the_cpus_numbers(tmp_path, monkeypatch):
    """`mace cache` and `mace eval` (generation, the world's classifier, the shift score, the
    text and soft-prompt attacks) with --device cuda: the CPU's statistic and scores."""
    import json

    from safetensors.torch import load_file

    from mace.cli import main

    monkeypatch.setenv("MACE_KERNELS_BACKEND", "torch")
    prompts = tmp_path / "keep.txt"
    prompts.write_text("a photo of Dorkpyx Zuthmyrk\na photo of a glyph\n")

    def run(device: str) -> tuple[dict, dict]:
        out = tmp_path / device
        assert main(["cache", "--model", "builtin:world", "--prompts", str(prompts), "--out", str(out / "keep.safetensors"),
                     "--device", device]) == 0
        assert main(["eval", "--model", "builtin:world", "--original", "builtin:world",
                     "--erased", "Qedark Draerba", "--kept", "Dorkpyx Zuthmyrk,Granny Vixsengrourk",
                     "--images-per-concept", "1", "--background-images", "1", "--steps", "3", "--attack", "text,soft",
                     "--text-budget", "2", "--soft-budget", "2", "--attack-images", "1", "--out", str(out / "eval"),
                     "--device", device, "--quiet"]) == 0
        return load_file(out / "keep.safetensors"), json.loads((out / "eval" / "scores.json").read_text())

    cache, scores = run("cpu")
    with SimulatedGPU():
        gpu_cache, gpu_scores = run("cuda")
    assert set(gpu_cache) == set(cache)
    for k in cache:
        torch.testing.assert_close(gpu_cache[k], cache[k])

    def numbers(tree, path=""):
        if isinstance(tree, dict):
            for k, v in tree.items():
                yield from numbers(v, f"{path}.{k}")
        elif isinstance(tree, list):
            for i, v in enumerate(tree):
                yield from numbers(v, f"{path}[{i}]")
        elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
            yield path, tree

    got, want = dict(numbers(gpu_scores)), dict(numbers(scores))
    timing = [k for k in want if "seconds" in k or k.endswith("time")]
    assert want and set(got) == set(want)
    for k in set(want) - set(timing):
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k


@pytest.mark.slow
@pytest.mark.parametrize("model", ["builtin:tiny-sd2", "builtin:tiny-sdxl"])
def test_mace_erase_of_other_families_on_the_simulated_gpu_gives_the_cpus_model(model, tmp_path, monkeypatch):
    """v-prediction (SD 2.x) and SDXL (two text encoders, added conditions) with `device: cuda`."""
    import yaml
    from safetensors.torch import load_file

    import mace
    from mace.config import load_config
    from mace.erase import erase

    monkeypatch.setenv("MACE_KERNELS_BACKEND", "torch")
    cache = tmp_path / "keep.safetensors"
    mace.build_preservation_cache(mace.load_pipeline(model), ["a photo of a cat", "a painting of a house"], cache,
                                  progress=False)

    def run(device: str) -> dict[str, torch.Tensor]:
        out = tmp_path / device
        body = {"multi_concept": [[["emma-stone", "celebrity"], ["van-gogh", "style"]]],
                "mapping_concept": ["a person", "art"], "pretrained_model_name_or_path": model, "lamb": 0.1,
                "aug_length": 4, "rank": 1, "learning_rate": 1e-2, "max_train_steps": 3, "num_images_per_concept": 2,
                "generation_steps": 2, "sample_batch_size": 2, "input_data_dir": str(out / "data"),
                "output_dir": str(out), "final_save_path": str(out / "final"), "seed": 0, "report_prompts": ["a dog"],
                "prior_preservation_cache_path": str(cache), "train_preserve_scale": 10.0,
                "fuse_preserve_scale": 10.0, "device": device}
        path = tmp_path / f"{device}.yaml"
        path.write_text(yaml.safe_dump({"MACE": body}))
        erase(load_config(path), progress=False)
        return load_file(next((out / "final" / "unet").glob("*.safetensors")))

    expected = run("cpu")
    with SimulatedGPU():
        got = run("cuda")
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
