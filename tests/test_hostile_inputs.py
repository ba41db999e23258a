"""Hostile inputs, through the CLI: concept names, prompts and CSV fields are data, never paths;
a model folder runs no code and unpickles nothing; a write that fails part-way keeps what was
done. Every case asserts its one-line error or its safe result, and that nothing appeared
outside the test's own run folder (the parent of ``tmp_path`` is compared before and after)."""

import errno
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mace.cli import main as mace_main
from mace.stages.lora_training import FINGERPRINT_FILE, lora_dir
from mace.stages.prepare import concept_folders
from mace.utils.names import NAME_MAX, folder_name

MARKER = "hostile-code-ran"  # a file that code smuggled into a model folder would write


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for folder, dirs, files in os.walk(root):
        if Path(folder) == skip:
            dirs[:] = []
            continue
        for name in dirs + files:
            path = Path(folder) / name
            if path != skip:
                st = path.lstat()
                out[str(path)] = (st.st_size if name in files else 0, st.st_mtime_ns if name in files else 0)
    return out


@pytest.fixture
def run(tmp_path, tiny_path):
    """The test's run folder, ``tmp_path/run``; after the test nothing else under the parent of
    ``tmp_path`` (where the hostile names point) was created, changed or removed."""
    folder = tmp_path / "run"
    folder.mkdir()
    before = _snapshot(tmp_path.parent, folder)
    yield folder
    after = _snapshot(tmp_path.parent, folder)
    assert after == before, f"written outside the run folder: {sorted(set(after) ^ set(before))[:5]}"
    assert not list(tmp_path.parent.rglob(f"*{MARKER}*"))


def _config(run: Path, concepts, mappings=None, **changes) -> Path:
    body = {"multi_concept": [concepts], "mapping_concept": mappings or ["ground"] * len(concepts),
            "pretrained_model_name_or_path": "builtin:tiny", "lamb": 0.1, "aug_length": 1, "prompt_len": 1,
            "max_train_steps": 1, "num_images_per_concept": 1, "generation_steps": 1, "resolution": 16,
            "concepts_per_batch": 16, "seed": 0, "input_data_dir": str(run / "data"),
            "output_dir": str(run / "out"), "final_save_path": str(run / "final")}
    body.update(changes)
    path = run / "erase.yaml"
    path.write_text(yaml.safe_dump({"MACE": body}))
    return path


def _ok(capsys, argv) -> tuple[str, str]:
    assert mace_main(argv) == 0
    got = capsys.readouterr()
    assert "Traceback" not in got.err
    return got.out, got.err


def _error(capsys, argv) -> str:
    assert mace_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and ": error: " in err, err
    return err


# --- 1. names are data, never paths -----------------------------------------------------------

def _hostile_names(tmp_path: Path) -> list[str]:
    """Names as users wrote them (the config reads '-' as a space)."""
    return ["../../escaped-name", str(tmp_path.parent / "abs-path-name"), "..", ".hidden", "sub/dir",
            "back\\slash", "x" * 300, "é" * 200]


def test_hostile_concept_names_write_only_inside_the_run(run, tmp_path, capsys):
    hostile = _hostile_names(tmp_path)
    concepts = [[name, "object"] for name in hostile] + [["ship", "object"], ["emma-stone", "celebrity"]]
    out, _ = _ok(capsys, ["erase", str(_config(run, concepts)), "--stages", "prepare,refine,train,fuse", "--quiet"])
    assert f"erased {len(concepts)} concept(s)" in out and f"{len(concepts)} LoRA(s)" in out
    data, loras = run / "data", run / "out" / "lora"
    names = [name.replace("-", " ") for name, _ in concepts]
    for name in names:
        images, masks = concept_folders(data, name)
        assert images.parent == data and masks.parent == data, name
        assert (images / "0.png").is_file() and (masks / "0.png").is_file(), name
        lora = lora_dir(run / "out", name)
        assert lora.parent == loras and (lora / FINGERPRINT_FILE).is_file(), name
        assert len(masks.name.encode()) <= NAME_MAX and not images.name.startswith(".")
    # Plain names keep the original tools' folders, so data they prepared still reads.
    assert (data / "ship" / "0.png").is_file() and (data / "ship mask" / "0.png").is_file()
    assert (data / "emma stone").is_dir() and (loras / "emma-stone").is_dir() and (loras / "ship").is_dir()
    # One folder per concept (and its mask folder), all directly in the run's folders.
    assert len(list(data.iterdir())) == 2 * len(concepts) and len(list(loras.iterdir())) == len(concepts)
    assert (run / "final" / "model_index.json").is_file()


@pytest.mark.parametrize("index", range(8))
def test_each_hostile_name_has_a_folder_inside_its_parent(tmp_path, index):
    name = _hostile_names(tmp_path)[index].replace("-", " ")
    folder = folder_name(name)
    assert folder != name and "/" not in folder and "\\" not in folder and not folder.startswith(".")
    assert (Path("data") / folder).resolve().parent == Path("data").resolve()
    assert folder_name(name) == folder and folder_name(name + "!") != folder  # stable, and one per name


@pytest.mark.parametrize("name", ["a\x00b", "two\nlines", "tab\there"])
def test_control_characters_in_a_name_are_one_line_errors(run, capsys, name):
    err = _error(capsys, ["erase", str(_config(run, [[name, "object"]])), "--stages", "prepare", "--quiet"])
    assert "multi_concept[0]" in err and "control character" in err and repr(name) in err
    assert sorted(p.name for p in run.iterdir()) == ["erase.yaml"]


# --- 2. duplicates are never merged silently --------------------------------------------------

def test_names_that_are_one_concept_are_merged_with_a_warning(run, capsys):
    concepts = [["zorb-lax", "object"], ["zorb lax", "object"], ["Zorb Lax", "object"], ["ship", "object"]]
    out, err = _ok(capsys, ["erase", str(_config(run, concepts)), "--stages", "prepare", "--quiet"])
    warning = [line for line in err.splitlines() if "same concept" in line]
    assert len(warning) == 1 and all(repr(n) in warning[0] for n in ("zorb lax", "Zorb Lax")), err
    assert "erased 2 concept(s) [zorb lax; ship]" in out and "2 image(s)" in out
    assert sorted(p.name for p in (run / "data").iterdir()) == ["ship", "ship mask", "zorb lax", "zorb lax mask"]


def test_duplicates_of_another_type_or_mapping_are_refused(run, capsys):
    concepts = [["zorb-lax", "object"], ["Zorb Lax", "style"]]
    err = _error(capsys, ["erase", str(_config(run, concepts, ["ground", "art"])), "--stages", "prepare", "--quiet"])
    assert "'zorb lax' and 'Zorb Lax' are the same concept" in err
    assert sorted(p.name for p in run.iterdir()) == ["erase.yaml"]


# --- 3. a model folder runs no code and unpickles nothing -------------------------------------

class _Bomb:
    """Unpickling this would write MARKER next to the model folder."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "ran"))


def _hostile_model(run: Path, tiny_path, variant: str) -> Path:
    model = run / "model"
    shutil.copytree(tiny_path, model)
    index_file = model / "model_index.json"
    index = json.loads(index_file.read_text())
    marker = run.parent / MARKER
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    if variant == "custom pipeline code":
        (model / "evil_pipeline.py").write_text(code + "from diffusers import StableDiffusionPipeline as EvilPipeline\n")
        index["_class_name"] = ["evil_pipeline", "EvilPipeline"]
    elif variant == "custom component code":
        (model / "unet" / "evil_unet.py").write_text(code + "from diffusers import UNet2DConditionModel as EvilUNet\n")
        index["unet"] = ["evil_unet", "EvilUNet"]
    elif variant == "class from another library":
        index["unet"] = ["os", "system"]
    elif variant == "pipeline class outside diffusers":
        index["_class_name"] = "os.system"
    elif variant == "remote-code auto class":
        config = json.loads((model / "text_encoder" / "config.json").read_text())
        config["auto_map"] = {"AutoModel": "evil_model.EvilModel"}
        (model / "text_encoder" / "config.json").write_text(json.dumps(config))
        (model / "text_encoder" / "evil_model.py").write_text(code)
        index["text_encoder"] = ["transformers", "AutoModel"]
    elif variant == "pickled weights only":
        (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Bomb(str(marker))}))
    elif variant == "single checkpoint file":
        model = run / "model.ckpt"
        model.write_bytes(pickle.dumps({"state_dict": _Bomb(str(marker))}))
        return model
    elif variant == "truncated weights":
        weights = model / "text_encoder" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif variant == "damaged model_index.json":
        index_file.write_text("{not json")
        return model
    index_file.write_text(json.dumps(index))
    return model


MODEL_CASES = {
    "custom pipeline code": "not one of diffusers' pipelines",
    "custom component code": "evil_unet.EvilUNet for 'unet', which is not a diffusers or transformers",
    "class from another library": "os.system for 'unet'",
    "pipeline class outside diffusers": "not one of diffusers' pipelines",
    "remote-code auto class": "transformers.AutoModel for 'text_encoder'",
    "pickled weights only": "unet has only pickled weights (diffusion_pytorch_model.bin), which are never loaded; convert",
    "single checkpoint file": "is a single file; a model is a diffusers folder: convert",
    "damaged model_index.json": "model_index.json: not a readable JSON file",
    "truncated weights": "model.safetensors: not a readable safetensors file",
}


@pytest.mark.parametrize("variant", list(MODEL_CASES))
def test_hostile_model_folder_is_refused_before_anything_runs(run, tiny_path, capsys, variant):
    model = _hostile_model(run, tiny_path, variant)
    err = _error(capsys, ["sample", "--model", str(model), "--prompt", "a ship", "--out", str(run / "images"),
                          "--steps", "1"])
    assert MODEL_CASES[variant] in err and str(model) in err
    assert not (run / "images").exists() and not (run.parent / MARKER).exists()
    assert "evil_pipeline" not in sys.modules and "evil_unet" not in sys.modules


def test_an_untouched_copy_of_the_model_folder_loads(run, tiny_path, capsys):
    """The control for the cases above: the same folder, unchanged, samples an image."""
    model = run / "model"
    shutil.copytree(tiny_path, model)
    _ok(capsys, ["sample", "--model", str(model), "--prompt", "a ship", "--out", str(run / "images"), "--steps", "1"])
    assert (run / "images" / "0.png").is_file()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["project", "model", "output"])
def test_a_final_folder_that_is_not_only_a_model_is_refused_before_any_work(run, tiny_path, capsys, target):
    """Saving a model swaps its whole folder: a folder of the user's files, the model being
    edited, or the run's own output folder as final_save_path would be lost at the end."""
    model = run / "model"
    shutil.copytree(tiny_path, model)
    project = run / "project"
    project.mkdir()
    (project / "thesis.tex").write_text("years of work")
    final = {"project": project, "model": model, "output": run / "out"}[target]
    config = _config(run, [["ship", "object"]], pretrained_model_name_or_path=str(model), final_save_path=str(final))
    before = _files(run)
    err = _error(capsys, ["erase", str(config), "--quiet"])
    assert {"project": "is not a model folder", "model": "is or holds the model being edited",
            "output": "is or holds the run's output_dir"}[target] in err
    assert _files(run) == before and not (run / "out").exists()


def test_saving_a_model_replaces_only_a_model_folder(tmp_path, tiny_pipe):
    from mace.utils.atomic import save_pipeline_atomically

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a model folder"):
        save_pipeline_atomically(tiny_pipe, folder)
    assert _files(folder) == {"keep.txt": b"mine"}
    save_pipeline_atomically(tiny_pipe, tmp_path / "empty")  # nothing there yet
    (tmp_path / "empty" / "unet" / "marker").write_text("old")
    save_pipeline_atomically(tiny_pipe, tmp_path / "empty")  # a model folder: replaced whole
    assert not (tmp_path / "empty" / "unet" / "marker").exists() and (tmp_path / "empty" / "model_index.json").is_file()


# --- 4. a write that fails part-way keeps what was done ---------------------------------------

def _fail_writes_to(monkeypatch, name: str) -> None:
    """os.replace onto a file called ``name`` fails as on a full disk (atomic writes end there)."""
    real = os.replace

    def replace(src, dst, **kwargs):
        if Path(dst).name == name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_disk_full_while_preparing_keeps_the_images_before_it(run, capsys, monkeypatch):
    config = str(_config(run, [["ship", "object"]], num_images_per_concept=2, sample_batch_size=1))
    _fail_writes_to(monkeypatch, "1.png")
    err = _error(capsys, ["erase", config, "--stages", "prepare", "--quiet"])
    assert f"cannot write {run / 'data' / 'ship' / '1.png'}: No space left on device" in err
    first = (run / "data" / "ship" / "0.png").read_bytes()
    assert sorted(p.name for p in (run / "data" / "ship").iterdir()) == ["0.png"]  # no temporary left
    monkeypatch.undo()
    out, _ = _ok(capsys, ["erase", config, "--stages", "prepare", "--quiet"])
    assert "1 image(s)" in out  # only the missing one
    assert (run / "data" / "ship" / "0.png").read_bytes() == first
    Image.open(run / "data" / "ship" / "1.png").verify()


def test_disk_full_while_saving_a_lora_keeps_the_loras_before_it(run, capsys, monkeypatch):
    config = str(_config(run, [["ship", "object"], ["zorb", "object"]], concepts_per_batch=1))
    _ok(capsys, ["erase", config, "--stages", "prepare,refine", "--quiet"])
    real = os.replace
    calls = []

    def replace(src, dst, **kwargs):
        if Path(dst).name == "pytorch_lora_weights.safetensors":
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    err = _error(capsys, ["erase", config, "--stages", "train", "--quiet"])
    monkeypatch.undo()
    failed = Path(calls[1]).parent.name
    assert f"cannot write {run / 'out' / 'lora' / failed / 'pytorch_lora_weights.safetensors'}" in err
    kept = ({"ship", "zorb"} - {failed}).pop()
    stamp = (run / "out" / "lora" / kept / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    assert not (run / "out" / "lora" / failed / FINGERPRINT_FILE).exists()
    out, _ = _ok(capsys, ["erase", config, "--stages", "train,fuse", "--quiet"])
    assert "1 LoRA(s)" in out  # the saved one is reused
    assert (run / "out" / "lora" / kept / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == stamp
    assert (run / "final" / "model_index.json").is_file()


# --- 5. prompts and CSV fields of mace sample, names given to mace attack ---------------------

def test_csv_prompts_that_look_like_paths_name_no_file(run, tmp_path, capsys):
    table = run / "prompts.csv"
    table.write_text(f"prompt,evaluation_seed\n../../escaped-name,1\n{tmp_path.parent / 'abs-path-name'},2\n")
    out, _ = _ok(capsys, ["sample", "--model", "builtin:tiny", "--csv", str(table), "--out", str(run / "images"),
                          "--steps", "1"])
    assert "sampled 2 image(s)" in out
    assert sorted(p.name for p in (run / "images").iterdir()) == ["0_0.png", "1_0.png"]


CSV_CASES = {
    "seed that is a path": ("prompt,evaluation_seed\na ship,../../escaped-name\n", "line 2: evaluation_seed "
                            "'../../escaped-name' is not an integer"),
    "seed beyond 64 bits": ("prompt,evaluation_seed\na ship,99999999999999999999999\n", "is outside 0.."),
    "negative seed": ("prompt,evaluation_seed\na ship,-5\n", "is outside 0.."),
    "empty prompt": ("prompt,evaluation_seed\n,3\n", "line 2: the prompt is empty"),
    "field over the csv limit": ("prompt\n\"" + "a" * 200_000 + "\"\n", "not a readable CSV file"),
    "not UTF-8": (b"prompt\n\xff\xfe ship\n", "not a UTF-8 text file"),
    "no prompt column": ("caption\na ship\n", "needs a 'prompt' column"),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_bad_sample_csv_is_one_line_naming_the_file(run, capsys, case):
    text, message = CSV_CASES[case]
    table = run / "prompts.csv"
    table.write_bytes(text if isinstance(text, bytes) else text.encode())
    err = _error(capsys, ["sample", "--model", "builtin:tiny", "--csv", str(table), "--out", str(run / "images")])
    assert str(table) in err and message in err
    assert not (run / "images").exists()


@pytest.mark.parametrize("argv, message", [
    (["sample", "--model", "builtin:tiny", "--prompt", "a ship", "--num-images", "0"], "--num-images must be at least 1"),
    (["sample", "--model", "builtin:tiny", "--prompt", "a ship", "--seed", "-1"], "--seed must lie in 0.."),
    (["cache", "--model", "builtin:tiny", "--prompts", "p.txt", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["attack", "--model", "builtin:world", "--erased", "../../escaped-name"], "is called '../../escaped-name'"),
    (["eval", "--model", "builtin:tiny", "--erased", "ship"], "'ship'; builtin:world was assumed, as neither --model"),
    (["eval", "--model", "builtin:world", "--erased", ""], "give --erased (comma-separated concept names) or --config"),
    (["eval", "--model", "builtin:world", "--erased", "Qedark Draerba", "--kept", "Nobody Here"],
     "no concept of builtin:world is called 'Nobody Here'"),
    (["sample", "--model", "builtin:tiny", "--prompt", "a ship", "--guidance", "nan"], "--guidance must be a finite number"),
    (["eval", "--model", "builtin:world", "--erased", "Qedark Draerba", "--guidance", "inf"], "--guidance must be a finite"),
    (["sample", "--model", "builtin:tiny", "--prompt", "a ship", "--device", "gpu"], "'gpu' is not a device name"),
    # cuda:99: no machine the suite runs on has a hundred GPUs (a CPU machine says it has none)
    (["sample", "--model", "builtin:tiny", "--prompt", "a ship", "--device", "cuda:99"], "device 'cuda:99': this machine has"),
])
def test_bad_sizes_and_names_on_the_command_line(run, capsys, argv, message):
    argv = argv + ["--out", str(run / "result")]
    assert message in _error(capsys, argv)
    assert not (run / "result").exists()


def test_a_device_the_machine_lacks_stops_an_erasure_before_it_writes(run, capsys):
    config = _config(run, [["ship", "object"]], device="cuda:99")
    assert "device 'cuda:99': this machine has" in _error(capsys, ["erase", str(config), "--quiet"])
    assert sorted(p.name for p in run.iterdir()) == ["erase.yaml"]
