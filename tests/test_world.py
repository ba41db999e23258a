"""The glyph world: concepts, renderer, the shipped classifier and text-to-image model, and the
evaluation protocol before and after an erasure."""

import csv
import json

import pytest
import torch

import mace
from mace.utils.fingerprint import files_digest
from mace.utils.sampling import generate_images
from mace.utils.tokenizer import clip_tokenizer
from mace.world import (
    CONCEPTS,
    EVAL_TEMPLATES,
    NONE_CLASS,
    TRAIN_TEMPLATES,
    WORLD,
    WORLD_MODEL,
    WORLDS,
    concept_by_name,
    load_classifier,
    render,
)
from mace.world.evaluate import evaluate_world, evaluation_prompts, frechet_distance

# A handful of concepts with neighbours among them: red disc / red ring (colour), blue star /
# purple star (shape), and unrelated ones.
ERASED = "Qedark Draerba"  # red disc
KEPT = ["Nyfaes Laendlothzhu", "Granny Vixsengrourk", "Dorkpyx Zuthmyrk", "Laengrur Zarourknourk"]


def test_concepts_are_many_named_and_tokenise_into_several_pieces():
    tok = clip_tokenizer()
    assert len(CONCEPTS) >= 120
    words = [c.name.lower() for c in CONCEPTS] + [c.alias.lower() for c in CONCEPTS]
    assert len(set(words)) == len(words)  # every name and alias is unique
    for c in CONCEPTS:
        assert len(tok(c.name).input_ids) - 2 >= 3, c
        assert len(tok(c.alias).input_ids) - 2 >= 2, c
        assert set(c.alias.lower().split()).isdisjoint(c.name.lower().split())
        assert concept_by_name(c.alias.upper()) is c
    assert len({c.description for c in CONCEPTS}) == len(CONCEPTS)
    # Neighbours exist: every colour and every shape is shared by several concepts.
    assert min(sum(c.colour == x.colour for x in CONCEPTS) for c in CONCEPTS) >= 10
    assert set(EVAL_TEMPLATES).isdisjoint(TRAIN_TEMPLATES)
    with pytest.raises(KeyError, match="no concept"):
        concept_by_name("Emma Stone")


def test_render_is_seeded_and_checks_indices():
    a = render(torch.arange(5), generator=torch.Generator().manual_seed(3))
    b = render(torch.arange(5), generator=torch.Generator().manual_seed(3))
    assert a.shape == (5, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, render(torch.arange(5), generator=torch.Generator().manual_seed(4)))  # the seed matters
    assert a.min() >= -1 and a.max() <= 1
    blank = render(torch.tensor([NONE_CLASS]), generator=torch.Generator().manual_seed(0))
    assert blank.std(dim=(2, 3)).max() < 1e-6  # background only: one flat colour
    with pytest.raises(ValueError, match="concept indices"):
        render(torch.tensor([NONE_CLASS + 1]))


def test_shipped_classifier_reads_fresh_renders():
    classifier = load_classifier()
    g = torch.Generator().manual_seed(123)
    labels = torch.cat([torch.arange(len(CONCEPTS)).repeat(4), torch.full((40,), NONE_CLASS)])
    predicted, features = classifier.predict(render(labels, generator=g))
    assert features.shape == (labels.numel(), classifier.config["feature_dim"])
    assert (predicted == labels).float().mean() >= 0.98


@pytest.fixture(scope="module")
def world_pipe():
    return mace.load_pipeline(WORLD_MODEL)


def test_world_model_is_a_stable_diffusion_folder(world_pipe):
    from diffusers import StableDiffusionPipeline

    from mace.pipelines.builtin import builtin_model_path

    pipe = StableDiffusionPipeline.from_pretrained(builtin_model_path(WORLD_MODEL), safety_checker=None)
    assert pipe.unet.config.cross_attention_dim == 64
    assert pipe.tokenizer("a photo of Emma Stone").input_ids == [49406, 320, 1125, 539, 7445, 2441, 49407]
    assert len(mace.cross_attention_projections(pipe.unet)) == 14  # 7 attn2 layers x (to_k, to_v)


def test_images_depend_only_on_their_own_seed(world_pipe):
    prompts = [f"a photo of {CONCEPTS[i].name}" for i in (0, 5, 9)]
    batch = generate_images(world_pipe, prompts, [11, 12, 13], steps=4, progress=False)
    alone = generate_images(world_pipe, prompts[1:2] * 2, [12, 14], steps=4, progress=False)
    torch.testing.assert_close(batch[1:2], alone[:1], atol=2e-4, rtol=0)
    # ... and do depend on it: the same prompt with another seed gives another image.
    assert float((alone[0] - alone[1]).abs().max()) > 0.1


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_difference():
    classifier = load_classifier()
    g = torch.Generator().manual_seed(0)
    a = render(torch.arange(40) % 12, generator=g)
    b = render(torch.arange(40) % 12, generator=g)
    c = render(torch.arange(40) % 12 + 60, generator=g)
    assert frechet_distance(classifier, a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(classifier, a, b) < frechet_distance(classifier, a, c)


def test_evaluation_prompts_have_stable_seeds():
    p1 = evaluation_prompts([0, 3], [7], images_per_concept=2, background_images=1)
    p2 = evaluation_prompts([3], [7, 9], images_per_concept=2, background_images=1)
    seeds1 = {(p.prompt, p.kind): p.seed for p in p1}
    shared = [(p.prompt, p.kind) for p in p2 if (p.prompt, p.kind) in seeds1]
    assert shared and all(seeds1[k] == next(p.seed for p in p2 if (p.prompt, p.kind) == k) for k in shared)
    assert {p.kind for p in p1} == {"erased", "alias", "kept", "background"}
    assert len({p.seed for p in p1}) == len(p1)


def test_world_model_draws_what_it_is_asked_and_uce_erases_it(world_pipe, tmp_path):
    """Before erasure the classifier finds the requested concept (held-out templates, primary
    names and aliases); after UCE of one concept it is gone and its neighbours stay."""
    before = evaluate_world(world_pipe, [ERASED], KEPT, images_per_concept=5, background_images=1,
                            csv_path=tmp_path / "before.csv", progress=False)
    # Measured (seeds fixed): Acc_e = Acc_g = 1.0 and Acc_s = 1.0 before erasure; the
    # issue's bar is 0.9 / 0.8 averaged over all 120 concepts, so these margins are loose.
    assert before.acc_e >= 0.8 and before.acc_g >= 0.8 and before.acc_s >= 0.85
    from mace.methods.uce import uce

    edited = mace.load_pipeline(WORLD_MODEL)  # the module's pipeline stays unedited
    others = [c.name for c in CONCEPTS if c.name != ERASED]
    uce(edited, [ERASED], "a glyph", others, lam=0.1, preserve_scale=0.1)
    after = evaluate_world(edited, [ERASED], KEPT, images_per_concept=5, background_images=1, progress=False)
    # Measured: Acc_e = Acc_g = 0.0 and Acc_s = 1.0 (the red ring, a colour neighbour, included).
    # Bounds leave room for one or two images to flip on another BLAS or torch version.
    assert after.acc_e <= 0.2 and after.acc_g <= 0.4
    assert after.acc_s >= 0.75
    with open(tmp_path / "before.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0].keys() >= {"prompt", "evaluation_seed", "case_number", "kind", "predicted"}
    assert len(rows) == before.images


@pytest.mark.parametrize("key", ["world", "world-large"])
def test_shipped_model_passes_its_drawing_bar(key):
    """quality.json is the check stage's measurement of the shipped weights (their fingerprint)
    and meets the bar the erasure measurements rest on: on held-out templates the classifier
    finds the named concept in >= 90% of the images prompted by name and >= 80% by alias."""
    from mace.world.model import classifier_digest, weights_dir, weights_fingerprint

    world = WORLDS[key]
    quality = json.loads((weights_dir(world) / "quality.json").read_text())
    assert quality["weights"] == weights_fingerprint(world)
    assert quality["classifier"] == classifier_digest(world=world)
    assert quality["images"] == 2 * quality["images_per_concept"] * world.num_concepts
    assert quality["name_accuracy"] >= 0.9 and quality["alias_accuracy"] >= 0.8
    trained = quality["training_templates"]
    assert trained["name_accuracy"] >= quality["name_accuracy"] - 0.05


def test_check_measures_the_training_templates_too(world_pipe):
    """The check stage's second measurement: names and aliases on the templates the model was
    trained on, read by the classifier against the concept each prompt asked for."""
    from mace.world.check import training_template_accuracy

    concepts = [concept_by_name(n).index for n in [ERASED, *KEPT]]
    shares = training_template_accuracy(world_pipe, load_classifier(), WORLD, concepts, images_per_concept=2)
    # Measured: 1.0 and 1.0 (20 images); a prompt scored against the wrong concept would read ~0.
    assert shares["name"] >= 0.8 and shares["alias"] >= 0.8


@pytest.mark.slow
def test_mace_eval_cli_on_the_world(tmp_path, capsys):
    from mace.cli import main

    code = main(["eval", "--model", WORLD_MODEL, "--original", WORLD_MODEL, "--erased", ERASED, "--kept", ",".join(KEPT),
                 "--images-per-concept", "2", "--background-images", "2", "--steps", "10", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["shift"] == pytest.approx(0.0, abs=1e-6)  # the same model: no shift at all
    assert scores["acc_e"] >= 0.5 and scores["acc_s"] >= 0.75
    assert "Acc_e" in capsys.readouterr().out
    assert main(["eval", "--model", WORLD_MODEL, "--erased", "Nobody Atall", "--out", str(tmp_path)]) == 2


def test_report_judge_reads_glyph_images():
    """report.html labels each strip with what the classifier sees; on clean renders it must be right."""
    from PIL import Image

    from mace.config import config_from_dict
    from mace.world import judge_for

    config = config_from_dict({"multi_concept": [[ERASED, "object"]], "mapping_concept": ["a glyph"],
                               "pretrained_model_name_or_path": WORLD_MODEL}, check_paths=False)
    judge = judge_for(config.pretrained_model_name_or_path)
    red_disc = concept_by_name(ERASED)
    pixels = ((render(torch.full((4,), red_disc.index), generator=torch.Generator().manual_seed(0)) + 1) * 127.5).round()
    images = [Image.fromarray(p.permute(1, 2, 0).byte().numpy()) for p in pixels]
    assert judge(f"a photo of {ERASED}", images) == f"classifier: 4/4 show red disc ({ERASED})"
    assert judge("a photo of Nyfaes Laendlothzhu", images) == "classifier: 0/4 show red ring (Nyfaes Laendlothzhu)"
    blank = ((render(torch.full((2,), NONE_CLASS)) + 1) * 127.5).round()
    assert judge("plain navy", [Image.fromarray(p.permute(1, 2, 0).byte().numpy()) for p in blank]) == "classifier: nothing, nothing"
    tiny = config_from_dict({"multi_concept": [["ship", "object"]], "mapping_concept": ["ground"],
                             "pretrained_model_name_or_path": "builtin:tiny"}, check_paths=False)
    assert judge_for(tiny.pretrained_model_name_or_path) is None


@pytest.mark.slow
def test_world_training_script_writes_loadable_weights(tmp_path, capsys):
    """A few steps of each training stage: every component is written and loads back."""
    from mace.world import load_world_components
    from mace.world.classifier import GlyphClassifier
    from mace.world.train import main

    main(["--out", str(tmp_path), "--vae-steps", "2", "--classifier-steps", "2", "--ldm-steps", "2", "--per-concept", "2",
          "--stages", "vae,classifier,ldm", "--checkpoint-dir", str(tmp_path / "checkpoints")])
    components = load_world_components(tmp_path)
    assert components["unet"].config.cross_attention_dim == 64 and components["vae"].config.latent_channels == 4
    assert GlyphClassifier.from_pretrained(tmp_path / "classifier").config["num_classes"] == len(CONCEPTS) + 1
    records = {stage: json.loads((tmp_path / f"training-{stage}.json").read_text()) for stage in ("vae", "classifier", "ldm")}
    assert {stage: r["steps"] for stage, r in records.items()} == {"vae": {"vae": 2}, "classifier": {"classifier": 2}, "ldm": {"ldm": 2}}
    assert records["classifier"]["vae"] == records["ldm"]["vae"] and "vae" not in records["vae"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left
    assert json.loads((tmp_path / "checkpoints" / "checkpoint.json").read_text())["step"] == 2
    # --peek reads the checkpoint's EMA models: those the finished stage saved (as float16).
    from safetensors.torch import load_file

    from mace.world.train import checkpoint_ema

    unet, text_encoder, step = checkpoint_ema(WORLD, tmp_path / "checkpoints")
    saved = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert step == 2 and saved.keys() == unet.state_dict().keys()
    assert all(torch.equal(v.half(), saved[k]) for k, v in unet.state_dict().items())
    capsys.readouterr()
    main(["--out", str(tmp_path), "--peek", "40", "--checkpoint-dir", str(tmp_path / "checkpoints")])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("builtin:world at step 2: ") and " of 3 names " in line and "no concept" in line and "binding gap t300 " in line
    # A rerun skips the stages done under the same settings and runs the one whose settings changed.
    unet_before = (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    main(["--out", str(tmp_path), "--vae-steps", "2", "--classifier-steps", "3", "--ldm-steps", "2", "--per-concept", "2",
          "--stages", "vae,classifier,ldm", "--checkpoint-dir", str(tmp_path / "checkpoints")])
    out = capsys.readouterr().out
    assert "vae: already trained" in out and "ldm: already trained" in out and "classifier: already" not in out
    assert json.loads((tmp_path / "training-classifier.json").read_text())["steps"] == {"classifier": 3}
    assert json.loads((tmp_path / "training-vae.json").read_text()) == records["vae"]
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet_before
    # The reading is kept beside the checkpoint folder; a reading of another run's checkpoint
    # (other settings) is kept there too but never taken into this run's record.
    from mace.world.train import peeks_file

    kept = json.loads(peeks_file(tmp_path / "checkpoints").read_text())["readings"]
    assert [(r["step"], r["every"], r["concepts"]) for r in kept] == [(2, 40, 3)] and set(kept[0]["binding_gap"]) == {"t300", "t600"}
    other = {**kept[0], "settings": {**kept[0]["settings"], "seed": 99}}
    peeks_file(tmp_path / "checkpoints").write_text(json.dumps({"readings": [other, *kept]}))
    # One more cycle resumes at step 2; its record carries the run's reading, not the other's.
    main(["--out", str(tmp_path), "--ldm-steps", "2", "--per-concept", "2", "--ldm-cycles", "2", "--stages", "ldm",
          "--checkpoint-dir", str(tmp_path / "checkpoints")])
    assert json.loads((tmp_path / "training-ldm.json").read_text())["peeks"] == kept


@pytest.mark.slow
def test_text_encoder_pretraining_then_a_unet_on_it_frozen(tmp_path, capsys):
    """With a text stage the text encoder is pretrained on naming the concept of a caption; the
    text-to-image stage then trains the UNet alone and leaves that encoder as it was."""
    from safetensors.torch import load_file

    from mace.world.train import checkpoint_ema, main

    main(["--out", str(tmp_path), "--vae-steps", "2", "--text-steps", "120", "--ldm-steps", "2", "--per-concept", "2",
          "--stages", "vae,text,ldm", "--checkpoint-dir", str(tmp_path / "checkpoints")])
    text_record = json.loads((tmp_path / "training-text.json").read_text())
    ldm_record = json.loads((tmp_path / "training-ldm.json").read_text())
    assert text_record["steps"] == {"text": 120}
    # 120 steps of 256 captions: the head already names most of the 120 concepts on templates it never saw.
    assert text_record["held_out_templates"]["name_accuracy"] > 0.5
    encoder_file = tmp_path / "text_encoder" / "model.safetensors"
    assert ldm_record["text_encoder"] == files_digest([encoder_file])
    state = load_file(tmp_path / "checkpoints" / "state.safetensors")
    assert not [k for k in state if "text_encoder" in k]  # frozen: neither trained nor kept in the checkpoint
    unet, text_encoder, step = checkpoint_ema(WORLD, tmp_path / "checkpoints", tmp_path)
    pretrained = load_file(encoder_file)
    assert step == 2 and all(torch.equal(v.half(), pretrained[k]) for k, v in text_encoder.state_dict().items() if k in pretrained)
    with pytest.raises(SystemExit, match="frozen pretrained text encoder"):
        checkpoint_ema(WORLD, tmp_path / "checkpoints", tmp_path / "elsewhere")
    # A retrained text encoder is a new input of the text-to-image stage: its record no longer matches.
    capsys.readouterr()
    main(["--out", str(tmp_path), "--vae-steps", "2", "--text-steps", "121", "--ldm-steps", "2", "--per-concept", "2",
          "--stages", "vae,text,ldm", "--checkpoint-dir", str(tmp_path / "other-checkpoints")])
    out = capsys.readouterr().out
    assert "vae: already trained" in out and "ldm: already trained" not in out
    assert json.loads((tmp_path / "training-ldm.json").read_text())["text_encoder"] == files_digest([encoder_file])
    assert files_digest([encoder_file]) != ldm_record["text_encoder"]


@pytest.mark.slow
def test_text_to_image_stage_over_two_ranks(tmp_path):
    """Under torchrun the ranks split each batch (DistributedDataParallel), each with a data
    stream of its own kept in the checkpoint; rank 0 writes; a resume needs the same ranks."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from mace.world.train import main

    main(["--out", str(tmp_path), "--vae-steps", "2", "--stages", "vae"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)

    def torchrun(*args):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                   "mace.world.train", "--out", str(tmp_path), "--per-concept", "2", "--ldm-steps", "3",
                   "--checkpoint-dir", str(tmp_path / "checkpoints"), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    run = torchrun("--stages", "ldm")
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "training-ldm.json").read_text())
    assert record["ranks"] == 2 and record["steps"] == {"ldm": 3}
    meta = json.loads((tmp_path / "checkpoints" / "checkpoint.json").read_text())
    assert meta["step"] == 3 and meta["settings"]["ranks"] == 2 and meta["settings"]["batch"] == 64
    state = load_file(tmp_path / "checkpoints" / "state.safetensors")
    assert not torch.equal(state["generator"], state["generator.1"])  # each rank drew its own share
    saved = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(state[f"ema_unet.{k}"].half(), v) for k, v in saved.items())
    # One more cycle continues the two ranks' checkpoint; one process may not resume it.
    run = torchrun("--stages", "ldm", "--ldm-cycles", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("resuming the text-to-image training at step 3 of 6") == 1  # rank 0 speaks
    assert json.loads((tmp_path / "checkpoints" / "checkpoint.json").read_text())["step"] == 6
    with pytest.raises(SystemExit, match="made under other settings"):
        main(["--out", str(tmp_path), "--per-concept", "2", "--ldm-steps", "3", "--ldm-cycles", "3", "--stages", "ldm",
              "--checkpoint-dir", str(tmp_path / "checkpoints")])
    run = torchrun("--stages", "vae,ldm")
    assert run.returncode != 0 and "only the text-to-image stage runs" in run.stderr


def test_binding_gap_tells_a_model_that_reads_names_from_one_that_does_not():
    """The peek's binding gap: the shipped world model's denoising error rises several-fold when
    the caption names another concept; an untrained UNet's does not move."""
    from mace.world import load_world_components
    from mace.world.check import binding_gap, world_pipeline
    from mace.world.train import build_unet

    components = load_world_components()
    concepts = list(range(0, len(CONCEPTS), 8))
    trained = binding_gap(world_pipeline(components), WORLD, concepts)
    torch.manual_seed(0)
    untrained = binding_gap(world_pipeline({**components, "unet": build_unet(WORLD)}), WORLD, concepts)
    assert trained["t300"] > 2 and trained["t600"] > 0.5
    assert all(abs(v) < 0.05 for v in untrained.values())


def test_training_recipe_overrides_are_checked(tmp_path, capsys):
    """A step count below its minimum is a one-line usage error; a text stage asked of a recipe
    that trains its text encoder with the UNet runs nothing."""
    from mace.world.train import main

    for flag, value in (("--ldm-steps", "0"), ("--text-steps", "-1"), ("--per-concept", "0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(tmp_path), "--stages", "check", flag, value])
        assert exit_info.value.code == 2
        assert f"{flag} must be at least" in capsys.readouterr().err
    main(["--out", str(tmp_path), "--stages", "text"])
    assert "nothing to pretrain" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())
