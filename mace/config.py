"""MACE configuration: the original MACE YAML files' keys, unchanged, plus a few of this project's.

Users run their existing ``erase_*.yaml``: the top-level ``MACE:`` section (or a flat file) is
read with OmegaConf, every key of the original files is accepted, and mistakes are caught
before any work starts: an unknown key names the closest known one, the concept and mapping
lists must match, concept types must be known, and files the run reads must exist.
"""

from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mace.utils.atomic import check_model_target
from mace.utils.images import image_files
from mace.utils.names import control_characters, is_hub_id, merge_duplicates

FUSION_TOKENS = ("all", "concept", "name")
ERASURE_METHODS = ("mace", "refine", "uce", "speed", "rece")  # mace.methods.registry.METHODS, in this order

# The kinds of concept the original configs name (multi_concept's second field); each has its prompt templates.
CONCEPT_TYPES = ("object", "celebrity", "style", "explicit")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the problem."""


class ConfigWarning(UserWarning):
    """A key this implementation accepts but does not act on, set to a value that would matter."""


@dataclass
class MACEConfig:
    # --- concepts ---------------------------------------------------------------------------
    multi_concept: list = field(default_factory=list)  # [[name, type], ...] (original: nested once more)
    mapping_concept: list = field(default_factory=list)
    # --- closed-form refinement and fusion ----------------------------------------------------
    # P = C_prior + preserve_weight * C_domain (cache statistics: sums over every token of every
    # cached prompt, so their size grows with the number of prompts cached). As the original code
    # computes them: refinement weights P by train_preserve_scale ** 2, fusion by
    # fuse_preserve_scale (beyond max_memory concepts: both by train_preserve_scale); lamb weighs
    # staying close to the original weights (refinement) or the refined ones (fusion).
    #
    # preserve_scale_mode says what the scales count. "absolute" (the default, the original's
    # semantics): as above, so a value tuned for one number of concepts or one cache size holds
    # for that number and size only (the original's own configs raise preserve_weight from 8e3
    # at 1 celebrity to 2e5 at 100). "per_token": each cache is divided by its token count N_c,
    #   P = C_prior / N_prior + preserve_weight * C_domain / N_domain,
    # and each solve weights P by its scale times the number of tokens it erases, N_e (the
    # aligned token pairs of refinement, the tokens of the concepts' prompts in fusion); the
    # scale is used once (train_preserve_scale in refinement, fuse_preserve_scale in fusion,
    # whatever max_memory). Each solve then minimises
    #   N_e * [ mean_erased ||W' e - v||^2 + scale * mean_preserved ||(W' - W) e_p||^2 ] + lamb ||W' - W0||^2,
    # so the scale is how much one preserved token weighs against one erased token, whatever the
    # cache sizes. lora_preserve_scale is a relative change of the caches' keys and values
    # already, the same in both modes.
    # preserve_count_exponent (per_token only; 0 to 1, default 0) divides both solves' scales
    # by n ** exponent, n the number of erased concepts: 0 counts per erased token, 1 per erased
    # concept's tokens. The erasure benchmark's tuned per-token scale falls about as
    # n ** -0.5 with the count on the large and identity worlds, as the original's celebrity
    # configs lower their per-concept weight 4x from 10 to 100 (docs/benchmarks.md), so with
    # 0.5 one value carries across counts there; a value s tuned per token at n0 concepts is
    # s * n0 ** exponent here.
    lamb: float = 0.0
    train_preserve_scale: float = 0.0
    fuse_preserve_scale: float = 0.0
    preserve_weight: float = 0.0
    preserve_scale_mode: str = "absolute"  # or "per_token"
    preserve_count_exponent: float = 0.0  # per_token: the scales are divided by (erased concepts) ** this
    prior_preservation_cache_path: str | None = None
    domain_preservation_cache_path: str | None = None
    all_words: bool = False
    augment: bool = True  # False: one prompt per concept (the first template), as the original
    aug_length: int = 30
    prompt_len: int = 30
    max_memory: int = 1000  # the original's switch of preservation factors (see effective_*_preserve_scale)
    # --- LoRA training ---------------------------------------------------------------------
    lora: bool = True
    rank: int = 1
    learning_rate: float = 1.0e-4
    max_train_steps: int = 50
    train_batch_size: int = 1
    train_seperate: bool = True  # False: one LoRA shared by all concepts, fused with each one's prompts
    importance_sampling: bool = True
    use_pooler: bool = True  # the loss also covers every end-of-text position (SD 1.x: the padding too)
    use_gsam_mask: bool = True  # False: no masks, the loss covers every pixel (styles never have masks)
    with_prior_preservation: bool = False
    preserve_prompt: str | None = None
    preserve_data_dir: str | None = None
    prior_loss_weight: float = 1.0
    with_uncond_loss: bool = False
    negative_guidance: float = 1.0
    uncond_loss_weight: float = 1.0
    num_class_images: int = 200  # prior preservation uses the first ones (the original reads them all)
    # --- data and outputs ------------------------------------------------------------------
    pretrained_model_name_or_path: str = "CompVis/stable-diffusion-v1-4"
    input_data_dir: str | None = None
    output_dir: str = "./saved_model/CFR_with_multi_LoRAs"
    final_save_path: str = "./saved_model/LoRA_fusion_model"
    generate_data: bool = True  # False: `prepare` only checks that input_data_dir holds every concept's data
    use_gpt: bool = False
    test_erased_model: bool = False
    seed: int = 2024
    resolution: int | None = None
    mixed_precision: str | None = None  # "fp16" / "bf16": generation and training under autocast
    # --- accepted for compatibility with the original files (grounded-SAM paths, training
    # --- script options); read where this implementation has a use for them
    use_sam_hq: bool = True
    grounded_config: str | None = None
    grounded_checkpoint: str | None = None
    sam_hq_checkpoint: str | None = None
    sam_checkpoint: str | None = None
    revision: str | None = None
    tokenizer_name: str | None = None
    instance_prompt: str | None = None
    concept_keyword: str | None = None
    no_real_image: bool = False
    center_crop: bool = False
    train_text_encoder: bool = False
    sample_batch_size: int = 4
    num_train_epochs: int = 1
    checkpointing_steps: int = 500
    resume_from_checkpoint: str | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    use_8bit_adam: bool = False
    dataloader_num_workers: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1.0e-08
    max_grad_norm: float = 1.0
    push_to_hub: bool = False
    hub_token: str | None = None
    hub_model_id: str | None = None
    logging_dir: str = "logs"
    allow_tf32: bool = False
    report_to: str | list | None = None  # accelerate trackers ("tensorboard", "wandb", "all"): loss and lr per step
    prior_generation_precision: str | None = None
    local_rank: int = -1
    enable_xformers_memory_efficient_attention: bool = False
    set_grads_to_none: bool = False
    # --- this project's additions -------------------------------------------------------------
    # Which erasure method `mace erase` runs (mace.methods.registry): "mace" (the paper), "refine"
    # (its stage 1 alone), "uce", "speed" or "rece"; method_scale sets the method's tuning knob
    # (mace/refine: train_preserve_scale and fuse_preserve_scale; uce/rece: the preservation
    # scale of preserve_concepts; speed: the null-space threshold); None: mace and refine keep
    # the scales above, the others take their papers' 0.1. preserve_concepts: the texts
    # uce, speed and rece preserve (MACE and refine preserve through the caches above).
    erasure_method: str = "mace"
    method_scale: float | None = None
    preserve_concepts: list = field(default_factory=list)
    method: str = "fast"  # "fast" or "reference" (paper-literal closed-form steps)
    concept_prompts_file: str | None = None  # optional prompt templates, one per line, {} = concept
    solve_jitter: float | None = None  # None: a singular system is an error; a float adds a reported ridge
    # Which tokens of a concept's prompts fusion maps as the concept's LoRA does: "all" (the
    # original); "concept": the concept name and the positions after it, the only ones the
    # name can change in a causal text encoder; "name": the name's own tokens, where the
    # attention loss looks without use_pooler (docs/design.md, section 8).
    fusion_tokens: str = "all"
    # Weight of a term added to the LoRA loss: the relative squared change each concept's LoRA
    # makes to the keys and values of the preservation caches' tokens. 0 (the original): the
    # LoRAs are free to change every prompt (docs/design.md, section 8).
    lora_preserve_scale: float = 0.0
    device: str = "cpu"
    num_images_per_concept: int = 8  # images generated per concept by `mace prepare`
    generation_steps: int = 30
    guidance_scale: float = 7.5
    mask_method: str = "attention"  # "attention" (the model's own cross-attention maps) or "grounded_sam"
    mask_threshold: float = 0.5
    grounding_model: str = "IDEA-Research/grounding-dino-base"
    sam_model: str = "facebook/sam-vit-huge"
    concepts_per_batch: int = 8  # LoRAs trained together in one UNet batch
    report_prompts: list = field(default_factory=list)  # kept prompts shown in report.html
    # The report stage's cost (report.html): at most report_max_concepts erased concepts shown
    # (spread over the list), report_images images per prompt and model, at report_steps
    # sampling steps (None: min(8, generation_steps)), report_batch_size images per call.
    report_max_concepts: int = 8
    report_images: int = 2
    report_steps: int | None = None
    report_batch_size: int = 8

    @property
    def concepts(self) -> list[tuple[str, str]]:
        """(name, type) per concept, names with '-' read as spaces as the original tools do."""
        return [(name, kind) for name, kind in self.multi_concept]

    @property
    def autocast_dtype(self):
        """torch dtype of ``mixed_precision`` (None: full precision)."""
        return autocast_dtype(self.mixed_precision)

    @property
    def preserve_per_token(self) -> bool:
        """Whether the preservation scales count per token (preserve_scale_mode: per_token)."""
        return self.preserve_scale_mode == "per_token"

    @property
    def preserve_count_factor(self) -> float:
        """Per token: n ** -preserve_count_exponent for n erased concepts (1 otherwise)."""
        if not self.preserve_per_token or not self.preserve_count_exponent:
            return 1.0
        return max(len(self.multi_concept), 1) ** -self.preserve_count_exponent

    @property
    def effective_refine_preserve_scale(self) -> float:
        """s of refinement's solve: train_preserve_scale ** 2, as the original computes it (its
        caches are scaled by train_preserve_scale and the solve scales them again); with more
        than max_memory concepts the original scales once. Per token: train_preserve_scale times
        the count factor (the solve multiplies it by the erased token count)."""
        if self.preserve_per_token:
            return self.train_preserve_scale * self.preserve_count_factor
        if len(self.multi_concept) > self.max_memory:
            return self.train_preserve_scale
        return self.train_preserve_scale**2

    @property
    def effective_fuse_preserve_scale(self) -> float:
        """s of fusion's solve: fuse_preserve_scale (train_preserve_scale beyond max_memory concepts,
        except per token, where it is times the count factor)."""
        if self.preserve_per_token:
            return self.fuse_preserve_scale * self.preserve_count_factor
        if len(self.multi_concept) > self.max_memory:
            return self.train_preserve_scale
        return self.fuse_preserve_scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def autocast_dtype(mixed_precision: str | None):
    """torch.float16 / torch.bfloat16 for "fp16" / "bf16", None for "no" or None."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision or "no")


KNOWN_KEYS = tuple(f.name for f in fields(MACEConfig))
_PATH_KEYS = ("prior_preservation_cache_path", "domain_preservation_cache_path", "concept_prompts_file")
_NUMBER_KEYS = {f.name: f.type.split(" | ")[0] for f in fields(MACEConfig)
                if f.type.split(" | ")[0] in ("float", "int")}
_OPTIONAL_KEYS = {f.name for f in fields(MACEConfig) if "None" in f.type.split(" | ")}


def _numbers(values: dict[str, Any]) -> dict[str, Any]:
    """The numeric keys as numbers: YAML reads ``1e-3`` (no dot) as text, so a text that is a
    number is taken as one, and a whole float is taken for an int; anything else is a one-line
    error naming the key."""
    out = dict(values)
    for key, kind in _NUMBER_KEYS.items():
        if key not in out or (out[key] is None and key in _OPTIONAL_KEYS):
            continue
        value = out[key]
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if kind == "int" and number is not None:
            number = int(number) if float(number).is_integer() else None
        if number is None:
            got = "null" if value is None else repr(value)
            raise ConfigError(f"{key} must be {'a whole number' if kind == 'int' else 'a number'}, got {got}")
        out[key] = number
    return out


_FIELD_TYPES = {f.name: f.type for f in fields(MACEConfig)}
_TEXT_OR_LIST_KEYS = ("mapping_concept",)  # one mapping for every concept, or one each


def _kinds(values: dict[str, Any]) -> dict[str, Any]:
    """Every non-numeric key of the right kind (numbers: ``_numbers``): a switch true or false, a
    text a text (a number written where a text belongs, a folder called 2024, is taken as one),
    a list a list; null only where a key may be empty. Anything else is a one-line error naming
    the key, before any work (it used to surface as a TypeError in the middle of a run)."""
    out = dict(values)
    for key, value in values.items():
        kinds = _FIELD_TYPES[key].split(" | ")
        if kinds[0] in ("int", "float"):
            continue
        if value is None:
            if "None" not in kinds:
                raise ConfigError(f"{key} must be {_KIND_WORDS[kinds[0]]}, got null")
        elif key in _TEXT_OR_LIST_KEYS and isinstance(value, (str, list)):
            continue
        elif "bool" in kinds:
            if not isinstance(value, bool):
                raise ConfigError(f"{key} must be true or false, got {value!r}")
        elif "list" in kinds and isinstance(value, list):
            continue
        elif "str" in kinds:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = str(value)
            elif not isinstance(value, str):
                raise ConfigError(f"{key} must be {_KIND_WORDS['str']}, got {value!r}")
        elif "list" in kinds:
            raise ConfigError(f"{key} must be {_KIND_WORDS['list']}, got {value!r}")
    return out


_KIND_WORDS = {"bool": "true or false", "str": "a text", "list": "a list"}


def check_prior_preservation(
    with_prior_preservation: bool,
    preserve_prompt: str | None,
    preserve_data_dir: str | os.PathLike | None,
    prior_loss_weight: float,
    *,
    check_paths: bool = True,
) -> None:
    """Raise ConfigError when prior preservation is asked for but cannot run."""
    if prior_loss_weight < 0:
        raise ConfigError(f"prior_loss_weight must be >= 0, got {prior_loss_weight}")
    if not with_prior_preservation:
        return
    if preserve_prompt is None or not str(preserve_prompt).strip():
        raise ConfigError("with_prior_preservation needs preserve_prompt, the caption of the images in preserve_data_dir")
    if check_paths:
        folder = Path(preserve_data_dir) if preserve_data_dir is not None else None
        if folder is None:
            raise ConfigError("with_prior_preservation needs preserve_data_dir, a folder of PNG/JPG images to preserve")
        if not folder.is_dir():
            raise ConfigError(f"preserve_data_dir: {folder} is not a folder (with_prior_preservation needs PNG/JPG images there)")
        if not image_files(folder):
            raise ConfigError(f"preserve_data_dir: {folder} holds no PNG/JPG images (with_prior_preservation needs some)")


def _normalise_concepts(raw) -> list[list[str]]:
    items = list(raw or [])
    # The original files nest the list once more: multi_concept: - [[name, type], ...]
    if len(items) == 1 and isinstance(items[0], (list, tuple)) and items[0] and isinstance(items[0][0], (list, tuple)):
        items = list(items[0])
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ConfigError(f"multi_concept[{i}] must be [name, type], got {item!r}")
        name, kind = str(item[0]).replace("-", " ").strip(), str(item[1]).strip()
        if kind not in CONCEPT_TYPES:
            raise ConfigError(f"multi_concept[{i}] {name!r}: unknown concept type {kind!r}; choose one of {', '.join(CONCEPT_TYPES)}")
        if not name:
            raise ConfigError(f"multi_concept[{i}] has an empty name")
        if control_characters(name):
            raise ConfigError(f"multi_concept[{i}] {name!r}: a concept name cannot hold control characters "
                              f"({control_characters(name)})")
        out.append([name, kind])
    return out


def config_from_dict(values: dict[str, Any], *, check_paths: bool = True) -> MACEConfig:
    """Validate a plain dict (the ``MACE:`` section) into a MACEConfig."""
    if "MACE" in values and isinstance(values["MACE"], dict):
        values = values["MACE"]
    unknown = [k for k in values if k not in KNOWN_KEYS]
    if unknown:
        msgs = []
        for k in unknown:
            close = difflib.get_close_matches(k, KNOWN_KEYS, n=1, cutoff=0.6)
            msgs.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown config key(s): {', '.join(msgs)}")
    values = dict(values)
    for key in _PATH_KEYS + ("preserve_data_dir", "preserve_prompt"):  # the original writes `false` for none
        if key in values and values[key] in (False, "", "none", "None"):
            values[key] = None
    values = _kinds(_numbers(values))
    config = MACEConfig(**values)
    config.multi_concept = _normalise_concepts(config.multi_concept)
    if not config.multi_concept:
        raise ConfigError("multi_concept lists no concepts to erase")
    mapping = config.mapping_concept
    if isinstance(mapping, str):
        mapping = [mapping] * len(config.multi_concept)
    config.mapping_concept = [str(m) for m in mapping]
    if len(config.mapping_concept) != len(config.multi_concept):
        raise ConfigError(
            f"multi_concept has {len(config.multi_concept)} concepts but mapping_concept has "
            f"{len(config.mapping_concept)} entries; give one mapping per concept"
        )
    _merge_duplicate_concepts(config)
    checks = [
        (config.lamb >= 0, "lamb must be >= 0"),
        (config.rank >= 1, "rank must be >= 1"),
        (config.aug_length >= 1, "aug_length must be >= 1"),
        (config.prompt_len >= config.aug_length, f"aug_length ({config.aug_length}) cannot exceed prompt_len ({config.prompt_len})"),
        (config.max_train_steps >= 0, "max_train_steps must be >= 0"),
        (config.train_preserve_scale >= 0 and config.fuse_preserve_scale >= 0 and config.lora_preserve_scale >= 0,
         "preserve scales must be >= 0"),
        (config.erasure_method in ERASURE_METHODS,
         f"erasure_method must be one of {', '.join(ERASURE_METHODS)}, got {config.erasure_method!r}"),
        (config.method_scale is None or config.method_scale >= 0, "method_scale must be >= 0"),
        (isinstance(config.preserve_concepts, list) and all(isinstance(p, str) and p.strip() for p in config.preserve_concepts),
         "preserve_concepts must be a list of non-empty texts"),
        (config.preserve_scale_mode in ("absolute", "per_token"),
         f"preserve_scale_mode must be 'absolute' or 'per_token', got {config.preserve_scale_mode!r}"),
        (0 <= config.preserve_count_exponent <= 1,
         f"preserve_count_exponent must be between 0 and 1, got {config.preserve_count_exponent}"),
        (not config.preserve_count_exponent or config.preserve_scale_mode == "per_token",
         "preserve_count_exponent needs preserve_scale_mode: per_token"),
        (config.lora_preserve_scale == 0 or config.prior_preservation_cache_path or config.domain_preservation_cache_path,
         "lora_preserve_scale needs a preservation cache (prior_preservation_cache_path or domain_preservation_cache_path)"),
        (config.method in ("fast", "reference"), f"method must be 'fast' or 'reference', got {config.method!r}"),
        (config.fusion_tokens in FUSION_TOKENS, f"fusion_tokens must be one of {FUSION_TOKENS}, got {config.fusion_tokens!r}"),
        (config.mask_method in ("attention", "grounded_sam"),
         f"mask_method must be 'attention' or 'grounded_sam', got {config.mask_method!r}"),
        (config.concepts_per_batch >= 1, "concepts_per_batch must be >= 1"),
        (config.num_images_per_concept >= 1, "num_images_per_concept must be >= 1"),
        (config.report_max_concepts >= 1 and config.report_images >= 1 and config.report_batch_size >= 1
         and (config.report_steps is None or config.report_steps >= 1),
         "report_max_concepts, report_images, report_steps and report_batch_size must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    report_to_trackers(config.report_to)  # an unknown tracker name is an error before any work
    check_prior_preservation(config.with_prior_preservation, config.preserve_prompt, config.preserve_data_dir,
                             config.prior_loss_weight, check_paths=check_paths)
    if check_paths:
        for key in _PATH_KEYS:
            value = getattr(config, key)
            if value is None:
                continue
            if Path(value).suffix in (".pt", ".pth", ".pkl", ".bin"):
                raise ConfigError(f"{key}: {value} is a pickle; caches here are safetensors, made with `mace cache`")
            if not Path(value).exists():
                raise ConfigError(f"{key}: {value} does not exist")
        model = str(config.pretrained_model_name_or_path)
        looks_local = model.startswith((".", "/", "~")) or os.sep in model
        if not model.startswith("builtin:") and looks_local and not is_hub_id(model) and not Path(model).expanduser().exists():
            raise ConfigError(f"pretrained_model_name_or_path: {model} does not exist")
        _check_final_save_path(config)
    for key, message in config_warnings(config):
        warnings.warn(ConfigWarning(f"{key}={getattr(config, key)!r} {message}"), stacklevel=2)
    return config


def _check_final_save_path(config: MACEConfig) -> None:
    """Saving the final model swaps its whole folder, so final_save_path must not be (or hold)
    the model being edited or the run's own folders, and may hold nothing but a model: checked
    before any work, not found out when the model is saved at the end."""
    final = Path(config.final_save_path).expanduser().resolve()
    source = Path(str(config.pretrained_model_name_or_path)).expanduser()
    if source.exists() and (final == source.resolve() or final in source.resolve().parents):
        raise ConfigError(f"final_save_path {config.final_save_path} is or holds the model being edited "
                          f"(pretrained_model_name_or_path); saving would replace it: choose another folder")
    for key in ("output_dir", "input_data_dir"):
        value = getattr(config, key)
        if value is not None and (final == Path(value).expanduser().resolve() or final in Path(value).expanduser().resolve().parents):
            raise ConfigError(f"final_save_path {config.final_save_path} is or holds the run's {key} ({value}); "
                              "saving the model would replace that folder whole: choose another")
    try:
        check_model_target(final)
    except OSError as err:
        raise ConfigError(f"final_save_path: {err}") from None


def _merge_duplicate_concepts(config: MACEConfig) -> None:
    """Concepts that are one for the original's normalisation and the text encoder (case, '-'
    and spaces aside: ``mace.utils.names.duplicate_key``) are erased once, the first of them, with a
    warning naming them; duplicates with different types or mappings are a ConfigError."""
    names, kinds = [n for n, _ in config.multi_concept], [k for _, k in config.multi_concept]
    try:
        kept, merged = merge_duplicates(names, kinds, config.mapping_concept)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not merged:
        return
    config.multi_concept = [config.multi_concept[i] for i in kept]
    config.mapping_concept = [config.mapping_concept[i] for i in kept]
    for group in merged:
        warnings.warn(ConfigWarning(f"multi_concept: {', '.join(map(repr, group))} are the same concept (case, '-' "
                                    f"and spaces aside): erased once, as {group[0]!r}"), stacklevel=3)


# Keys of the original files that this implementation does not act on, with the values at which
# that changes nothing (the original's defaults or values that have no effect there either), and
# what to do instead. Every other key is honoured; see docs/fidelity.md.
_NO_EFFECT: dict[str, tuple[tuple, str]] = {
    "lora": ((True,), "MACE always trains one LoRA per concept (the original never reads this key)"),
    "train_text_encoder": ((False,), "the text encoder is never trained (the original never optimises it either)"),
    "with_uncond_loss": ((False,), "the original never reads the unconditional-loss keys"),
    "use_gpt": ((False,), "prompts come from templates or concept_prompts_file"),
    "test_erased_model": ((False,), "the report stage and `mace eval` show the erased model"),
    "use_8bit_adam": ((False,), "the optimiser is torch's AdamW"),
    "dataloader_num_workers": ((0,), "data is loaded in-process, once per concept"),
    "enable_xformers_memory_efficient_attention": ((False,), "training installs its own attention processors "
                                                   "(as the original's LoRA processors do)"),
    "tokenizer_name": ((None,), "the pipeline's own tokenizer is used"),
    "checkpointing_steps": ((), "each LoRA is saved whole when trained; a rerun resumes concept by concept"),
    "resume_from_checkpoint": ((None,), "resuming is automatic: results whose inputs did not change are reused"),
    "num_train_epochs": ((1,), "max_train_steps sets the length of training (as in the original)"),
    "push_to_hub": ((False,), "nothing is uploaded"),
    "hub_token": ((None,), "nothing is uploaded"),
    "hub_model_id": ((None,), "nothing is uploaded"),
    "prior_generation_precision": ((None,), "there is no class-image generation step"),
    "local_rank": ((-1,), "one process runs the whole erasure"),
    "instance_prompt": ((None,), "prompts come from templates or concept_prompts_file"),
    "concept_keyword": ((None,), "the concept names of multi_concept are used"),
    "center_crop": ((False,), "images are resized to the resolution, not cropped"),
    "grounded_config": ((None,), "Grounded-SAM models are named by grounding_model and sam_model"),
    "grounded_checkpoint": ((None,), "Grounded-SAM models are named by grounding_model and sam_model"),
    "sam_hq_checkpoint": ((None,), "Grounded-SAM models are named by grounding_model and sam_model"),
    "sam_checkpoint": ((None,), "Grounded-SAM models are named by grounding_model and sam_model"),
}


def config_warnings(config: MACEConfig) -> list[tuple[str, str]]:
    """(key, why) for every key set to a value that this implementation does not act on."""
    out = []
    for key, (no_op, message) in _NO_EFFECT.items():
        value = getattr(config, key)
        matters = value < config.max_train_steps if key == "checkpointing_steps" else value not in no_op
        if matters:
            out.append((key, f"has no effect here: {message}"))
    for key in ("negative_guidance", "uncond_loss_weight"):
        if getattr(config, key) != 1.0:
            out.append((key, "has no effect here: the original never reads the unconditional-loss keys"))
    trackers, missing = report_to_trackers(config.report_to)
    for name in missing:
        out.append(("report_to", f"has no effect here: the {name} package is not installed (nothing is logged to {name})"))
    if not trackers and not missing and _tracker_list(config.report_to):  # "all", and nothing installed
        out.append(("report_to", "has no effect here: no tracker package (tensorboard, wandb, ...) is installed"))
    if config.mask_method == "grounded_sam" and config.use_sam_hq:
        out.append(("use_sam_hq", "has no effect here: transformers has no SAM-HQ; the model named by sam_model is used"))
    if len(config.multi_concept) > config.max_memory:
        out.append(("max_memory", f"is below the {len(config.multi_concept)} concepts: as the original does then, "
                                  f"both solves weight the caches by train_preserve_scale once"))
    return out


def _tracker_list(report_to) -> list[str]:
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [str(n).strip() for n in names if str(n).strip() and str(n).strip().lower() != "none"]


def report_to_trackers(report_to) -> tuple[list[str], list[str]]:
    """(trackers to log to, trackers whose package is not installed) for ``report_to``: None or
    "none", one of accelerate's tracker names ("tensorboard", "wandb", ... or one registered with
    ``accelerate.tracking.register_tracker_class``), "all" (every installed one) or a list of
    names. An unknown name is a ConfigError."""
    names = _tracker_list(report_to)
    if not names:
        return [], []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    installed = [str(t) for t in get_available_trackers()]
    builtin = {str(t) for t in LoggerType}
    use, missing = [], []
    for name in names:
        if name == "all":
            use += [t for t in installed if t not in use]
        elif name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"report_to: unknown tracker {name!r}; choose 'none', 'all' or one of "
                              f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        elif name in builtin and name not in installed:
            missing += [name] if name not in missing else []
        elif name not in use:
            use.append(name)
    return use, missing


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, *, check_paths: bool = True) -> MACEConfig:
    """Read a MACE YAML file; ``overrides`` are dotlist items like ``lamb=0.1``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        conf = OmegaConf.load(path)
    except Exception as err:  # yaml's and OmegaConf's errors: a file that is not a YAML mapping
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise ConfigError(f"{path}: not a valid YAML config ({first})") from None
    if not isinstance(conf, DictConfig):
        raise ConfigError(f"{path}: a config must be a YAML mapping of keys to values")
    if "MACE" in conf:
        conf = conf.MACE
    for item in overrides or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    if overrides:
        try:
            conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(overrides)))
        except Exception as err:  # a value YAML cannot read ('[[ship'), a list merged into a mapping
            first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
            raise ConfigError(f"--set {' '.join(overrides)}: not a valid override ({first})") from None
    values = OmegaConf.to_container(conf, resolve=False)
    _refuse_interpolations(values)
    return config_from_dict(values, check_paths=check_paths)


def _refuse_interpolations(values: Any, key: str = "") -> None:
    """Config values are data, taken as written: an OmegaConf interpolation (``${oc.env:...}``
    would put an environment variable, a token say, into a concept's prompts and folder names)
    is an error naming its key. The original code's configs use none."""
    if isinstance(values, dict):
        for k, v in values.items():
            _refuse_interpolations(v, f"{key}.{k}" if key else str(k))
    elif isinstance(values, list):
        for i, v in enumerate(values):
            _refuse_interpolations(v, f"{key}[{i}]")
    elif isinstance(values, str) and "${" in values:
        raise ConfigError(f"{key}: {values!r} is an interpolation; config values are taken as written, "
                          "so write the value itself")
