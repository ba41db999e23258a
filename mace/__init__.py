"""mace: MACE concept erasure (closed-form refinement, per-concept LoRAs, closed-form fusion)
on diffusers Stable Diffusion pipelines, built on the mace_kernels ops.

Where the paper's steps live: prepare.py (data), refinement.py (stage 1), lora.py and
lora_training.py (stage 2), fusion.py (stage 3), closed_form.py (the solves of stages 1 and 3),
cache.py (preservation statistics), erase.py (the whole pipeline on a config).
"""

from . import _quiet  # noqa: F401  (first: it filters a notice the imports below would print)
from .cache import (
    CacheMismatchError,
    PreservationCache,
    build_preservation_cache,
    load_preservation_cache,
    preservation_matrix,
    read_prompt_file,
)
from .closed_form import SolveReport
from .fusion import fuse
from .lora_io import read_lora, save_lora
from .models import NoCrossAttentionError, cross_attention_projections, encode_prompts
from .pipelines import load_pipeline
from .prompts import PromptPair, align_tokens, concept_prompt_pairs
from .refinement import refine

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
