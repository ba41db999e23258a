"""Writing benchmark results: JSON files written atomically under benchmarks/results/."""

from __future__ import annotations

from pathlib import Path

from mace.atomic import write_json_atomically

RESULTS = Path(__file__).parent / "results"


def write_json(path: Path, payload: dict) -> Path:
    """Write payload as JSON to path (a temporary file renamed over it)."""
    return write_json_atomically(path, payload)
