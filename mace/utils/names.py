"""Concept names are data, never paths.

A concept's image, mask and LoRA folders are named after it, as the original MACE tools name
them (``<input_data_dir>/<concept>``, ``<input_data_dir>/<concept> mask``,
``<output_dir>/lora/<concept-with-dashes>``), so that data they prepared still reads. A name
that cannot be one folder name inside its parent (a separator, ``..``, an absolute path, a NUL
or other control character, a leading dot, more bytes than a file name may hold with the
`` mask`` suffix) gets a safe folder name instead: its harmless characters and a digest of the
whole name, so two different names never share a folder.

Two concepts that the original's normalisation (``-`` read as a space) and the text encoder's
(CLIP lower-cases and collapses white space) make the same prompt are the same concept: on a
case-insensitive file system they would also share a folder. ``duplicate_key`` gives that
identity.

A model name that is not a local folder is read as a Hugging Face hub id only when it can be one
(``is_hub_id``); anything else that looks like a path is a missing folder.
"""

from __future__ import annotations

import hashlib
import re

MASK_SUFFIX = " mask"
NAME_MAX = 255  # bytes of one file name on Linux, macOS and Windows file systems
_MAX_BYTES = NAME_MAX - len(MASK_SUFFIX.encode()) - 1  # the longest name kept as a folder name
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")
_KEPT_BYTES = 80  # of an unsafe name's readable part


def is_hub_id(name: str) -> bool:
    """Whether ``name`` can be a hub id ("owner/model"): two non-empty parts, not a relative,
    absolute or home path. Loaders try the hub (or its local cache) for such a name when no
    folder of that name exists."""
    parts = str(name).split("/")
    return len(parts) == 2 and all(parts) and not str(name).startswith((".", "/", "~"))


def is_plain_name(name: str) -> bool:
    """Whether ``name`` can be a folder name as it is: one path component inside its parent."""
    return (bool(name) and name == name.strip() and not name.startswith(".") and not _UNSAFE.search(name)
            and len(name.encode("utf-8", "surrogatepass")) <= _MAX_BYTES)


def folder_name(name: str) -> str:
    """The folder name of a concept: the name itself when it is plain (the original tools'
    layout), else its harmless characters followed by ``~`` and 12 hex digits of its SHA-256.

    The result never holds a separator or a control character, never starts with a dot and,
    with `` mask`` appended, fits a file system's 255 bytes."""
    if is_plain_name(name):
        return name
    raw = name.encode("utf-8", "surrogatepass")
    tag = hashlib.sha256(raw).hexdigest()[:12]
    readable = _UNSAFE.sub("_", name).strip().lstrip(". _").strip()
    kept = readable.encode("utf-8", "surrogatepass")[:_KEPT_BYTES].decode("utf-8", "ignore").strip()
    return f"{kept}~{tag}" if kept else f"concept~{tag}"


def duplicate_key(name: str) -> str:
    """What makes two concept names the same concept: '-' read as a space (the original's
    normalisation), case and runs of white space ignored (the text encoder's)."""
    return " ".join(name.replace("-", " ").lower().split())


def control_characters(name: str) -> str:
    """The control characters (NUL, newline, ...) in ``name``, as Python writes them; '' when none."""
    return "".join(sorted({repr(c)[1:-1] for c in name if c < " " or c == "\x7f"}))


def merge_duplicates(names: list[str], kinds: list[str], mappings: list[str]) -> tuple[list[int], list[list[str]]]:
    """(indices of the concepts kept, groups of names merged into the first of their group) for
    concepts that ``duplicate_key`` makes the same. Duplicates of another type or mapping cannot
    be merged: ValueError naming them."""
    first: dict[str, int] = {}
    groups: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        key = duplicate_key(name)
        if key not in first:
            first[key] = i
            continue
        j = first[key]
        if (kinds[i], mappings[i]) != (kinds[j], mappings[j]):
            raise ValueError(f"multi_concept: {names[j]!r} and {name!r} are the same concept (case, '-' and spaces "
                             f"aside) but have different types or mappings ({kinds[j]} -> {mappings[j]!r}, "
                             f"{kinds[i]} -> {mappings[i]!r}); keep one of them")
        groups.setdefault(j, [names[j]]).append(name)
    return sorted(first.values()), [groups[j] for j in sorted(groups)]
