"""Resuming `mace erase`: a rerun redoes exactly what its inputs changed, and says so."""

import os

import pytest
import torch
import yaml
from PIL import Image

import mace
from mace.config import ConfigError, load_config
from mace.erase import StageError, erase
from mace.pipelines.components import projection_weights
from mace.run_state import RunModels
from mace.stages.lora_training import FINGERPRINT_FILE, lora_dir

CONCEPTS = [["emma-stone", "celebrity"], ["ship", "object"], ["Van-Gogh", "style"]]


def _config(tmp_path, **changes):
    body = {
        "multi_concept": [CONCEPTS], "mapping_concept": ["a person", "ground", "art"],
        "pretrained_model_name_or_path": "builtin:tiny", "lamb": 0.1, "aug_length": 3, "rank": 1,
        "learning_rate": 1e-2, "max_train_steps": 2, "concepts_per_batch": 3, "num_images_per_concept": 2,
        "generation_steps": 2, "sample_batch_size": 2, "input_data_dir": str(tmp_path / "data"),
        "output_dir": str(tmp_path / "out"), "final_save_path": str(tmp_path / "out" / "final"), "seed": 0,
    }
    body.update(changes)
    path = tmp_path / "erase.yaml"
    path.write_text(yaml.safe_dump({"MACE": body}))
    return load_config(path)


TRAIN = ("prepare", "refine", "train")


def _lora_stamps(tmp_path):
    out = tmp_path / "out"
    return {name: os.stat(lora_dir(out, name.replace("-", " ")) / "pytorch_lora_weights.safetensors").st_mtime_ns
            for name, _ in CONCEPTS}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    first = erase(_config(tmp_path), TRAIN, progress=False)
    return tmp_path, first


def test_first_run_trains_every_lora(trained):
    tmp_path, first = trained
    assert first.trained == {"emma stone": "new", "ship": "new", "Van Gogh": "new"}
    for name, _ in CONCEPTS:
        assert (lora_dir(tmp_path / "out", name.replace("-", " ")) / FINGERPRINT_FILE).exists()


def test_rerun_with_nothing_changed_trains_nothing(trained):
    tmp_path, _ = trained
    before = _lora_stamps(tmp_path)
    again = erase(_config(tmp_path), TRAIN, progress=False)
    assert again.trained == {} and {"prepare", "refine", "train"} <= set(again.skipped)
    assert _lora_stamps(tmp_path) == before
    assert "nothing new" in again.line()


def test_changed_images_of_one_concept_retrain_that_concept_only(trained):
    tmp_path, _ = trained
    before = _lora_stamps(tmp_path)
    image = tmp_path / "data" / "ship" / "0.png"
    Image.new("RGB", Image.open(image).size, (10, 200, 30)).save(image)
    again = erase(_config(tmp_path), TRAIN, progress=False)
    assert list(again.trained) == ["ship"]
    assert "ship" in again.line() and "retrained" in again.line()
    after = _lora_stamps(tmp_path)
    assert after["ship"] != before["ship"]
    assert {k: after[k] for k in after if k != "ship"} == {k: before[k] for k in before if k != "ship"}


def test_a_lora_retrained_alone_equals_the_one_a_full_run_gives(trained, tmp_path):
    """Each concept draws from its own generators: its LoRA does not depend on its batch mates."""
    from safetensors.torch import load_file

    src, _ = trained
    alone = _config(tmp_path, multi_concept=[[CONCEPTS[1]]], mapping_concept=["ground"],
                    input_data_dir=str(src / "data"))
    erase(alone, TRAIN[1:], progress=False)
    full = load_file(str(lora_dir(src / "out", "ship") / "pytorch_lora_weights.safetensors"))
    single = load_file(str(lora_dir(tmp_path / "out", "ship") / "pytorch_lora_weights.safetensors"))
    # The refined models differ (other concepts' pairs enter refinement), so compare the
    # initial state: the A matrices are drawn per concept and move little in two steps.
    for key in full:
        if "lora_A" in key:
            torch.testing.assert_close(full[key], single[key], atol=0.05, rtol=0)


def test_changed_lamb_retrains_every_lora_and_fuse_refuses_stale_loras(trained):
    tmp_path, _ = trained
    again = erase(_config(tmp_path, lamb=0.5), TRAIN, progress=False)
    assert set(again.trained) == {"emma stone", "ship", "Van Gogh"}
    assert "refine" not in again.skipped
    with pytest.raises(StageError, match="run the train stage"):
        erase(_config(tmp_path, lamb=0.6), ("refine", "fuse"), progress=False)


def test_train_refuses_a_refined_model_of_other_settings(trained):
    tmp_path, _ = trained
    with pytest.raises(StageError, match="run the refine stage"):
        erase(_config(tmp_path, lamb=0.9), ("train",), progress=False)


def test_refine_only_summary_names_only_what_it_wrote(tmp_path):
    summary = erase(_config(tmp_path, lamb=0.2), ("refine",), progress=False)
    line = summary.line()
    assert f"refined model {tmp_path / 'out' / 'refined'}" in line
    assert "final model" not in line and "report" not in line


def test_one_pipeline_serves_every_version(tmp_path):
    """Swapped-in weight snapshots equal the saved models loaded from disk."""
    config = _config(tmp_path, max_train_steps=1)
    erase(config, ("prepare", "refine", "train", "fuse"), progress=False)
    models = RunModels("builtin:tiny")
    models.saved_in("refined", tmp_path / "out" / "refined")
    models.saved_in("final", tmp_path / "out" / "final")
    for version, folder in (("refined", tmp_path / "out" / "refined"), ("final", tmp_path / "out" / "final"),
                            ("original", "builtin:tiny")):
        swapped = [w.clone() for w in projection_weights(models.use(version).unet)]
        loaded = projection_weights(mace.load_pipeline(folder).unet)
        for a, b in zip(swapped, loaded, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(models.weights("refined")[0], models.weights("original")[0])


def test_singular_system_names_the_config_keys(tmp_path):
    with pytest.raises(ConfigError, match="solve_jitter"):
        # One prompt's 77 tokens cannot fill the 96 directions of SD 2.x-shaped text embeddings.
        erase(_config(tmp_path, lamb=0.0, aug_length=1, multi_concept=[[CONCEPTS[1]]], mapping_concept=["ground"],
                      pretrained_model_name_or_path="builtin:tiny-sd2-base"),
              ("refine",), progress=False)
