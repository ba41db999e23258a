"""mace_kernels: the closed-form and multi-LoRA operations of MACE concept erasure.

Each op has a torch reference, a Triton kernel (GPU) and a C++ implementation (CPU); see
:func:`backends` for what this installation has and ``MACE_KERNELS_BACKEND`` to force one.
A default Triton kernel that fails on a GPU falls back to torch (see :func:`triton_failures`).
"""

from ._backend import BACKENDS, TritonFallbackWarning, backends, triton_failures
from .closed_form_edit import closed_form_edit
from .fuse_loras import fuse_loras
from .lora_apply import lora_apply
from .spd_solve import NotPositiveDefiniteError, SolveInfo, SPDJitterWarning, spd_solve
from .token_covariance import token_covariance

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "NotPositiveDefiniteError",
    "SPDJitterWarning",
    "SolveInfo",
    "TritonFallbackWarning",
    "backends",
    "closed_form_edit",
    "fuse_loras",
    "lora_apply",
    "spd_solve",
    "token_covariance",
    "triton_failures",
]
