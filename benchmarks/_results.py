"""Where benchmark results go: JSON files under benchmarks/results/ (written atomically with
mace.utils.atomic.write_json_atomically)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).parent / "results"
