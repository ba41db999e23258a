"""mace: MACE concept erasure (closed-form refinement, per-concept LoRAs, closed-form fusion)
on diffusers Stable Diffusion pipelines, built on the mace_kernels ops.

Where the paper's steps live: stages/ holds them in order, prepare.py (data), refinement.py
(stage 1), lora.py and lora_training.py (stage 2), fusion.py (stage 3), with cache.py (the
preservation statistics) and prompts.py; closed_form/ holds the solves of stages 1 and 3 on plain
tensors; erase.py runs the whole pipeline on a config. Around them: methods/ (the other erasure
methods, UCE, SPEED, RECE, and the registry `mace erase` runs them through), attacks/ (does an
erased concept come back?), evaluation/ (metrics and the report), world/ (the glyph worlds, the
built-in image domains erasures are measured on), pipelines/ (loading diffusers pipelines and
reaching their text encoders and cross-attention), utils/ (atomic writes, fingerprints, names).
"""

from mace.utils import quiet  # noqa: F401  (first: it filters a notice the imports below would print)

# isort: split

from mace.closed_form import SolveReport
from mace.pipelines.components import NoCrossAttentionError, cross_attention_projections, encode_prompts
from mace.pipelines.loading import load_pipeline
from mace.pipelines.lora_io import read_lora, save_lora
from mace.stages.cache import (
    CacheMismatchError,
    PreservationCache,
    build_preservation_cache,
    load_preservation_cache,
    preservation_matrix,
    read_prompt_file,
)
from mace.stages.fusion import fuse
from mace.stages.prompts import PromptPair, align_tokens, concept_prompt_pairs
from mace.stages.refinement import refine

__all__ = [
    "CacheMismatchError",
    "NoCrossAttentionError",
    "PreservationCache",
    "PromptPair",
    "SolveReport",
    "align_tokens",
    "build_preservation_cache",
    "concept_prompt_pairs",
    "cross_attention_projections",
    "encode_prompts",
    "fuse",
    "load_pipeline",
    "load_preservation_cache",
    "preservation_matrix",
    "read_lora",
    "read_prompt_file",
    "refine",
    "save_lora",
]
