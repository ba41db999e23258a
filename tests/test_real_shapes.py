"""The real-shapes builtins are the published architectures, and the real-shapes benchmark's
bookkeeping. Built on the meta device: the shapes without 4 GB of random weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import mace
from mace.pipelines.builtin import build_sd14_shapes, build_sd21_shapes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# Published parameter counts: SD 1.4's UNet 859.52M, its VAE 83.65M, CLIP ViT-L/14's text
# encoder 123.06M; SD 2.1's UNet 865.91M and OpenCLIP ViT-H/14's text tower as SD 2.x runs it
# (23 layers) 340.39M.
@pytest.mark.parametrize("build, unet, vae, text, width, side, scheduler", [
    (build_sd14_shapes, 859_520_964, 83_653_863, 123_060_480, 768, 64, "PNDMScheduler"),
    (build_sd21_shapes, 865_910_724, 83_653_863, 340_387_840, 1024, 96, "DDIMScheduler"),
])
def test_real_shape_builtins_are_the_published_architectures(build, unet, vae, text, width, side, scheduler):
    with torch.device("meta"):
        pipe = build()
    assert (_count(pipe.unet), _count(pipe.vae), _count(pipe.text_encoder)) == (unet, vae, text)
    projections = mace.cross_attention_projections(pipe.unet)
    assert len(projections) == 32  # 16 attn2 layers, to_k and to_v each
    assert {lin.weight.shape[1] for _, lin in projections} == {width}
    assert pipe.unet.config.sample_size == side and pipe.vae_scale_factor == 8
    assert pipe.tokenizer.model_max_length == 77 and type(pipe.scheduler).__name__ == scheduler


def test_coco_style_prompts_are_distinct_and_seeded():
    from bench_real_shapes import coco_style_prompts

    prompts = coco_style_prompts(1000)
    assert len(set(prompts)) == 1000 and prompts == coco_style_prompts(1000)
    assert prompts != coco_style_prompts(1000, seed=1)
    with pytest.raises(SystemExit, match="at most"):
        coco_style_prompts(10**6)


def test_projection_scales_each_unit_cost_to_the_originals_settings():
    from argparse import Namespace

    from bench_real_shapes import ORIGINAL, projection

    args = Namespace(prompts=100, concepts=2, images=1, generation_steps=4, train_steps=4)
    steps = {"cache": {"seconds": 10.0}, "prepare": {"seconds": 16.0}, "refine": {"seconds": 2.0},
             "train": {"seconds": 40.0}, "fuse": {"seconds": 1.0}}
    out = projection(args, steps)
    assert out["cache_coco"] == pytest.approx(0.1 * ORIGINAL["coco_captions"])
    assert out["prepare"] == pytest.approx(2.0 * 100 * 8 * 30)  # 2 s per image step
    assert out["train"] == pytest.approx(5.0 * 100 * 50)  # 5 s per LoRA step
    assert (out["refine"], out["fuse"]) == (100.0, 50.0)
    assert out["total_without_cache"] == pytest.approx(48000 + 25000 + 150)
    # The report is bounded: 8 shown + 3 kept prompts, 2 images, before and after, 8 steps.
    steps["report"] = {"seconds": 24.0, "images": 6}  # 1 s per image and step at 4 steps
    out = projection(args, steps)
    assert out["report"] == pytest.approx(2 * 11 * 2 * 8)
    assert out["report_share_of_total"] == pytest.approx(352 / (48000 + 25000 + 150 + 352), abs=1e-4)
