"""Optional Triton import: kernel modules define their kernels whether or not Triton exists.

Without Triton, ``jit`` returns the Python function unchanged (it is never launched: the
dispatcher refuses the triton backend) and ``tl.constexpr`` still works as an annotation.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    jit = triton.jit
except Exception:  # pragma: no cover - depends on the installation
    HAS_TRITON = False
    triton = None

    class _LanguageStub:
        constexpr = int

    tl = _LanguageStub()

    def jit(fn):
        return fn


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
