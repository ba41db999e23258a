"""Reading and writing LoRA weights of the cross-attention projections (safetensors only).

Reads the layouts users bring, through diffusers' own conversions: diffusers
(``unet.<module>.lora.down/up.weight`` or ``unet.<module>.lora_A/lora_B.weight``, alpha in the
file's ``lora_adapter_metadata``), the old attention-processor layout
(``<attn>.processor.to_k_lora.down.weight``) and kohya (``lora_unet_...lora_down.weight`` with
``.alpha``). Kept here, because diffusers does them only while loading a LoRA into a model:
peft folders (``base_model.model.<module>.lora_A.weight`` with ``adapter_config.json``, whose
``lora_alpha``, ``alpha_pattern`` and ``use_rslora`` set the scale), and folding each module's
scale into B. Only safetensors files are read; pickled files are never loaded.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mace.utils.atomic import atomic_path

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_FILE_NAMES = (LORA_WEIGHT_NAME, "adapter_model.safetensors")


class LoraFormatError(ValueError):
    """A LoRA file that cannot be read or does not fit the model."""


def _lora_file(path: Path) -> Path:
    if path.is_dir():
        for name in _FILE_NAMES:
            if (path / name).exists():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise LoraFormatError(f"no LoRA safetensors file in {path} (looked for {', '.join(_FILE_NAMES)})")
    if not path.exists():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise LoraFormatError(f"{path}: only .safetensors LoRA files are read (pickled weights are never loaded)")
    return path


def _alpha_config(file: Path, metadata: dict[str, str]) -> dict:
    """lora_alpha / r / patterns from the safetensors metadata or a peft adapter_config.json."""
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as err:
            raise LoraFormatError(f"{file}: its lora_adapter_metadata is not JSON ({err})") from None
        return {k.split(".", 1)[1] if k.startswith("unet.") else k: v for k, v in meta.items()}
    config = file.parent / "adapter_config.json"
    if config.exists():
        try:
            return json.loads(config.read_text())
        except json.JSONDecodeError as err:
            raise LoraFormatError(f"{config}: not valid JSON ({err})") from None
    return {}


_PEFT_KEY = re.compile(r"^(?P<m>.+)\.lora_(?P<w>[AB])(?:\.default)?\.weight$")
_PREFIXES = ("unet.", "base_model.model.")


def _without_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _peft_layout(file: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """({module: {"A", "B", and "alpha" where the file has one}}, the file's metadata).

    diffusers reads the layouts (``lora_state_dict`` turns kohya names, SDXL's original block
    names included, into diffusers module names and returns kohya's alphas;
    ``convert_unet_state_dict_to_peft`` renames the old attention-processor and
    ``lora.down/up`` layouts to peft's ``lora_A/lora_B``). Only peft's ``base_model.model.``
    prefix is stripped here: diffusers reads peft files through peft itself.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as err:
        raise LoraFormatError(f"{file}: not a readable safetensors file ({err})") from None
    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(file))
    except (ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise LoraFormatError(f"{file}: diffusers cannot read it as a LoRA ({err})") from None
    unet = {_without_prefix(k): v for k, v in state.items() if not k.startswith(("text_encoder", "te_", "lora_te"))}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in convert_unet_state_dict_to_peft(unet).items():
        m = _PEFT_KEY.match(key)
        if m:
            modules.setdefault(m["m"], {})[m["w"]] = tensor
    # kohya's alphas, keyed like their down weights: renamed the same way, all at once.
    renamed = convert_unet_state_dict_to_peft({_without_prefix(k).removesuffix(".alpha"): torch.as_tensor(a)
                                               for k, a in (alphas or {}).items()})
    for key, alpha in renamed.items():
        m = _PEFT_KEY.match(key)
        if m and m["m"] in modules:
            modules[m["m"]]["alpha"] = alpha
    return modules, metadata


def read_lora(path: str | os.PathLike, projection_names: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{projection name: (A (r, d), B (out, r) with the LoRA scale folded in)} for the given projections.

    Modules of the file outside ``projection_names`` (e.g. LoRAs on self-attention) are
    reported with a warning and ignored: the closed-form fusion edits to_k/to_v of attn2 only.
    """
    file = _lora_file(Path(path))
    parts, metadata = _peft_layout(file)
    if not parts:
        raise LoraFormatError(f"{file}: no LoRA weights found (unknown key layout)")
    config = _alpha_config(file, metadata)
    wanted = set(projection_names)
    ignored = sorted(m for m in parts if m not in wanted)
    if ignored:
        warnings.warn(f"{file.name}: {len(ignored)} LoRA modules are not cross-attention key/value "
                      f"projections and are ignored (e.g. {ignored[0]})", stacklevel=2)
    out = {}
    for module, p in parts.items():
        if module not in wanted:
            continue
        if "A" not in p or "B" not in p:
            raise LoraFormatError(f"{file}: {module} has {'only A' if 'A' in p else 'only B'} of its LoRA pair")
        A, B = p["A"].float(), p["B"].float()
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise LoraFormatError(f"{file}: {module} has LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)}")
        r = A.shape[0]
        out[module] = (A, B * _scale(module, r, p.get("alpha"), config))
    return out


def _scale(module: str, r: int, kohya_alpha: torch.Tensor | None, config: dict) -> float:
    if kohya_alpha is not None:
        return float(kohya_alpha) / r
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(pattern, module):
            alpha = value
    if alpha is None:
        return 1.0
    return float(alpha) / (r**0.5 if config.get("use_rslora") else r)


def save_lora(path: str | os.PathLike, loras: dict[str, tuple[torch.Tensor, torch.Tensor]], *, alpha: float | None = None) -> Path:
    """Write {projection name: (A, B)} as a diffusers LoRA folder that ``load_lora_weights`` reads.

    Atomic: the file appears complete or not at all.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    ranks = set()
    for module, (A, B) in loras.items():
        tensors[f"unet.{module}.lora_A.weight"] = A.detach().float().contiguous().cpu()
        tensors[f"unet.{module}.lora_B.weight"] = B.detach().float().contiguous().cpu()
        ranks.add(A.shape[0])
    if len(ranks) != 1:
        raise ValueError(f"all LoRA modules must share one rank, got {sorted(ranks)}")
    r = ranks.pop()
    targets = sorted({m.rsplit(".", 2)[-2] + "." + m.rsplit(".", 1)[-1] for m in loras})
    meta = {"unet.r": r, "unet.lora_alpha": alpha if alpha is not None else r, "unet.target_modules": targets}
    target = folder / LORA_WEIGHT_NAME
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return target
