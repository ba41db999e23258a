"""The registry of erasure methods: `mace erase` runs MACE, refinement only, UCE, SPEED and RECE
the same way, and each writes the same outputs (a diffusers folder at final_save_path, a
summary); a one-shot method's folder holds exactly what calling the method directly gives."""

import pytest
import torch
import yaml

import mace
from mace.cli import main as mace_main
from mace.config import ConfigError, load_config
from mace.methods.registry import METHODS, run_erasure
from mace.pipelines.components import cross_attention_projections

NAMES = ["Emma Stone", "ship"]
GUIDES = ["a person", "a boat"]
KEEP = ["a dog", "a red car", "a bowl of soup", "Tom Hanks"]


def _config_file(tmp_path, **changes):
    body = {
        "multi_concept": [[n, "object"] for n in NAMES], "mapping_concept": GUIDES,
        "pretrained_model_name_or_path": "builtin:tiny", "lamb": 0.1, "aug_length": 2, "prompt_len": 30,
        "max_train_steps": 2, "num_images_per_concept": 1, "generation_steps": 2, "report_steps": 2,
        "report_images": 1, "input_data_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"),
        "final_save_path": str(tmp_path / "final"), "preserve_concepts": KEEP, "seed": 3,
    }
    body.update(changes)
    path = tmp_path / "erase.yaml"
    path.write_text(yaml.safe_dump({"MACE": body}))
    return path


def _weights(folder):
    pipe = mace.load_pipeline(folder)
    return [lin.weight.detach().clone() for _, lin in cross_attention_projections(pipe.unet)]


def _direct(method: str, scale: float):
    from mace.methods.rece import rece
    from mace.methods.speed import speed
    from mace.methods.uce import uce

    pipe = mace.load_pipeline("builtin:tiny")
    if method == "uce":
        uce(pipe, NAMES, GUIDES, KEEP, lam=0.1, preserve_scale=scale)
    elif method == "speed":
        speed(pipe, NAMES, GUIDES, KEEP, threshold=scale, seed=3)
    else:
        rece(pipe, NAMES, GUIDES, KEEP, lam=0.1, preserve_scale=scale)
    return [lin.weight.detach().clone() for _, lin in cross_attention_projections(pipe.unet)]


@pytest.mark.parametrize("method", ["uce", "speed", "rece"])
def test_one_shot_methods_write_what_the_method_computes(tmp_path, method):
    original = _weights("builtin:tiny")
    config = load_config(_config_file(tmp_path, erasure_method=method))
    summary = run_erasure(config, progress=False)  # default: the method's knob at its default
    assert summary.final_model == str(tmp_path / "final") and summary.concepts == NAMES
    assert "edit" in summary.seconds and summary.report  # default stages: edit and report
    assert (tmp_path / "out" / "report.html").exists()
    written = _weights(tmp_path / "final")
    expected = _direct(method, METHODS[method].default_scale)
    assert all(torch.equal(a, b) for a, b in zip(written, expected, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(written, original, strict=True))
    # method_scale is the knob: another value, another model.
    config = load_config(_config_file(tmp_path, erasure_method=method, method_scale=0.9))
    run_erasure(config, ("edit",), progress=False)
    rescaled = _weights(tmp_path / "final")
    assert all(torch.equal(a, b) for a, b in zip(rescaled, _direct(method, 0.9), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(rescaled, written, strict=True))


def test_refine_only_result_is_the_refined_model_in_the_final_folder(tmp_path):
    cache = tmp_path / "keep.safetensors"
    mace.build_preservation_cache(mace.load_pipeline("builtin:tiny"), KEEP, cache, progress=False)
    config = load_config(_config_file(tmp_path, erasure_method="refine", method_scale=0.5,
                                      prior_preservation_cache_path=str(cache)))
    summary = run_erasure(config, ("refine",), progress=False)
    assert summary.final_model == str(tmp_path / "final")
    refined = _weights(summary.refined_model)
    assert all(torch.equal(a, b) for a, b in zip(_weights(tmp_path / "final"), refined, strict=True))
    # method_scale 0.5 is train_preserve_scale 0.5: the same refinement as the config key.
    (tmp_path / "other").mkdir()
    other = load_config(_config_file(tmp_path / "other", erasure_method="mace", train_preserve_scale=0.5,
                                     prior_preservation_cache_path=str(cache), output_dir=str(tmp_path / "out2"),
                                     final_save_path=str(tmp_path / "final2")))
    from mace.erase import erase

    same = erase(other, ("refine",), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(_weights(same.refined_model), refined, strict=True))


def test_the_cli_runs_a_registered_method_and_refuses_an_unknown_one(tmp_path, capsys):
    path = _config_file(tmp_path)
    assert mace_main(["erase", str(path), "--set", "erasure_method=uce", "--stages", "edit", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "erased 2 concept(s)" in out and str(tmp_path / "final") in out
    assert mace_main(["erase", str(path), "--set", "erasure_method=esd", "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "erasure_method must be one of mace, refine, uce, speed, rece, got 'esd'" in err[0]
    assert mace_main(["erase", str(path), "--set", "erasure_method=speed", "--stages", "train", "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "erasure_method speed has the stages edit, report, not train" in err[0]


def test_registry_names_match_the_config_check():
    from mace.config import ERASURE_METHODS

    assert tuple(METHODS) == ERASURE_METHODS
    with pytest.raises(ConfigError, match="preserve_concepts must be a list"):
        from mace.config import config_from_dict

        config_from_dict({"multi_concept": [["ship", "object"]], "mapping_concept": ["a boat"],
                          "preserve_concepts": "a dog"})
