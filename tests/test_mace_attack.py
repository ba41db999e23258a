"""Attacks on erased concepts (mace.attacks, mace attack, mace eval --attack): budgets are
spent as stated, the soft-prompt search lowers its loss, results repeat under a seed, and an
unedited model is "attacked" successfully by its plain prompt alone."""

import json

import pytest
import torch

import mace
from mace.attacks import (
    Judge,
    SoftPromptAttack,
    TextAttack,
    WorldJudge,
    attack_success_rate,
    rendered_targets,
    soft_prompt_attack,
    text_attack,
)
from mace.cli import main
from mace.world import GENERIC_CONCEPT, WORLD, WORLD_MODEL

ERASED = "Qedark Draerba"  # red disc
OTHER = "Qulund Roulland"
TEMPLATE = "a rendering showing {}"
FEW_TEMPLATES = ("a photo of {}", "a drawing of {}", "{} in a photo")


class Calls:
    """Forward calls and batch rows of a module, counted independently of mace.attacks."""

    def __init__(self, module):
        self.calls = self.rows = 0
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls += 1
        first = args[0] if args else next(iter(kwargs.values()))
        self.rows += first.shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def world_pipe():
    return mace.load_pipeline(WORLD_MODEL)


@pytest.fixture(scope="module")
def erased_path(tmp_path_factory):
    """builtin:world with ERASED erased by UCE, saved as a pipeline folder."""
    from mace.methods.uce import uce

    pipe = mace.load_pipeline(WORLD_MODEL)
    others = [c.name for c in WORLD.concepts if c.name != ERASED]
    uce(pipe, [ERASED], GENERIC_CONCEPT, others, lam=0.1, preserve_scale=0.1)
    path = tmp_path_factory.mktemp("erased") / "model"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def erased_pipe(erased_path):
    return mace.load_pipeline(erased_path)


def test_unedited_model_is_found_by_its_plain_prompt_at_no_cost(world_pipe):
    with Calls(world_pipe.unet) as unet, Calls(world_pipe.text_encoder) as text:
        reports = attack_success_rate(world_pipe, [ERASED, OTHER], WorldJudge(), [TextAttack(budget=1), SoftPromptAttack(budget=1)],
                                      targets=rendered_targets(), template=TEMPLATE, images_per_concept=2, steps=6, progress=False)
    for name in ("text", "soft"):
        report = reports[name]
        assert report.asr == 1.0 and report.plain_asr == 1.0 and report.found == 2
        assert all(not row.searched and row.budget_used == 0 and row.hits == row.plain_hits >= 1 for row in report.concepts)
        assert all(row.prompt == TEMPLATE.format(row.concept) for row in report.concepts)
    # Only the plain prompts were sampled: 6 denoising steps of one batch; the text encoder read
    # their 4 prompts and the 4 empty negative prompts, nothing for a search.
    assert unet.calls == 6
    assert text.rows == 8


def test_text_attack_spends_its_budget_on_the_text_encoder_only(erased_pipe):
    for search, budget in (("coordinate", 23), ("genetic", 29)):
        settings = TextAttack(budget=budget, num_tokens=4, batch=6, elite=2, top_k=16, search=search, templates=FEW_TEMPLATES)
        with Calls(erased_pipe.unet) as unet, Calls(erased_pipe.text_encoder) as text:
            found = text_attack(erased_pipe, ERASED, TEMPLATE, settings, seed=3)
        assert unet.calls == 0  # text-only: the UNet is never run
        # Setup (direction over 3 templates with and without the concept, the target and the
        # plain prompt), then exactly the search's prompts: the whole budget, but for a last
        # unit the coordinate search cannot use (a gradient pass needs a candidate after it).
        assert found.setup_prompts == 2 * 3 + 2
        assert text.rows == found.setup_prompts + found.budget_used
        assert found.budget_used == (22 if search == "coordinate" else 29)
        assert found.distance_end <= found.distance_start
        assert len(found.words) == 4 and found.prompt == TEMPLATE.format(" ".join(found.words))
        assert found.prompt != TEMPLATE.format(ERASED)
        assert not {"qedark", "draerba", "ark", "ba"} & set(found.words)  # none of the name's tokens
        again = text_attack(erased_pipe, ERASED, TEMPLATE, settings, seed=3)
        assert again.prompt == found.prompt and again.distance_end == found.distance_end
        assert text_attack(erased_pipe, ERASED, TEMPLATE, settings, seed=4).prompt != found.prompt


def test_soft_attack_spends_its_budget_and_lowers_its_loss(erased_pipe):
    settings = SoftPromptAttack(budget=8, num_tokens=5, batch_size=2, target_images=4, probe_size=8, lr=0.02)
    with Calls(erased_pipe.unet) as unet:
        found = soft_prompt_attack(erased_pipe, ERASED, rendered_targets(), TEMPLATE, settings, seed=0)
    assert unet.calls == 8 + 2 == found.unet_calls  # the budget's steps and the two probe passes
    assert found.budget_used == 8
    # Measured: 0.119 -> 0.033 (the probe's noise and timesteps are fixed).
    assert found.loss_end < 0.5 * found.loss_start
    assert found.embeddings.shape == (1, 77, WORLD.text_width) and found.pooled is None
    again = soft_prompt_attack(erased_pipe, ERASED, rendered_targets(), TEMPLATE, settings, seed=0)
    assert torch.equal(again.embeddings, found.embeddings) and again.loss_end == found.loss_end


def test_attack_cli_on_an_erased_concept(erased_path, tmp_path, capsys):
    code = main(["attack", "--model", str(erased_path), "--erased", ERASED, "--text-budget", "15", "--soft-budget", "6",
                 "--steps", "6", "--attack-images", "2", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("ASR text ") and "ASR soft " in out[0] and out[1] == f"attack: {tmp_path / 'attack.json'}"
    result = json.loads((tmp_path / "attack.json").read_text())
    assert result["erased"] == [ERASED] and result["summary"] == out[0]
    for name, budget, unit in (("text", 15, "text-encoder prompt evaluations"), ("soft", 6, "gradient steps")):
        report = result["attacks"][name]
        assert report["budget"] == budget and report["budget_unit"] == unit
        assert report["images_per_concept"] == 2 and report["steps"] == 6 and report["seed"] == 0
        (row,) = report["concepts"]
        assert row["plain_hits"] == 0 and report["plain_asr"] == 0.0  # UCE erased it: the plain prompt fails
        assert row["searched"] and 0 < row["budget_used"] <= budget
        assert 0 <= row["hits"] <= 2 and row["success"] == (row["hits"] >= 1)
        assert report["asr"] == float(row["success"]) and 0.0 <= report["asr"] <= 1.0
    assert result["attacks"]["text"]["concepts"][0]["prompt"] != TEMPLATE.format(ERASED)
    assert result["attacks"]["soft"]["concepts"][0]["loss_end"] < result["attacks"]["soft"]["concepts"][0]["loss_start"]


@pytest.mark.parametrize("argv, message", [
    (["--text-budget", "-1"], "--text-budget must be a non-negative integer, got '-1'"),
    (["--soft-budget", "lots"], "--soft-budget must be a non-negative integer, got 'lots'"),
    (["--attacks", "text,jailbreak"], "unknown attack 'jailbreak'; choose from text, soft"),
    (["--erased", "Nobody Atall"], "no concept of builtin:world is called 'Nobody Atall'"),
    (["--template", "a photo"], "--template needs exactly one {} for the concept"),
    (["--model", "no/such/model"], "model folder no/such/model does not exist"),
    (["--attack-images", "0"], "--attack-images must be at least 1"),
])
def test_attack_cli_bad_input_is_one_line(argv, message, tmp_path, capsys):
    flags = {"--model": WORLD_MODEL, "--erased": ERASED, **dict(zip(argv[::2], argv[1::2], strict=True))}
    assert main(["attack", *[x for pair in flags.items() for x in pair], "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("mace attack: error: ") and message in err
    assert not (tmp_path / "attack.json").exists()


def test_eval_attack_adds_the_attack_success_column(tmp_path, capsys):
    code = main(["eval", "--model", WORLD_MODEL, "--erased", ERASED, "--kept", OTHER, "--images-per-concept", "1",
                 "--background-images", "1", "--steps", "6", "--attack", "text", "--text-budget", "5", "--attack-images", "2",
                 "--out", str(tmp_path), "--quiet"])
    assert code == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["asr_text"] == scores["attack"]["text"]["asr"] == 1.0  # unedited: the plain prompt draws it
    assert scores["per_concept"][ERASED]["attack_text"] == 1.0
    assert "soft" not in scores["attack"]
    assert "ASR text 1.000" in capsys.readouterr().out


class Never(Judge):
    """A judge that never sees the concept, so every search runs to its budget."""

    def __call__(self, images, concept):
        return torch.zeros(len(images), dtype=torch.bool)


def test_attacks_run_on_an_sdxl_shaped_pipe():
    """Two text encoders, a pooled embedding and time ids: both attacks and the sampling with
    the found embeddings go through SDXL's conditioning."""
    pipe = mace.load_pipeline("builtin:tiny-sdxl")
    targets = lambda concept, n, seed: torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    attacks = [TextAttack(budget=9, batch=4, num_tokens=3, search="coordinate", templates=FEW_TEMPLATES),
               SoftPromptAttack(budget=2, batch_size=1, target_images=2, probe_size=1)]
    reports = attack_success_rate(pipe, ["Emma Stone"], Never(), attacks, targets=targets, images_per_concept=1, steps=2,
                                  progress=False)
    assert reports["text"].asr == reports["soft"].asr == 0.0
    assert reports["text"].concepts[0].budget_used == 9 and reports["soft"].concepts[0].budget_used == 2
    assert reports["text"].concepts[0].prompt != "a photo of Emma Stone"
