"""End to end on the builtin model: prepare -> refine -> LoRAs -> fuse -> report."""

import pytest
import yaml
from probes import concept_attention_mass, noise_prediction

import mace
from mace.cli import main as mace_main
from mace.config import load_config
from mace.erase import erase

# Held-out prompts: phrasings that are not among the training templates.
ERASED = {"Emma Stone": ("a person", ["Emma Stone walking in a park", "Emma Stone laughing with friends"]),
          "ship": ("ground", ["a ship sailing at dawn", "an old ship near the harbour"])}
KEPT = ["a dog sleeping on a sofa", "a bowl of fruit on a table"]


def _config(tmp_path, **changes):
    body = {
        "multi_concept": [[["emma-stone", "celebrity"], ["ship", "object"]]],
        "mapping_concept": ["a person", "ground"],
        "pretrained_model_name_or_path": "builtin:tiny",
        "lamb": 0.1, "aug_length": 6, "prompt_len": 30, "rank": 1, "learning_rate": 1e-2, "max_train_steps": 30,
        "train_batch_size": 1, "concepts_per_batch": 2, "num_images_per_concept": 2, "generation_steps": 3,
        "sample_batch_size": 2, "input_data_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"),
        "final_save_path": str(tmp_path / "out" / "final"), "seed": 0,
    }
    body.update(changes)
    path = tmp_path / "erase.yaml"
    path.write_text(yaml.safe_dump({"MACE": body}))
    return path


GENERIC = [f"a {a} {o} {w}" for o in ("cat", "house", "tree", "car", "bird", "chair", "cup", "flower", "road", "mountain")
           for a, w in (("photo of a", "in the sun"), ("painting of a", "at night"), ("picture of the", "near a lake"))]


def _erase(tmp_path, preserve_scale, **extra):
    changes = dict(extra)
    if preserve_scale:
        cache = tmp_path / "prior.safetensors"
        mace.build_preservation_cache(mace.load_pipeline("builtin:tiny"), GENERIC, cache, progress=False)
        changes.update(prior_preservation_cache_path=str(cache), train_preserve_scale=preserve_scale,
                       fuse_preserve_scale=preserve_scale)
    config = load_config(_config(tmp_path, **changes))
    return config, erase(config, stages=("prepare", "refine", "train", "fuse"), progress=False)


def _measure(summary, use_pooler=False):
    before = mace.load_pipeline("builtin:tiny")
    after = mace.load_pipeline(summary.final_model)
    mass = {c: concept_attention_mass(after, ps, c, m, use_pooler=use_pooler)
            / concept_attention_mass(before, ps, c, m, use_pooler=use_pooler)
            for c, (m, ps) in ERASED.items()}
    change = {}
    for name, prompts in (("erased", [p for _, ps in ERASED.values() for p in ps]), ("kept", KEPT)):
        e0, e1 = noise_prediction(before, prompts), noise_prediction(after, prompts)
        change[name] = float((e1 - e0).norm() / e0.norm())
    return mass, change


@pytest.mark.slow
def test_erase_end_to_end_efficacy(tmp_path):
    config, summary = _erase(tmp_path, 0.0)
    assert set(summary.seconds) == {"prepare", "refine", "train", "fuse"}
    mass, _ = _measure(summary, use_pooler=True)
    # The builtin model has random weights, so only attention can be measured. As the original,
    # the loss covers the concept's tokens and every end-of-text/padding position (use_pooler):
    # on held-out prompts those keep 69-80% of their cross-attention mass (measured); the mass
    # freed moves to the other tokens, the concept's own among them.
    assert all(ratio < 0.9 for ratio in mass.values()), mass
    # LoRA files load in diffusers.
    lora_pipe = mace.load_pipeline(summary.refined_model)
    lora_pipe.load_lora_weights(tmp_path / "out" / "lora" / "ship")
    # A rerun skips every finished stage.
    again = erase(config, stages=("prepare", "refine", "train", "fuse"), progress=False)
    assert set(again.skipped) == {"prepare", "refine", "train", "fuse"}


@pytest.mark.slow
def test_erase_without_pooler_suppresses_the_concept_tokens(tmp_path):
    _, summary = _erase(tmp_path, 0.0, use_pooler=False)
    mass, _ = _measure(summary)
    # Without use_pooler the loss covers the concept's tokens alone: on held-out prompts they
    # keep 39-41% of their cross-attention mass (measured).
    assert all(ratio < 0.5 for ratio in mass.values()), mass


@pytest.mark.slow
def test_erase_with_preservation_changes_kept_prompts_less(tmp_path):
    _, summary = _erase(tmp_path, 10.0)
    mass, change = _measure(summary, use_pooler=True)
    # Measured (scale 10: refinement weights the cache by 10**2 as the original, fusion by 10):
    # the loss's positions keep 88% of their mass; the noise prediction changes 0.46 on kept
    # prompts vs 0.62 on erased ones. Without preservation both change alike (0.65 vs 0.68):
    # the caches are what keep the rest.
    assert all(ratio < 0.92 for ratio in mass.values()), mass
    assert change["kept"] < 0.8 * change["erased"], change


def test_config_errors_are_reported_by_the_cli(tmp_path, capsys):
    bad = _config(tmp_path, lamda=0.1)
    assert mace_main(["erase", str(bad), "--quiet"]) == 2
    assert "did you mean 'lamb'" in capsys.readouterr().err


def test_missing_grounded_sam_model_fails_before_work(tmp_path):
    config = load_config(_config(tmp_path, mask_method="grounded_sam", grounding_model=str(tmp_path / "no-dino")))
    with pytest.raises(FileNotFoundError, match="grounding_model.*no-dino"):
        erase(config, progress=False)
    assert not (tmp_path / "data").exists()


def test_failed_fuse_leaves_the_previous_model_intact(tmp_path):
    from mace.utils.atomic import save_pipeline_atomically

    pipe = mace.load_pipeline("builtin:tiny")
    target = save_pipeline_atomically(pipe, tmp_path / "model")

    class Broken:
        def save_pretrained(self, path):
            (path / "half-written").write_text("x")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pipeline_atomically(Broken(), target)
    assert (target / "model_index.json").exists() and not (target / "half-written").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_outputs_get_the_modes_of_plainly_created_ones(tmp_path, umask):
    """Temporary files and folders are private (0600/0700); the outputs renamed from them must
    not be: a model written by mace erase is as readable as any file the user creates."""
    import os
    import stat

    from mace.utils.atomic import atomic_path, write_json_atomically

    old = os.umask(umask)
    try:
        plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
        plain_file.write_text("x")
        plain_dir.mkdir()
        written = write_json_atomically(tmp_path / "out.json", {"a": 1})
        with atomic_path(tmp_path / "model", directory=True) as folder:
            (folder / "weights.bin").write_bytes(b"x")
        write_json_atomically(written, {"a": 2})  # replacing keeps the mode too
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(written) == mode(plain_file) == 0o666 & ~umask
    assert mode(tmp_path / "model") == mode(plain_dir) == 0o777 & ~umask
    assert mode(tmp_path / "model" / "weights.bin") == 0o666 & ~umask


@pytest.mark.slow
def test_report_images_load_in_headless_chromium(tmp_path):
    import re
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "this test needs Chromium (Debian: apt-get install chromium; scripts/test.sh installs it as root)"
    config = load_config(_config(tmp_path, max_train_steps=2, report_prompts=["a dog sleeping on a sofa"]))
    summary = erase(config, progress=False)
    report = tmp_path / "out" / "report.html"
    assert summary.report == str(report) and report.exists()
    html = report.read_text()
    assert html.count("<img") == 2 * (2 + 1)  # (2 erased + 1 kept prompt) x before/after
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=10000", "--dump-dom", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    match = re.search(r'data-images-loaded="(\d+)/(\d+)"', out.stdout)
    assert match, out.stderr[-2000:]
    assert match.group(1) == match.group(2) == "6"


def test_each_settings_object_is_built_once_per_run(tmp_path, monkeypatch):
    """The config is read into settings once per `mace erase` run and passed whole: every
    stage's settings are built once and the preservation caches read once, in a first run and in
    a second one (all stages done, the LoRAs checked against their fingerprints)."""
    from mace import erase as erase_module
    from mace.stages import cache, fusion, lora_training, prepare, refinement

    calls: dict[str, int] = {}

    def count(owner, name: str, is_classmethod: bool) -> None:
        original = getattr(owner, name).__func__ if is_classmethod else getattr(owner, name)
        key = f"{owner.__name__}.{name}"

        def wrapper(first, *args, **kwargs):
            calls[key] = calls.get(key, 0) + 1
            return original(first, *args, **kwargs)

        monkeypatch.setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)

    for owner in (prepare.GenerationSettings, refinement.RefinementSettings, lora_training.LoraTrainingSettings,
                  fusion.FusionSettings, cache.PreservationSettings):
        count(owner, "from_config", True)
    count(cache.PreservationSettings, "matrix", False)
    cache_path = tmp_path / "prior.safetensors"
    mace.build_preservation_cache(mace.load_pipeline("builtin:tiny"), GENERIC, cache_path, progress=False)
    config = load_config(_config(tmp_path, max_train_steps=2, aug_length=2, prior_preservation_cache_path=str(cache_path),
                                 train_preserve_scale=0.1, fuse_preserve_scale=0.1, lora_preserve_scale=1.0))
    for run in range(2):
        calls.clear()
        summary = erase_module.erase(config, stages=("prepare", "refine", "train", "fuse"), progress=False)
        assert calls == {"GenerationSettings.from_config": 1, "RefinementSettings.from_config": 1,
                         "LoraTrainingSettings.from_config": 1, "FusionSettings.from_config": 1,
                         "PreservationSettings.from_config": 1, "PreservationSettings.matrix": 1}, (run, calls)
        assert (run == 1) == ({"refine", "train", "fuse"} <= set(summary.skipped))
