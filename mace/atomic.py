"""Writing files atomically: a temporary file in the same folder renamed over the target."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomically(path: str | os.PathLike, payload: dict) -> Path:
    """Write payload as JSON (a temporary file renamed over the target: never half written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path
