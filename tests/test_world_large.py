"""builtin:world-large: its 540 two-tone concepts, their rendering, and the resumable training
of a world's text-to-image model."""

import json

import pytest
import torch

from mace.utils.tokenizer import clip_tokenizer
from mace.world import LARGE_WORLD, WORLD, get_world, glyph_judge, render, world_of
from mace.world.concepts import COLOURS
from mace.world.render import IMAGE_SIZE


def test_large_world_has_over_500_uniquely_named_two_tone_concepts():
    concepts = LARGE_WORLD.concepts
    assert len(concepts) == 540 and LARGE_WORLD.none_class == 540 and LARGE_WORLD.text_width >= 128
    words = [c.name.lower() for c in concepts] + [c.alias.lower() for c in concepts]
    assert len(set(words)) == len(words)
    assert len({c.description for c in concepts}) == len(concepts)
    assert all(c.lower_colour is not None and c.lower_colour != c.colour for c in concepts)
    tok = clip_tokenizer()
    assert min(len(tok(c.name).input_ids) - 2 for c in concepts) >= 3
    assert LARGE_WORLD.concept_by_name(concepts[17].alias.upper()) is concepts[17]
    with pytest.raises(KeyError, match="builtin:world-large"):
        LARGE_WORLD.concept_by_name("Qedark Draerba")  # a name of the small world only
    assert get_world("world-large") is LARGE_WORLD and get_world("builtin:world") is WORLD
    assert world_of("builtin:world-large") is LARGE_WORLD and world_of("builtin:tiny") is None
    # The small world is unchanged: same names, one colour per glyph.
    assert WORLD.concepts[0].name == "Qedark Draerba" and WORLD.concepts[0].lower_colour is None


def test_drawing_errors_separate_wrong_shapes_from_wrong_colours():
    from mace.world.check import drawing_errors

    def find(shape, colour, lower):
        return next(c.index for c in LARGE_WORLD.concepts if (c.shape, c.colour, c.lower_colour) == (shape, colour, lower))

    hexagon = find("hexagon", "red", "blue")
    disc_same_colours = find("disc", "red", "blue")
    hexagon_other = find("hexagon", "red", "orange")
    disc_other = find("disc", "orange", "yellow")
    square = find("square", "red", "blue")
    requested = [hexagon, hexagon, hexagon, hexagon, hexagon, square]
    predicted = [hexagon, disc_same_colours, hexagon_other, disc_other, LARGE_WORLD.none_class, square]
    errors = drawing_errors(LARGE_WORLD, requested, predicted)
    assert {k: errors[k] for k in ("right", "shape_wrong", "colour_wrong", "both_wrong", "no_concept")} == {
        "right": 2, "shape_wrong": 1, "colour_wrong": 1, "both_wrong": 1, "no_concept": 1}
    assert errors["by_shape"] == {"hexagon": 0.2, "square": 1.0}
    with pytest.raises(ValueError):
        drawing_errors(LARGE_WORLD, [hexagon], [])


def test_two_tone_glyph_has_its_upper_colour_above_and_lower_colour_below_the_middle():
    concept = next(c for c in LARGE_WORLD.concepts if c.shape == "square" and c.colour == "red" and c.lower_colour == "blue")
    image = (render(torch.tensor([concept.index]), backgrounds=torch.tensor([0]), generator=torch.Generator().manual_seed(5),
                    world=LARGE_WORLD)[0] + 1) / 2
    background = torch.tensor([0.04, 0.04, 0.05])
    glyph = (image - background[:, None, None]).abs().sum(0) > 0.3
    rows = glyph.any(1).nonzero().squeeze(1)
    top, bottom = int(rows.min()), int(rows.max())
    column = int(glyph.float().sum(0).argmax())
    red, blue = torch.tensor(COLOURS["red"]), torch.tensor(COLOURS["blue"])
    assert (image[:, top + 1, column] - red).abs().max() < 0.08
    assert (image[:, bottom - 1, column] - blue).abs().max() < 0.08
    assert 10 <= bottom - top + 1 <= IMAGE_SIZE
    # A one-colour concept of the small world (concept 0, a red disc) is red above and below.
    one = (render(torch.tensor([0]), backgrounds=torch.tensor([0]), generator=torch.Generator().manual_seed(5))[0] + 1) / 2
    glyph = (one - background[:, None, None]).abs().sum(0) > 0.3
    rows = glyph.any(1).nonzero().squeeze(1)
    column = int(glyph.float().sum(0).argmax())
    for row in (int(rows.min()) + 2, int(rows.max()) - 2):
        assert (one[:, row, column] - red).abs().max() < 0.08


def test_glyph_judge_names_two_tone_concepts():
    from mace.world.classifier import GlyphClassifier

    classifier = GlyphClassifier(num_classes=LARGE_WORLD.none_class + 1).eval()
    torch.nn.init.zeros_(classifier.concept_head.weight)
    with torch.no_grad():
        classifier.concept_head.bias.zero_()
        classifier.concept_head.bias[7] = 1.0  # every image is read as concept 7
    judge = glyph_judge(classifier, world=LARGE_WORLD)
    from PIL import Image

    images = [Image.new("RGB", (32, 32))] * 2
    c = LARGE_WORLD.concepts[7]
    assert judge(f"a photo of {c.name}", images) == f"classifier: 2/2 show {c.colour}/{c.lower_colour} {c.shape} ({c.name})"
    assert judge("plain grey", images[:1]) == f"classifier: {c.description}"


def _tiny_ldm(out, checkpoints, steps, *, checkpoint_every=2, cycles=1, context_from=None):
    from mace.world.train import train_ldm

    train_ldm(WORLD, out, steps, seed=3, per_concept=1, batch=4, checkpoint_dir=checkpoints, checkpoint_every=checkpoint_every,
              cycles=cycles, context_from=context_from)


def _same_weights(a_dir, b_dir):
    from safetensors.torch import load_file

    for component in ("unet", "text_encoder"):
        a = load_file(next((a_dir / component).glob("*.safetensors")))
        b = load_file(next((b_dir / component).glob("*.safetensors")))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), component


@pytest.fixture()
def vae_folder(tmp_path):
    from mace.world.train import build_vae

    torch.manual_seed(0)
    build_vae().save_pretrained(tmp_path / "vae")
    return tmp_path


def test_interrupted_ldm_training_resumes_to_the_same_weights(vae_folder, monkeypatch):
    """Killed after its first checkpoint, a rerun continues from it and ends where an
    uninterrupted run ends; a checkpoint made under other settings is refused."""
    from safetensors.torch import load_file

    from mace.world import train

    straight = vae_folder / "straight"
    (straight / "vae").parent.mkdir()
    (straight / "vae").symlink_to(vae_folder / "vae")
    _tiny_ldm(straight, vae_folder / "ck-straight", 4)

    resumed = vae_folder / "resumed"
    resumed.mkdir()
    (resumed / "vae").symlink_to(vae_folder / "vae")
    original_save = train.LdmCheckpoint.save

    def save_then_die(self, step, *args):
        original_save(self, step, *args)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(train.LdmCheckpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _tiny_ldm(resumed, vae_folder / "ck-resumed", 4)
    assert json.loads((vae_folder / "ck-resumed" / "checkpoint.json").read_text())["step"] == 2
    assert not (resumed / "unet").exists()
    monkeypatch.setattr(train.LdmCheckpoint, "save", original_save)
    _tiny_ldm(resumed, vae_folder / "ck-resumed", 4)

    for component in ("unet", "text_encoder"):
        a = load_file(next((straight / component).glob("*.safetensors")))
        b = load_file(next((resumed / component).glob("*.safetensors")))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), component

    with pytest.raises(SystemExit, match="other settings"):
        _tiny_ldm(resumed, vae_folder / "ck-resumed", 6)  # another step count: not this checkpoint's run


def test_missing_world_weights_name_the_training_command(tmp_path, monkeypatch, capsys):
    from mace import cli
    from mace.world import model

    monkeypatch.setattr(model, "weights_dir", lambda world=WORLD: tmp_path / world.key)
    with pytest.raises(FileNotFoundError, match="python -m mace.world.train --world world-large"):
        model.load_world_components(world=LARGE_WORLD)
    monkeypatch.setenv("MACE_HOME", str(tmp_path / "home"))
    model.weights_fingerprint.cache_clear()
    try:
        assert cli.main(["sample", "--model", "builtin:world-large", "--prompt", "a photo", "--out", str(tmp_path / "s")]) != 0
    finally:
        model.weights_fingerprint.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "builtin:world-large" in err[0] and "--world world-large" in err[0]


def test_a_finished_ldm_run_continues_into_more_cosine_cycles_as_if_asked_for_at_once(vae_folder):
    """Two cycles of 2 steps in one run end where one cycle, then a rerun asking for two, ends;
    a checkpoint past the steps asked for is refused."""
    runs = {}
    for name in ("straight", "continued"):
        runs[name] = vae_folder / name
        runs[name].mkdir()
        (runs[name] / "vae").symlink_to(vae_folder / "vae")
    _tiny_ldm(runs["straight"], vae_folder / "ck-straight", 2, checkpoint_every=100, cycles=2)
    _tiny_ldm(runs["continued"], vae_folder / "ck-continued", 2, checkpoint_every=100, cycles=1)
    assert json.loads((vae_folder / "ck-continued" / "checkpoint.json").read_text())["step"] == 2  # the cycle's end
    _tiny_ldm(runs["continued"], vae_folder / "ck-continued", 2, checkpoint_every=100, cycles=2)
    assert json.loads((vae_folder / "ck-continued" / "checkpoint.json").read_text())["step"] == 4
    _same_weights(runs["straight"], runs["continued"])
    with pytest.raises(SystemExit, match="past the 2 steps"):
        _tiny_ldm(runs["continued"], vae_folder / "ck-continued", 2, checkpoint_every=100, cycles=1)


def test_context_words_pad_half_the_captions_and_never_use_a_held_out_word():
    import re

    from mace.world.concepts import CONTEXT_WORDS, EVAL_BACKGROUND_TEMPLATES, EVAL_TEMPLATES, TRAIN_TEMPLATES
    from mace.world.train import caption

    held_out = {w for t in EVAL_TEMPLATES + EVAL_BACKGROUND_TEMPLATES for w in re.findall(r"[a-z]+", t)}
    assert not held_out & set(CONTEXT_WORDS)
    c = LARGE_WORLD.concepts[11]
    plain = [caption(11, 0, torch.Generator().manual_seed(i), LARGE_WORLD) for i in range(200)]
    padded = [caption(11, 0, torch.Generator().manual_seed(i), LARGE_WORLD, context=True) for i in range(200)]
    templates = {t.replace("{bg}", "black") for t in TRAIN_TEMPLATES}
    assert all(p.replace(c.name, "{}").replace(c.alias, "{}") in templates for p in plain)
    changed = 0
    for text, base in zip(padded, plain, strict=True):
        assert base in text  # the caption itself is drawn as without context words
        head, tail = text.split(base, 1)
        extra = head.split() + tail.split()
        assert len(head.split()) <= 3 and len(tail.split()) <= 3 and set(extra) <= set(CONTEXT_WORDS)
        changed += bool(extra)
    assert 60 <= changed <= 120  # half get 0-3 words before and 0-3 after (1 in 16 of them get none)


def test_context_words_start_at_their_step_and_a_plain_checkpoint_before_it_continues(vae_folder):
    """A run with context words from step 2 ends where a plain run to step 2, continued with them,
    ends, and not where a plain run ends; a plain checkpoint past step 2 is refused."""
    runs = {}
    for name in ("straight", "continued", "plain"):
        runs[name] = vae_folder / name
        runs[name].mkdir()
        (runs[name] / "vae").symlink_to(vae_folder / "vae")
    _tiny_ldm(runs["straight"], vae_folder / "ck-straight", 2, checkpoint_every=100, cycles=2, context_from=2)
    _tiny_ldm(runs["continued"], vae_folder / "ck-continued", 2, checkpoint_every=100, cycles=1)
    _tiny_ldm(runs["continued"], vae_folder / "ck-continued", 2, checkpoint_every=100, cycles=2, context_from=2)
    _same_weights(runs["straight"], runs["continued"])
    _tiny_ldm(runs["plain"], vae_folder / "ck-plain", 2, checkpoint_every=100, cycles=2)
    with pytest.raises(AssertionError):
        _same_weights(runs["straight"], runs["plain"])
    with pytest.raises(SystemExit, match="other settings"):
        _tiny_ldm(runs["plain"], vae_folder / "ck-plain", 2, checkpoint_every=100, cycles=3, context_from=2)
