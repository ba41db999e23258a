"""Writing files and folders atomically: everything is written to a temporary sibling and
renamed over the target, so a reader (or a rerun after a crash) sees the old version or the
new one, never half of one. Every writer of the package goes through ``atomic_path``."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    """The process's file-mode creation mask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``.

    Write a file (or, with ``directory=True``, fill a folder) at the yielded path. If the
    block raises, the temporary is removed and ``target`` is left as it was. With
    ``replace=False`` a ``target`` that appeared meanwhile (another process) is kept. An
    OSError on the way (a full disk, a read-only folder) names ``target``.
    """
    target = Path(target)
    with _naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent)
            os.close(fd)
            tmp = Path(name)
    try:
        with _naming(target):
            yield tmp
            if replace or not target.exists():
                _finish(tmp, target, directory)
    finally:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextmanager
def _naming(target: Path) -> Iterator[None]:
    """Re-raise an OSError that does not name ``target`` as one that does (same errno, so the
    same subclass: FileNotFoundError stays one)."""
    try:
        yield
    except OSError as err:
        if str(target) in str(err):
            raise
        message = f"cannot write {target}: {err.strerror or err or type(err).__name__}"
        raise (OSError(err.errno, message) if err.errno is not None else OSError(message)) from err


def _finish(tmp: Path, target: Path, directory: bool) -> None:
    """Move the written temporary over ``target``; a folder that fails to move in leaves the
    old ``target`` in place."""
    # mkstemp/mkdtemp create 0600/0700; give the result the modes a plain open() or mkdir()
    # would, so that a model written here is as readable as any other file of the user's.
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    if not directory:
        os.replace(tmp, target)
        return
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        old.rmdir()
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomically(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    return write_text_atomically(path, json.dumps(payload, indent=1, default=str) + "\n")


def save_image_atomically(image, path: str | os.PathLike, format: str = "PNG") -> Path:
    """Save a PIL image to ``path`` atomically (``format`` as PIL names it)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format=format)
    return Path(path)


def check_model_target(path: str | os.PathLike) -> Path:
    """``path`` when a model may be saved there: nothing there yet, an empty folder, or a
    diffusers model folder (a rerun replaces its own model). Saving swaps the whole folder, so a
    folder holding anything else (a user's project, a folder of several models) is an error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; a model is saved as a folder: choose another path")
    if path.is_dir() and not (path / "model_index.json").is_file() and any(path.iterdir()):
        raise FileExistsError(f"{path} holds files and is not a model folder (no model_index.json); saving a model "
                              "there would replace the whole folder: choose a new or empty folder")
    return path


def save_pipeline_atomically(pipe, path: str | os.PathLike) -> Path:
    """``save_pretrained`` into a temporary folder swapped in at the end: the old model survives a
    failure. Only a model folder (or nothing) is replaced (:func:`check_model_target`)."""
    check_model_target(path)
    with atomic_path(path, directory=True) as tmp:
        pipe.save_pretrained(tmp)
    return Path(path)
