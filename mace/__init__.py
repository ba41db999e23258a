"""mace: MACE concept erasure (closed-form refinement, per-concept LoRAs, closed-form fusion)
on diffusers Stable Diffusion pipelines, built on the mace_kernels ops."""

from .cache import (
    CacheMismatchError,
    PreservationCache,
    build_preservation_cache,
    load_preservation_cache,
    preservation_matrix,
    read_prompt_file,
)
from .cfr import refine
from .closed_form import SolveReport
from .fusion import fuse
from .lora_io import read_lora, save_lora
from .models import NoCrossAttentionError, cross_attention_projections, encode_prompts, load_pipeline
from .prompts import PromptPair, align_tokens, concept_prompt_pairs

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
