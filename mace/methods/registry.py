"""The erasure methods `mace erase` runs, in one registry: MACE, refinement only, UCE, SPEED, RECE.

Every method is run the same way, ``run_erasure(config, stages, progress)``, with the config's
``erasure_method`` naming it and ``method_scale`` setting its tuning knob (None: the method's
default); every method writes the same outputs: a diffusers folder at ``final_save_path``, an
:class:`~mace.erase.ErasureSummary`, and with the ``report`` stage the before/after page.

- ``mace``: the four stages of the paper (mace.erase); the knob is the preservation scale of
  both closed-form solves (train_preserve_scale and fuse_preserve_scale).
- ``refine``: stage 1 alone (the refined model is the result); the knob is train_preserve_scale.
- ``uce``, ``rece``: closed-form edits mapping each concept onto its ``mapping_concept`` while
  preserving the embeddings of ``preserve_concepts``; the knob is their preservation scale.
- ``speed``: the edit restricted to the null space of ``preserve_concepts``' embeddings; the
  knob is its null-space threshold.

The one-shot methods (uce, speed, rece) take seconds: they always run again, never resume.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mace import distributed
from mace.config import ERASURE_METHODS, ConfigError, MACEConfig
from mace.erase import STAGES, ErasureSummary, erase
from mace.utils.atomic import atomic_path, save_pipeline_atomically


@dataclass(frozen=True)
class ErasureMethod:
    """One erasure method: its stages, its tuning knob (what ``method_scale`` sets) and the
    knob's default."""

    name: str
    stages: tuple[str, ...]
    knob: str
    default_scale: float
    run: Callable[[MACEConfig, float, tuple[str, ...], bool], ErasureSummary]


def _run_mace(config: MACEConfig, scale: float, stages: tuple[str, ...], progress: bool) -> ErasureSummary:
    return erase(_with_preservation_scale(config, scale), stages, progress)


def _run_refine(config: MACEConfig, scale: float, stages: tuple[str, ...], progress: bool) -> ErasureSummary:
    config = _with_preservation_scale(config, scale)
    summary = ErasureSummary(concepts=[name for name, _ in config.concepts])
    if "refine" in stages:
        summary = erase(config, ("refine",), progress)
        start = time.perf_counter()
        # The refined model is the result: the same folder as every method's, written atomically.
        distributed.on_main(lambda: _copy_model(Path(summary.refined_model), Path(config.final_save_path)))
        summary.seconds["save"] = time.perf_counter() - start
        summary.final_model = config.final_save_path
        summary.wrote.append(f"final model {config.final_save_path}")
    return _with_report(config, stages, progress, summary)


def _with_preservation_scale(config: MACEConfig, scale: float | None) -> MACEConfig:
    if scale is None:
        return config
    return replace(config, train_preserve_scale=scale, fuse_preserve_scale=scale)


def _copy_model(source: Path, target: Path) -> None:
    with atomic_path(target, directory=True) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)


def _one_shot(edit: Callable) -> Callable[[MACEConfig, float, tuple[str, ...], bool], ErasureSummary]:
    """A runner for a closed-form edit ``edit(pipe, config, names, guides, scale)``: load the
    original model, edit it, save it at final_save_path (rank 0 alone under torchrun)."""

    def run(config: MACEConfig, scale: float, stages: tuple[str, ...], progress: bool) -> ErasureSummary:
        from mace.pipelines.loading import load_pipeline

        names = [name for name, _ in config.concepts]
        summary = ErasureSummary(concepts=names, final_model=config.final_save_path)
        if "edit" in stages:
            start = time.perf_counter()

            def edit_and_save() -> None:
                pipe = load_pipeline(config.pretrained_model_name_or_path, device=distributed.local_device(config.device),
                                     revision=config.revision)
                edit(pipe, config, names, list(config.mapping_concept), scale)
                save_pipeline_atomically(pipe, config.final_save_path)

            distributed.on_main(edit_and_save)
            summary.seconds["edit"] = time.perf_counter() - start
            summary.wrote.append(f"final model {config.final_save_path}")
        return _with_report(config, stages, progress, summary)

    return run


def _with_report(config: MACEConfig, stages: tuple[str, ...], progress: bool, summary: ErasureSummary) -> ErasureSummary:
    if "report" not in stages:
        return summary
    report = erase(config, ("report",), progress)
    summary.seconds.update(report.seconds)
    summary.report, summary.wrote = report.report, summary.wrote + report.wrote
    return summary


def _uce(pipe, config: MACEConfig, names: list[str], guides: list[str], scale: float) -> None:
    from mace.methods.uce import uce

    uce(pipe, names, guides, config.preserve_concepts, lam=config.lamb, preserve_scale=scale, jitter=config.solve_jitter)


def _speed(pipe, config: MACEConfig, names: list[str], guides: list[str], scale: float) -> None:
    from mace.methods.speed import speed

    speed(pipe, names, guides, config.preserve_concepts, threshold=scale, seed=config.seed, jitter=config.solve_jitter)


def _rece(pipe, config: MACEConfig, names: list[str], guides: list[str], scale: float) -> None:
    from mace.methods.rece import rece

    rece(pipe, names, guides, config.preserve_concepts, lam=config.lamb, preserve_scale=scale, jitter=config.solve_jitter)


# The defaults: MACE's and refinement's are the centre of the glyph-world searches
# (benchmarks/bench_erasure_quality.py); UCE's, SPEED's and RECE's their papers' 0.1.
METHODS: dict[str, ErasureMethod] = {m.name: m for m in (
    ErasureMethod("mace", STAGES, "train_preserve_scale and fuse_preserve_scale", 3.0, _run_mace),
    ErasureMethod("refine", ("refine", "report"), "train_preserve_scale", 3.0, _run_refine),
    ErasureMethod("uce", ("edit", "report"), "preserve_scale of preserve_concepts", 0.1, _one_shot(_uce)),
    ErasureMethod("speed", ("edit", "report"), "null-space threshold", 0.1, _one_shot(_speed)),
    ErasureMethod("rece", ("edit", "report"), "preserve_scale of preserve_concepts", 0.1, _one_shot(_rece)),
)}


assert tuple(METHODS) == ERASURE_METHODS  # the config checks names against ERASURE_METHODS


def get_method(name: str) -> ErasureMethod:
    if name not in METHODS:
        raise ConfigError(f"erasure_method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def run_erasure(config: MACEConfig, stages: tuple[str, ...] | None = None, progress: bool = True) -> ErasureSummary:
    """Run ``config.erasure_method`` on ``config``: its stages (default: all of them) with its knob
    at ``config.method_scale``. MACE without method_scale keeps the config's own scales; the
    others use their default."""
    method = get_method(config.erasure_method)
    stages = tuple(stages or method.stages)
    unknown = [s for s in stages if s not in method.stages]
    if unknown:
        raise ConfigError(f"erasure_method {method.name} has the stages {', '.join(method.stages)}, "
                          f"not {', '.join(unknown)}")
    scale = config.method_scale
    if scale is None and method.name not in ("mace", "refine"):
        scale = method.default_scale
    return method.run(config, scale, stages, progress)
