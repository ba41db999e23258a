"""Damaged files a user names end in one line naming the file and the problem, never a traceback."""

import subprocess
import sys

import pytest
import yaml
from PIL import Image

import mace
from mace.cli import main as mace_main
from mace.pipelines.lora_io import LoraFormatError, read_lora
from mace.stages.cache import CacheMismatchError, read_prompt_file
from mace.stages.prepare import load_concept_data
from mace.utils.images import ImageFileError

GARBAGE = b"\x00\x01not what it claims to be\xff" * 10


def _cli_error(capsys, argv) -> str:
    assert mace_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _config(tmp_path, **changes):
    body = {"multi_concept": [[["ship", "object"]]], "mapping_concept": ["ground"],
            "pretrained_model_name_or_path": "builtin:tiny", "lamb": 0.1, "aug_length": 2,
            "output_dir": str(tmp_path / "out"), "final_save_path": str(tmp_path / "final")}
    body.update(changes)
    path = tmp_path / "erase.yaml"
    path.write_text(yaml.safe_dump({"MACE": body}))
    return path


def test_config_that_is_not_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MACE:\n  lamb: [0.1\n  rank: 1\n")
    assert f"{bad}: not a valid YAML config" in _cli_error(capsys, ["erase", str(bad), "--quiet"])
    bad.write_text("- just\n- a list\n")
    assert "must be a YAML mapping" in _cli_error(capsys, ["erase", str(bad), "--quiet"])


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lamb", "abc", "lamb must be a number, got 'abc'"),
    ("lamb", [0.1], "lamb must be a number, got [0.1]"),
    ("lamb", True, "lamb must be a number, got True"),
    ("max_train_steps", 2.5, "max_train_steps must be a whole number, got 2.5"),
    ("preserve_count_exponent", 0.5, "preserve_count_exponent needs preserve_scale_mode: per_token"),
])
def test_a_config_value_of_the_wrong_kind_is_one_line_naming_the_key(tmp_path, capsys, key, value, message):
    config = _config(tmp_path, **{key: value})
    assert message in _cli_error(capsys, ["erase", str(config), "--quiet"])
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(("changes", "overrides", "message"), [
    ({"multi_concept": [["${oc.env:HOME}", "object"]]}, [], "multi_concept[0][0]: '${oc.env:HOME}' is an interpolation"),
    ({"mapping_concept": "${MACE.multi_concept}"}, [], "mapping_concept: '${MACE.multi_concept}' is an interpolation"),
    ({}, ["output_dir=${oc.env:HOME}/runs"], "output_dir: '${oc.env:HOME}/runs' is an interpolation"),
])
def test_an_interpolation_is_refused_naming_its_key(tmp_path, capsys, monkeypatch, changes, overrides, message):
    """Values are data: OmegaConf would put an environment variable (a token) into prompts and
    folder names, or resolve a loop with an exception of its own."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = _config(tmp_path, **changes)
    argv = ["erase", str(config), "--quiet"] + (["--set", *overrides] if overrides else [])
    assert message in _cli_error(capsys, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erase.yaml"]


def test_numbers_yaml_reads_as_text_are_taken_as_numbers(tmp_path):
    """PyYAML reads 1e-3 (no dot) as a string; a whole float is taken for an int key."""
    from mace.config import load_config

    config = load_config(_config(tmp_path, lamb="1e-3", max_train_steps=3.0, rank="2"), check_paths=False)
    assert (config.lamb, config.max_train_steps, config.rank) == (0.001, 3, 2)
    assert isinstance(config.max_train_steps, int) and isinstance(config.rank, int)


def test_truncated_cache(tmp_path, capsys, tiny_pipe):
    cache = tmp_path / "prior.safetensors"
    mace.build_preservation_cache(tiny_pipe, ["a photo of a dog"], cache, progress=False)
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.raises(CacheMismatchError, match="not a readable safetensors file"):
        mace.load_preservation_cache(cache)
    err = _cli_error(capsys, ["erase", str(_config(tmp_path, prior_preservation_cache_path=str(cache),
                                                  train_preserve_scale=1.0)), "--stages", "refine", "--quiet"])
    assert str(cache) in err and "not a readable safetensors file" in err
    assert not (tmp_path / "out" / "refined").exists()


def test_damaged_lora(tmp_path, capsys):
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(GARBAGE)
    with pytest.raises(LoraFormatError, match=f"{lora}: not a readable safetensors file"):
        read_lora(lora, ["down.attn2.to_k"])


def test_damaged_image_and_mask(tmp_path):
    images, masks = tmp_path / "ship", tmp_path / "ship mask"
    images.mkdir()
    masks.mkdir()
    Image.new("RGB", (16, 16)).save(images / "0.png")
    (masks / "0.png").write_bytes(GARBAGE)
    with pytest.raises(ImageFileError, match=r"ship mask/0.png: not a readable image"):
        load_concept_data(tmp_path, "ship", "object", 16)
    (images / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + GARBAGE)  # a PNG header, then nothing valid
    with pytest.raises(ImageFileError, match=r"ship/0.png: not a readable image"):
        load_concept_data(tmp_path, "ship", "style", 16)


def test_a_decompression_bomb_is_an_unreadable_image(tmp_path, monkeypatch):
    """An image whose header claims more pixels than PIL's cap (a few kB that decode to GBs)."""
    images, masks = tmp_path / "ship", tmp_path / "ship mask"
    images.mkdir()
    masks.mkdir()
    Image.new("RGB", (16, 16)).save(images / "0.png")
    Image.new("L", (16, 16)).save(masks / "0.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels: over twice the cap, PIL's bomb error
    with pytest.raises(ImageFileError, match=r"ship/0.png: not a readable image \(DecompressionBombError"):
        load_concept_data(tmp_path, "ship", "object", 16)


def test_prompt_file_that_is_not_text(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(GARBAGE)
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        read_prompt_file(prompts)
    err = _cli_error(capsys, ["cache", "--model", "builtin:tiny", "--prompts", str(prompts),
                              "--out", str(tmp_path / "c.safetensors")])
    assert str(prompts) in err


def test_multi_line_errors_reach_the_cli_as_one_line(capsys, monkeypatch):
    import mace.cli

    def boom(args):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr(mace.cli, "_cmd_cache", boom)
    assert _cli_error(capsys, ["cache", "--model", "m", "--prompts", "p", "--out", "o"]).endswith("first line second line")


def test_commands_print_no_torchvision_notice():
    out = subprocess.run([sys.executable, "-c", "import mace, mace.erase; print('ok')"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert "torchvision" not in out.stderr, out.stderr


def test_any_key_of_any_wrong_kind_is_a_config_error(tmp_path):
    """Every key, given null, a list, a mapping, a text, a negative, a switch, a huge number, an
    empty list or an empty text, loads or is refused with a ConfigError (one line at the CLI);
    never a TypeError from deep inside a run."""
    import warnings

    from mace.config import KNOWN_KEYS, ConfigError, config_from_dict

    base = {"multi_concept": [["ship", "object"]], "mapping_concept": ["ground"], "pretrained_model_name_or_path": "builtin:tiny",
            "output_dir": str(tmp_path / "out"), "final_save_path": str(tmp_path / "final")}
    refused = set()
    for key in KNOWN_KEYS:
        for value in (None, [1], {"a": 1}, "x", -1, True, 1e30, [], ""):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    config_from_dict({**base, key: value})
                except ConfigError:
                    refused.add(key)
    assert {"lamb", "use_pooler", "final_save_path", "mapping_concept", "report_to", "output_dir"} <= refused
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("lamb", "--set 'lamb': expected KEY=VALUE"),
    ("=3", "--set '=3': expected KEY=VALUE"),
    ("multi_concept=[[ship", "--set multi_concept=[[ship: not a valid override"),
    ("lamb=", "lamb must be a number, got null"),
    ("use_pooler=3", "use_pooler must be true or false, got 3"),
])
def test_a_bad_override_is_one_line(tmp_path, capsys, override, message):
    assert message in _cli_error(capsys, ["erase", str(_config(tmp_path)), "--quiet", "--set", override])
    assert not (tmp_path / "out").exists()
