"""What a `mace erase` run knows about earlier runs, and the one model it works on.

- ``RunState``: ``<output_dir>/.mace_state.json`` maps each finished stage to the fingerprint
  of everything it was computed from; a stage is skipped only when its fingerprint is the
  same and its output exists (docs/design.md, section 4). Under torchrun every rank keeps
  the same state; rank 0 alone writes the file and decides whether a stage is done.
- ``RunModels``: MACE changes only the cross-attention key/value projections, so the original,
  refined and final models are one pipeline with three sets of those weights. The pipeline is
  loaded once; each set is a CPU snapshot swapped in when a stage needs it, and a set that an
  earlier run made is read from its saved folder's UNet file instead of loading that model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mace import distributed
from mace.pipelines.components import cross_attention_projections, projection_weights, read_projection_weights, set_projection_weights
from mace.pipelines.loading import load_pipeline
from mace.utils.atomic import write_json_atomically

STATE_FILE = ".mace_state.json"


class RunState:
    """The fingerprints of the stages an earlier run of the same output folder finished."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / STATE_FILE
        self.stages: dict[str, str] = {}
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                loaded = {}  # a damaged state file only means: nothing is known to be done
            self.stages = {k: v for k, v in loaded.items() if isinstance(v, str)} if isinstance(loaded, dict) else {}

    def is_done(self, stage: str, fingerprint: str, model_folder: str | os.PathLike) -> bool:
        """The stage finished under this fingerprint and its saved model is there (rank 0's
        answer on every rank: what runs next must be the same on all of them)."""
        return distributed.agree(self.stages.get(stage) == fingerprint and (Path(model_folder) / "model_index.json").exists())

    def mark_done(self, stage: str, fingerprint: str) -> None:
        self.stages[stage] = fingerprint
        self._write()

    def forget(self, stage: str) -> None:
        if self.stages.pop(stage, None) is not None:
            self._write()

    def _write(self) -> None:
        if distributed.is_main():
            write_json_atomically(self.path, self.stages)


class RunModels:
    """One pipeline for a run and snapshots of its cross-attention weights by version."""

    def __init__(self, model: str | os.PathLike, device: str | torch.device | None = None, revision: str | None = None):
        self.model, self.device, self.revision = model, device, revision
        self._pipe = None
        self._snapshots: dict[str, list[torch.Tensor]] = {}
        self._folders: dict[str, Path] = {}
        self.current = "original"

    @property
    def pipe(self):
        """The run's pipeline (loaded on first use, with the original weights)."""
        if self._pipe is None:
            self._pipe = load_pipeline(self.model, device=self.device, revision=self.revision)
            self._snapshots["original"] = [w.detach().cpu().clone() for w in projection_weights(self._pipe.unet)]
            self.current = "original"
        return self._pipe

    def saved_in(self, version: str, folder: str | os.PathLike) -> None:
        """Where an earlier run saved ``version`` (read only if this run did not make it)."""
        self._folders[version] = Path(folder)

    def weights(self, version: str) -> list[torch.Tensor]:
        """The projection weights of ``version`` (CPU tensors, projection order)."""
        pipe = self.pipe
        if version not in self._snapshots:
            if version not in self._folders:
                raise KeyError(f"no {version} model in this run")
            names = [name for name, _ in cross_attention_projections(pipe.unet)]
            self._snapshots[version] = read_projection_weights(self._folders[version], names)
        return self._snapshots[version]

    def keep(self, version: str) -> None:
        """Record the pipeline's current projection weights as ``version``."""
        self._snapshots[version] = [w.detach().cpu().clone() for w in projection_weights(self.pipe.unet)]
        self.current = version

    def use(self, version: str):
        """The pipeline with ``version``'s projection weights."""
        pipe = self.pipe
        if self.current != version:
            set_projection_weights(pipe.unet, self.weights(version))
            self.current = version
        return pipe
