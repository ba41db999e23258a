"""Tile sizes of the Triton kernels, per kernel: one entry for the GPU, one for the interpreter.

The interpreter (``TRITON_INTERPRET=1``, the CPU test suite) runs a program's block ops with
numpy, so smaller tiles keep tests fast; it also never takes the fp16/bf16 tensor-core dot
(``native_dot``) nor splits a segment's tokens across programs (``split_tokens``). Launch code
reads its entry with :func:`tile_config`; shape-dependent rules (a narrower tile for a small
operand) stay in the launcher.
"""

from __future__ import annotations

from ._backend import triton_interpret

TileConfig = dict[str, int | bool]

TILE_CONFIGS: dict[str, dict[str, TileConfig]] = {
    # _grouped_matmul: closed_form_edit, fuse_loras, lora_apply shrink/expand.
    # block_k is used when K > 16 (16 otherwise).
    "grouped_matmul": {
        "gpu": {"block_m": 64, "block_n": 64, "block_k": 32, "native_dot": True},
        "interpreter": {"block_m": 32, "block_n": 32, "block_k": 32, "native_dot": False},
    },
    # _segmented_outer: token_covariance, lora_apply gradients. block_e is used when E > 16
    # (16 otherwise; the symmetric x x^T product uses block_d for both).
    "segmented_outer": {
        "gpu": {"block_t": 32, "block_e": 64, "block_d": 64, "native_dot": True, "split_tokens": True},
        "interpreter": {"block_t": 32, "block_e": 32, "block_d": 32, "native_dot": False, "split_tokens": False},
    },
    # spd_solve's blocked triangular solve: block columns of L, block_m rows of X per program.
    "spd_solve": {
        "gpu": {"block": 32, "block_m": 64},
        "interpreter": {"block": 32, "block_m": 16},
    },
}


def tile_config(kernel: str) -> TileConfig:
    """The tile entry of ``kernel`` for where Triton runs now (GPU or interpreter)."""
    return TILE_CONFIGS[kernel]["interpreter" if triton_interpret() else "gpu"]
