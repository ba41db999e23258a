"""The Stable Diffusion CLIP tokenizer, made offline from the BPE vocabulary file that the
open-clip-torch wheel ships (the exact tokenizer of SD 1.x and SDXL: names cut into the same
pieces). Used by the builtin models and the glyph world."""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer


def clip_bpe_path() -> Path:
    """The OpenAI CLIP BPE merges file shipped inside the open-clip-torch wheel.

    open_clip itself is not imported (it needs torchvision); only its data file is used.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the builtin models need the CLIP vocabulary from open-clip-torch: "
            "pip install --no-deps open-clip-torch"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise RuntimeError(f"open-clip-torch is installed but {path.name} is missing")
    return path


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in vocabulary order.

    Printable bytes stand for themselves and come first; the other bytes follow, mapped to
    code points from 256 up.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@lru_cache(maxsize=2)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49,408-entry vocabulary and its merges, from the BPE file."""
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a header; CLIP uses the first 49152 - 256 - 2 merges.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The Stable Diffusion CLIP tokenizer (SDXL's second tokenizer pads with '!')."""
    vocab, merges = clip_vocab_and_merges()
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=77, pad_token=pad_token)
