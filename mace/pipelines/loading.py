"""Loading Stable Diffusion pipelines (diffusers folders, hub ids, builtin models) and saving them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError, safe_open

from mace.pipelines.builtin import BUILTIN_PREFIX, builtin_model_path
from mace.pipelines.components import cross_attention_projections
from mace.utils.atomic import save_pipeline_atomically
from mace.utils.names import is_hub_id

__all__ = ["UnsafeModelError", "check_device", "check_model_index", "load_pipeline", "resolve_model_path", "save_pipeline_atomically"]


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A builtin name ('builtin:tiny') becomes its cached folder; anything else is passed on."""
    name = str(name_or_path)
    if name.startswith(BUILTIN_PREFIX):
        return str(builtin_model_path(name))
    return name


def check_device(device: str | torch.device | None) -> str | torch.device | None:
    """``device`` unchanged when this machine has it; else a one-line ValueError saying why (torch
    itself fails on first use, with an AssertionError or a list of every device type it knows)."""
    if device is None:
        return None
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a device name (examples: cpu, cuda, cuda:1, mps)") from None
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
            raise ValueError(f"device {str(device)!r}: this machine has no CUDA device ({why}); use cpu")
        if kind.index is not None and kind.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: this machine has no MPS device; use cpu")
    return device


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


class UnsafeModelError(ValueError):
    """A model folder that would run its own code or unpickle weights to load; never loaded."""


def _component_class(library: str, class_name: str):
    """The class a model_index.json entry names, when it is one of diffusers' or transformers'
    own pipeline components (a model, scheduler, tokenizer or processor); else None."""
    import diffusers
    import transformers
    from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES

    own = [getattr(diffusers, b) for b in ("ModelMixin", "SchedulerMixin")]
    theirs = [getattr(transformers, b) for b in LOADABLE_CLASSES["transformers"]]
    if library == "transformers":
        module, base_classes = transformers, theirs
    elif library == "diffusers":
        module, base_classes = diffusers, own
    elif library.isidentifier() and hasattr(diffusers.pipelines, library):
        # "stable_diffusion" and the like: a module of diffusers.pipelines (e.g. the safety checker)
        module, base_classes = getattr(diffusers.pipelines, library), own + theirs
    else:
        return None
    try:
        cls = getattr(module, class_name, None) if class_name.isidentifier() else None
    except Exception:  # a lazy module that cannot import the name
        cls = None
    if not isinstance(cls, type) or not any(issubclass(cls, b) for b in base_classes):
        return None
    return cls


def check_model_index(index: dict, where: str, skipped: tuple[str, ...] = ()) -> list[str]:
    """Refuse a pipeline whose model_index.json names a custom pipeline or a component class
    outside diffusers and transformers (loading it would import code from the folder or the
    hub); returns the names of the components that hold weights."""
    import diffusers
    import transformers

    name = index.get("_class_name")
    pipeline_class = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(pipeline_class, type) and issubclass(pipeline_class, diffusers.DiffusionPipeline)):
        raise UnsafeModelError(f"{where}: model_index.json names the pipeline class {name!r}, which is not one of "
                               "diffusers' pipelines; custom pipeline code is never run")
    weighted = []
    for key, value in index.items():
        if key.startswith("_") or key in skipped or not isinstance(value, (list, tuple)) or value in ([None, None], (None, None)):
            continue
        if len(value) != 2 or not all(isinstance(v, str) for v in value):
            raise UnsafeModelError(f"{where}: model_index.json entry {key!r} is {value!r}, not [library, class]")
        cls = _component_class(*value)
        if cls is None:
            raise UnsafeModelError(f"{where}: model_index.json names {value[0]}.{value[1]} for {key!r}, which is not a "
                                   "diffusers or transformers pipeline component; code from outside them is never run")
        if issubclass(cls, (diffusers.ModelMixin, transformers.PreTrainedModel)):
            weighted.append(key)
    return weighted


def _check_weights(folder: Path, components: list[str]) -> None:
    """Every weighted component has safetensors weights; pickled ones only are refused, with how to convert."""
    for key in components:
        sub = folder / key
        if not sub.is_dir():
            continue
        files = [f for f in sub.iterdir() if f.is_file()]
        if any(f.name.endswith((".safetensors", ".safetensors.index.json")) for f in files):
            for f in sorted(files):
                if f.suffix == ".safetensors":
                    _check_safetensors(f)
            continue
        pickled = sorted(f.name for f in files if f.suffix in PICKLE_SUFFIXES or f.name.endswith(".bin.index.json"))
        if pickled:
            raise UnsafeModelError(
                f"model folder {folder}: {key} has only pickled weights ({', '.join(pickled)}), which are never loaded; "
                "convert the folder to safetensors once where you trust it: "
                f"DiffusionPipeline.from_pretrained(FOLDER).save_pretrained(NEW_FOLDER, safe_serialization=True)")


def _check_safetensors(file: Path) -> None:
    """A damaged or truncated weights file is a one-line error naming it (safetensors reads the
    header and checks it against the file's size; no tensor is read)."""
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err}); the model folder is damaged") from None


def _hub_model_index(repo_id: str, revision: str | None) -> dict:
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(repo_id, "model_index.json", revision=revision)).read_text())
    except Exception as err:  # offline, unknown repo, not a pipeline: no pipeline to load either
        from huggingface_hub import constants

        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        offline = ("; HF_HUB_OFFLINE is set and it is not in the hub's local cache: download it once where the network "
                   "is allowed, or pass a local folder") if constants.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(f"model {repo_id}: cannot read its model_index.json from a local folder or the "
                                f"Hugging Face hub/cache ({first}){offline}") from None


def load_pipeline(
    name_or_path: str | os.PathLike,
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    revision: str | None = None,
):
    """Load a diffusers Stable Diffusion (1.x, 2.x, XL) pipeline from a folder, hub id or builtin.

    ``builtin:tiny`` and ``builtin:tiny-sdxl`` are small models made from configs in this
    repository (see :mod:`mace.pipelines.builtin`); nothing is downloaded for them.

    Nothing in a model folder runs or is unpickled: its model_index.json must name a diffusers
    pipeline and diffusers/transformers components (``check_model_index``), weights are read
    from safetensors only (a component with only ``.bin``/``.ckpt`` weights is an error saying
    how to convert it), and no remote code is trusted.
    """
    check_device(device)
    path = resolve_model_path(name_or_path)
    local = Path(path).expanduser()
    if not str(name_or_path).startswith(BUILTIN_PREFIX) and os.sep in path and not local.exists() and not is_hub_id(path):
        raise FileNotFoundError(f"model folder {path} does not exist")
    kwargs = {"dtype": torch_dtype, "use_safetensors": True}
    if revision is not None:
        kwargs["revision"] = revision
    if local.is_file():
        raise UnsafeModelError(
            f"{path} is a single file; a model is a diffusers folder: convert a checkpoint once where you trust it, "
            f"e.g. StableDiffusionPipeline.from_single_file(FILE).save_pretrained(FOLDER, safe_serialization=True)")
    if local.is_dir():
        index_file = local / "model_index.json"
        if not index_file.exists():
            raise FileNotFoundError(f"model folder {path} has no model_index.json; expected a diffusers pipeline folder "
                                    "(written by save_pretrained)")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{index_file}: not a readable JSON file ({err})") from None
        path = str(local)
    else:
        index = _hub_model_index(path, revision)
    if not isinstance(index, dict):
        raise UnsafeModelError(f"{path}: model_index.json is not a JSON object")
    skipped = ("safety_checker",) if "safety_checker" in index else ()
    if skipped:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    weighted = check_model_index(index, f"model {path}", skipped)
    if local.is_dir():
        _check_weights(local, weighted)
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # Fail early on a model MACE cannot edit (an MMDiT pipeline has a transformer, no UNet).
    cross_attention_projections(getattr(pipe, "unet", None) or getattr(pipe, "transformer", pipe))
    return pipe
