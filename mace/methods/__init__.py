"""The erasure methods `mace erase` runs: MACE, refinement only, and the closed-form baselines
UCE, SPEED and RECE, in one registry (registry.py)."""

from mace.methods.registry import METHODS, ErasureMethod, run_erasure

__all__ = ["METHODS", "ErasureMethod", "run_erasure"]
