"""Backend selection for the mace_kernels ops.

Every op has three implementations: ``"torch"`` (the readable reference), ``"triton"`` (GPU, or
the CPU under ``TRITON_INTERPRET=1``) and ``"cpp"`` (the CPU extension built by setup.py).
The choice is, in order: the op's ``backend=`` argument, the ``MACE_KERNELS_BACKEND``
environment variable, then the default for the tensors' device.

The default on CUDA is Triton. A Triton kernel chosen by default that fails to compile or launch
falls back to the op's torch implementation, with one TritonFallbackWarning per op naming the
error: a new GPU, driver or Triton release must never turn an erasure into a crash. A backend
asked for by name (argument or environment variable) never falls back: benchmarks and tests
want the failure.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Literal

import torch

Backend = Literal["torch", "triton", "cpp"]
BACKENDS: tuple[str, ...] = ("torch", "triton", "cpp")
ENV_VAR = "MACE_KERNELS_BACKEND"

# The torch.library namespace of the five public ops (torch.ops.mace.token_covariance, ...).
# Not "mace_kernels": the C++ extension owns that namespace for its CPU kernels, one of which is
# already called fuse_loras. Each op takes a ``backend`` string ("auto" or a name) and resolves
# it with select_backend when it runs, so a compiled graph still honours MACE_KERNELS_BACKEND
# and the Triton fallback.
OPS_NAMESPACE = "mace"

try:  # Triton is optional: the torch and cpp backends serve without it.
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    _TRITON_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the installation
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _major_minor(version: str) -> tuple[int, int]:
    parts = version.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def interpreter_conflict(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run our kernels with these versions, or None.

    Triton's interpreter before 3.7 turns a runtime integer (a loop bound such as a segment's
    end) into a Python int with ``int()`` of a one-element array, which NumPy 2.4 refuses: every
    kernel with a runtime loop bound then fails with "only 0-dimensional arrays can be converted
    to Python scalars". Compiled kernels on a GPU are unaffected.
    """
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run with NumPy "
            f"{numpy_version}: it calls int() on one-element arrays, which NumPy 2.4 refuses; "
            "install triton>=3.7 or numpy<2.4"
        )
    return None


# Why this installation's Triton interpreter cannot run the kernels, when it cannot (tests stop on it).
INTERPRETER_CONFLICT: str | None = None
if _TRITON_ERROR is None and triton_interpret():
    import numpy

    INTERPRETER_CONFLICT = _TRITON_ERROR = interpreter_conflict(triton.__version__, numpy.__version__)


def _load_extension() -> str | None:
    """Load the C++ extension (it registers torch.ops.mace_kernels.*); the reason if it fails."""
    import importlib.util

    if importlib.util.find_spec(f"{__package__}._C") is None:
        return "the extension was not built"
    try:
        from . import _C  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the build
        return f"{type(exc).__name__}: {exc}"
    return None


_CPP_ERROR: str | None = _load_extension()


def cpp_ops():
    """The namespace of the C++ ops; raises with the load error when the extension is absent."""
    if _CPP_ERROR is not None:
        raise RuntimeError(
            f"the mace_kernels C++ extension is not available ({_CPP_ERROR}); "
            "build it with `pip install --no-build-isolation -e .`"
        )
    return torch.ops.mace_kernels


def backends() -> dict[str, dict[str, object]]:
    """Which backends this installation has, and why one is missing.

    >>> mace_kernels.backends()["cpp"]["available"]
    True
    """
    return {
        "torch": {"available": True, "devices": ["cpu", "cuda"], "error": None},
        "triton": {
            "available": _TRITON_ERROR is None,
            "devices": ["cuda"] + (["cpu (TRITON_INTERPRET=1)"] if triton_interpret() else []),
            "error": _TRITON_ERROR,
        },
        "cpp": {"available": _CPP_ERROR is None, "devices": ["cpu"], "error": _CPP_ERROR},
    }


def _default_backend(device: torch.device) -> str:
    """The backend an op uses on ``device`` when nothing names one."""
    if device.type == "cuda" and _TRITON_ERROR is None:
        return "triton"
    if device.type == "cpu" and _CPP_ERROR is None:
        return "cpp"
    return "torch"


def select_backend(backend: str | None, device: torch.device) -> tuple[str, bool]:
    """``(backend, chosen_by_default)`` for tensors on ``device``; a named one that cannot run is an error."""
    source = "backend="
    if backend is None or backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            backend, source = env, f"${ENV_VAR}="
    if backend is None or backend == "auto":
        return _default_backend(device), True
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {source}{backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
        )
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"the cpp backend runs on CPU tensors only, got a {device.type} tensor")
        cpp_ops()  # raises with the reason when the extension is missing
    elif backend == "triton":
        if _TRITON_ERROR is not None:
            raise RuntimeError(f"the triton backend is not available ({_TRITON_ERROR})")
        if device.type == "cpu" and not triton_interpret():
            raise ValueError(
                "the triton backend needs CUDA tensors; on the CPU set TRITON_INTERPRET=1 "
                "before importing mace_kernels (slow, for tests)"
            )
    return backend, False


class TritonFallbackWarning(RuntimeWarning):
    """A default Triton kernel failed; the op runs its torch implementation from now on."""


# op name -> the error of its Triton kernel, once it has failed in this process.
_TRITON_FAILURES: dict[str, str] = {}


def triton_failures() -> dict[str, str]:
    """The ops whose default Triton kernel failed in this process, with the error."""
    return dict(_TRITON_FAILURES)


def implementation(op: str, table: dict, backend: str | None, device: torch.device):
    """The entry of an op's dispatch table (a function or a tuple of primitives) to run.

    A Triton entry chosen by default is wrapped so that a compile or launch failure switches
    the op to its torch entry (the same position of the tuple), for this call and every later
    one, warning once. On CUDA every Triton entry runs with the tensors' device current.
    """
    name, by_default = select_backend(backend, device)
    if name != "triton":
        return table[name]
    if by_default and op in _TRITON_FAILURES:
        return table["torch"]
    chosen, reference = table["triton"], table["torch"]

    def prepared(kernel, ref):
        if device.type == "cuda":
            kernel = _on_device(kernel, device)
        return _guarded(op, kernel, ref) if by_default else kernel

    if isinstance(chosen, tuple):
        return tuple(prepared(f, g) for f, g in zip(chosen, reference, strict=True))
    return prepared(chosen, reference)


def _on_device(kernel: Callable, device: torch.device) -> Callable:
    """Run ``kernel`` with ``device`` as the current CUDA device: Triton launches on the current
    device and its stream, which need not be the tensors' (``cuda:1`` without torchrun)."""

    def run(*args, **kwargs):
        with torch.cuda.device(device):
            return kernel(*args, **kwargs)

    run.__name__ = getattr(kernel, "__name__", "kernel")
    return run


def _guarded(op: str, kernel: Callable, reference: Callable) -> Callable:
    def run(*args, **kwargs):
        if op in _TRITON_FAILURES:
            return reference(*args, **kwargs)
        try:
            return kernel(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise  # the torch implementation would not fit either
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            _TRITON_FAILURES[op] = f"{type(exc).__name__}: {first_line}"
            warnings.warn(
                f"mace_kernels.{op}: the Triton kernel failed ({_TRITON_FAILURES[op]}); "
                f"using the torch implementation of {op} from now on",
                TritonFallbackWarning,
                stacklevel=3,
            )
            return reference(*args, **kwargs)

    run.__name__ = getattr(kernel, "__name__", "kernel")
    return run


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, else float32 (also for fp16/bf16 inputs)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
