"""benchmarks/gpu_wheels.py: which wheels a GPU machine without network access is given, and
which of them it installs."""

import importlib.metadata as metadata
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_wheels  # noqa: E402


def test_the_wheels_are_what_the_package_needs_beyond_torch_and_transformers():
    pins = gpu_wheels.wanted(["torch", "transformers"])
    for needed in ("diffusers", "open-clip-torch", "omegaconf", "peft", "accelerate", "torchmetrics"):
        assert pins[needed] == metadata.version(needed)
    # Brought by torch or transformers, or by open-clip-torch's models (only its vocabulary is read).
    for present in ("torch", "triton", "transformers", "huggingface-hub", "tokenizers", "safetensors",
                    "numpy", "pyyaml", "timm", "torchvision"):
        assert present not in pins
    # Without --have nothing is assumed: transformers and its dependencies are fetched too.
    assert {"transformers", "huggingface-hub", "tokenizers"} <= set(gpu_wheels.wanted(["torch"]))


def test_a_machine_installs_only_missing_or_older_distributions(tmp_path, capsys):
    installed = metadata.version("diffusers")
    for name in (f"diffusers-{installed}-py3-none-any.whl", "diffusers-0.0.1-py3-none-any.whl",
                 "diffusers-999.0-py3-none-any.whl", "not_a_real_distribution-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    chosen = [w.name for w in gpu_wheels.to_install(tmp_path)]
    assert chosen == ["diffusers-999.0-py3-none-any.whl", "not_a_real_distribution-1.0-py3-none-any.whl"]
    assert gpu_wheels.main(["select", str(tmp_path)]) == 0
    assert [Path(line).name for line in capsys.readouterr().out.split()] == chosen


def test_select_names_a_missing_folder(tmp_path):
    with pytest.raises(SystemExit, match="nowhere is not a folder"):
        gpu_wheels.main(["select", str(tmp_path / "nowhere")])


def test_download_pins_each_wheel_for_the_target_python(tmp_path, monkeypatch):
    seen = {}

    def fake_run(command):
        seen["command"] = command
        (tmp_path / "diffusers-1.0-py3-none-any.whl").write_bytes(b"x")
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(gpu_wheels.subprocess, "run", fake_run)
    gpu_wheels.download(tmp_path, "3.12", ["torch", "transformers"])
    command = seen["command"]
    assert command[command.index("--python-version") + 1] == "3.12"
    assert "--no-deps" in command and "--only-binary=:all:" in command
    assert f"diffusers=={metadata.version('diffusers')}" in command
    assert f"open-clip-torch=={metadata.version('open-clip-torch')}" in command
