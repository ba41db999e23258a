"""Where benchmark results go: JSON files under benchmarks/results/ (written atomically with
mace.utils.atomic.write_json_atomically), and the command line a results file records."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that ran ``script`` (a benchmark's ``__file__``) with ``argv`` (None: this
    process's arguments), as a results file records it: run from the repository root."""
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])
