"""The attacks' settings and budgets: what a text-only or a soft-prompt attack may spend."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mace.stages.prompts import OBJECT_TEMPLATES

ATTACKS = ("text", "soft")


# --------------------------------------------------------------------------------------------
# Settings


def check_budget(value, name: str = "budget") -> int:
    """A budget as a non-negative int; anything else is a ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"\d+", text):
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        return int(text)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _positive(value, name: str, kind=int):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (kind is int and int(value) != value):
        raise ValueError(f"{name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return kind(value)


@dataclass(frozen=True)
class TextAttack:
    """The text-only attack (Ring-A-Bell's concept direction with a discrete token search).

    ``budget`` counts prompts the search runs through the text encoder (a gradient pass of the
    coordinate search counts as one). ``search``: ``genetic`` (Ring-A-Bell's: a population of
    ``batch`` prompts, ``elite`` kept, uniform crossover, ``mutation`` rate per word) or
    ``coordinate`` (each step ranks replacement words by the gradient of the distance through
    the text encoder, tries ``batch`` single-word swaps and keeps the best; it reaches smaller
    distances, which on the glyph world did not bring more concepts back). The setup, 2 x
    len(templates) + 1 prompts for the direction and the target, is not part of the budget.
    """

    budget: int = 320
    num_tokens: int = 8
    eta: float = 3.0
    search: str = "genetic"
    batch: int = 32
    top_k: int = 64
    mutation: float = 0.25
    elite: int = 4
    neutral: str = ""
    templates: tuple[str, ...] = tuple(OBJECT_TEMPLATES)

    name = "text"
    unit = "text-encoder prompt evaluations"

    def __post_init__(self):
        object.__setattr__(self, "budget", check_budget(self.budget, "text attack budget"))
        for key in ("num_tokens", "batch", "top_k"):
            _positive(getattr(self, key), f"text attack {key}")
        _positive(self.eta, "text attack eta", float)
        if self.search not in ("coordinate", "genetic"):
            raise ValueError(f"text attack search must be 'coordinate' or 'genetic', got {self.search!r}")
        if not 0 <= self.mutation <= 1:
            raise ValueError(f"text attack mutation must lie in [0, 1], got {self.mutation!r}")
        if not isinstance(self.elite, int) or self.elite < 0 or (self.search == "genetic" and self.elite >= self.batch):
            raise ValueError(f"text attack elite must be an integer in [0, batch), got {self.elite!r}")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError("text attack templates must be a non-empty list of strings with a {} for the concept")
        object.__setattr__(self, "templates", tuple(self.templates))


@dataclass(frozen=True)
class SoftPromptAttack:
    """The soft-prompt attack (UnlearnDiffAtk's denoising objective on continuous embeddings).

    ``budget`` counts gradient steps: one UNet forward and backward pass on ``batch_size``
    noisy latents of the concept's target images each. Two more forward passes on a fixed
    probe batch (``probe_size`` latents, fixed noise and timesteps) measure the loss before and
    after; they are not part of the budget.
    """

    budget: int = 40
    num_tokens: int = 5
    lr: float = 0.01
    batch_size: int = 4
    target_images: int = 8
    probe_size: int = 8

    name = "soft"
    unit = "gradient steps"

    def __post_init__(self):
        object.__setattr__(self, "budget", check_budget(self.budget, "soft attack budget"))
        for key in ("num_tokens", "batch_size", "target_images", "probe_size"):
            _positive(getattr(self, key), f"soft attack {key}")
        _positive(self.lr, "soft attack lr", float)


Attack = TextAttack | SoftPromptAttack


def make_attacks(names: Sequence[str] | str, *, text_budget=None, soft_budget=None) -> list[Attack]:
    """Attack settings from names ("text", "soft"; a comma-separated string works) and budgets."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no attack named; choose from {', '.join(ATTACKS)}")
    out: list[Attack] = []
    for n in dict.fromkeys(names):
        if n == "text":
            out.append(TextAttack() if text_budget is None else TextAttack(budget=check_budget(text_budget, "--text-budget")))
        elif n == "soft":
            out.append(SoftPromptAttack() if soft_budget is None else SoftPromptAttack(budget=check_budget(soft_budget, "--soft-budget")))
        else:
            raise ValueError(f"unknown attack {n!r}; choose from {', '.join(ATTACKS)}")
    return out
