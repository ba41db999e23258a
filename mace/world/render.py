"""Rendering glyph-world images: one coloured glyph at a random place and size on a dark background.

Everything is batched torch: each glyph is an implicit shape evaluated on a 4x supersampled grid
and averaged down, so edges are antialiased and a batch of 256 images takes milliseconds.
"""

from __future__ import annotations

import math

import torch

from .concepts import BACKGROUNDS, COLOURS, CONCEPTS, NONE_CLASS, SHAPES

IMAGE_SIZE = 32
_SUPERSAMPLE = 4
_SHAPE_INDEX = {shape: i for i, shape in enumerate(SHAPES)}
_COLOUR_RGB = torch.tensor(list(COLOURS.values()))
_BACKGROUND_RGB = torch.tensor(list(BACKGROUNDS.values()))
_CONCEPT_SHAPE = torch.tensor([_SHAPE_INDEX[c.shape] for c in CONCEPTS])
_CONCEPT_COLOUR = torch.tensor([list(COLOURS).index(c.colour) for c in CONCEPTS])


def _inside(shape: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether (u, v) (glyph-normalised, |u|, |v| <= 1, v pointing down) lies inside the shape."""
    au, av = u.abs(), v.abs()
    r2 = u * u + v * v
    name = SHAPES[shape]
    if name == "disc":
        return r2 <= 1.0
    if name == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if name == "square":
        return torch.maximum(au, av) <= 0.85
    if name == "frame":
        m = torch.maximum(au, av)
        return (m <= 0.9) & (m >= 0.5)
    if name == "triangle":
        return (v <= 0.8) & (v >= -0.95) & (au <= (v + 0.95) / 1.75 * 0.95)
    if name == "diamond":
        return au + av <= 1.0
    if name == "plus":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if name == "cross":
        p, q = (u + v).abs() / math.sqrt(2), (u - v).abs() / math.sqrt(2)
        return ((p <= 0.24) & (q <= 1.0)) | ((q <= 0.24) & (p <= 1.0))
    if name == "star":
        theta = torch.atan2(v, u)
        spikes = ((1 + torch.cos(5 * (theta + math.pi / 2))) / 2) ** 2
        return r2.sqrt() <= 0.38 + 0.62 * spikes
    if name == "hexagon":
        return torch.maximum(av, au * 0.866 + av * 0.5) <= 0.9
    if name == "stripes":
        return (au <= 0.9) & (v >= -0.9) & (v <= 0.6) & (torch.remainder(v + 0.9, 0.6) < 0.3)
    if name == "crescent":
        return (r2 <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.75**2)
    raise ValueError(f"unknown shape {name!r}")


def render(
    concepts: torch.Tensor,
    *,
    backgrounds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [-1, 1] of the given concept indices (NONE_CLASS: background only).

    Position, size and small colour variations are drawn from ``generator``; backgrounds too
    unless given (indices into BACKGROUNDS).
    """
    concepts = torch.as_tensor(concepts, dtype=torch.long)
    b = concepts.numel()
    if b and (concepts.min() < 0 or concepts.max() > NONE_CLASS):
        raise ValueError(f"concept indices must lie in [0, {NONE_CLASS}], got {concepts.tolist()}")
    if backgrounds is None:
        backgrounds = torch.randint(len(BACKGROUNDS), (b,), generator=generator)
    half = 6.0 + 5.0 * torch.rand(b, generator=generator)  # glyphs 12-22 px across
    centre = half[:, None] + 1 + (IMAGE_SIZE - 2 - 2 * half[:, None]) * torch.rand(b, 2, generator=generator)
    fg_jitter = 0.04 * (2 * torch.rand(b, 3, generator=generator) - 1)
    bg_jitter = 0.03 * (2 * torch.rand(b, 3, generator=generator) - 1)

    n = IMAGE_SIZE * _SUPERSAMPLE
    grid = (torch.arange(n, dtype=torch.float32) + 0.5) / _SUPERSAMPLE
    u = (grid[None, None, :] - centre[:, 0, None, None]) / half[:, None, None]
    v = (grid[None, :, None] - centre[:, 1, None, None]) / half[:, None, None]
    mask = torch.zeros(b, n, n)
    has_glyph = concepts < NONE_CLASS
    shapes = torch.where(has_glyph, _CONCEPT_SHAPE[concepts.clamp(max=NONE_CLASS - 1)], -1)
    for shape in shapes.unique().tolist():
        if shape < 0:
            continue
        rows = (shapes == shape).nonzero().squeeze(1)
        mask[rows] = _inside(shape, u[rows].expand(-1, n, n), v[rows].expand(-1, n, n)).float()
    coverage = torch.nn.functional.avg_pool2d(mask[:, None], _SUPERSAMPLE)  # (B, 1, 32, 32)

    fg = (_COLOUR_RGB[_CONCEPT_COLOUR[concepts.clamp(max=NONE_CLASS - 1)]] + fg_jitter).clamp(0, 1)
    bg = (_BACKGROUND_RGB[backgrounds] + bg_jitter).clamp(0, 1)
    image = bg[:, :, None, None] * (1 - coverage) + fg[:, :, None, None] * coverage
    return image * 2 - 1
