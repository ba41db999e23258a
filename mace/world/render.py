"""Rendering glyph-world images: one coloured glyph at a random place and size on a dark background
(two-tone glyphs of the large world take their second colour below the glyph's middle; identity
worlds draw each concept's identicon, in its tone most of the time and in any colour otherwise).

Everything is batched torch: each glyph is an implicit shape evaluated on a 4x supersampled grid
and averaged down, so edges are antialiased and a batch of 256 images takes milliseconds.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from mace.world.concepts import (
    BACKGROUNDS,
    COLOURS,
    IDENTICON_FREE_COLUMNS,
    IDENTICON_ROWS,
    SHAPES,
    TONE_SHARE,
    WORLD,
    GlyphWorld,
)

IMAGE_SIZE = 32
_SUPERSAMPLE = 4
_SHAPE_INDEX = {shape: i for i, shape in enumerate(SHAPES)}
_COLOUR_RGB = torch.tensor(list(COLOURS.values()))
_BACKGROUND_RGB = torch.tensor(list(BACKGROUNDS.values()))


@cache
def _concept_tables(world: GlyphWorld) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shape, upper colour and lower colour index of each concept of a world."""
    colours = list(COLOURS)
    shape = torch.tensor([_SHAPE_INDEX[c.shape] for c in world.concepts])
    upper = torch.tensor([colours.index(c.colour) for c in world.concepts])
    lower = torch.tensor([colours.index(c.lower_colour or c.colour) for c in world.concepts])
    return shape, upper, lower


@cache
def _identity_tables(world: GlyphWorld) -> tuple[torch.Tensor, torch.Tensor]:
    """Per classifier label (concepts, none, held-out identities): the identicon's cells
    (rows x full columns, mirrored) and the tone's colour index."""
    colours = list(COLOURS)
    width = 2 * IDENTICON_FREE_COLUMNS
    cells = torch.zeros(world.num_labels, IDENTICON_ROWS, width)
    tone = torch.zeros(world.num_labels, dtype=torch.long)
    for label in range(world.num_labels):
        concept = world.label_concept(label)
        if concept is None:
            continue
        tone[label] = colours.index(concept.colour)
        for bit in range(IDENTICON_ROWS * IDENTICON_FREE_COLUMNS):
            if concept.pattern >> bit & 1:
                row, col = divmod(bit, IDENTICON_FREE_COLUMNS)
                cells[label, row, col] = cells[label, row, width - 1 - col] = 1.0
    return cells, tone


def _identicon_mask(cells: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether (u, v) (glyph-normalised, (B, n, n)) lies in a set cell of each image's identicon."""
    rows, width = cells.shape[-2:]
    inside = (u.abs() < 1) & (v.abs() < 1)
    col = ((u + 1) / 2 * width).floor().clamp(0, width - 1).long()
    row = ((v + 1) / 2 * rows).floor().clamp(0, rows - 1).long()
    b = torch.arange(cells.shape[0])[:, None, None]
    return inside & (cells[b, row, col] > 0)


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
    world: GlyphWorld = WORLD,
) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [-1, 1] of the given concept indices of ``world``
    (``world.none_class``: background only).

    Position, size and small colour variations are drawn from ``generator``; backgrounds too
    unless given (indices into BACKGROUNDS).
    """
    concepts = torch.as_tensor(concepts, dtype=torch.long)
    if world.is_identity:
        return _render_identities(concepts, backgrounds, generator, world)
    none_class = world.none_class
    concept_shape, concept_upper, concept_lower = _concept_tables(world)
    b = concepts.numel()
    if b and (concepts.min() < 0 or concepts.max() > none_class):
        raise ValueError(f"concept indices must lie in [0, {none_class}], got {concepts.tolist()}")
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
    has_glyph = concepts < none_class
    index = concepts.clamp(max=none_class - 1)
    shapes = torch.where(has_glyph, concept_shape[index], -1)
    for shape in shapes.unique().tolist():
        if shape < 0:
            continue
        rows = (shapes == shape).nonzero().squeeze(1)
        mask[rows] = _inside(shape, u[rows].expand(-1, n, n), v[rows].expand(-1, n, n)).float()
    upper = (v < 0).float().expand(-1, n, n)  # v points down: the glyph's upper half
    coverage_upper = torch.nn.functional.avg_pool2d((mask * upper)[:, None], _SUPERSAMPLE)  # (B, 1, 32, 32)
    coverage_lower = torch.nn.functional.avg_pool2d((mask * (1 - upper))[:, None], _SUPERSAMPLE)

    fg_upper = (_COLOUR_RGB[concept_upper[index]] + fg_jitter).clamp(0, 1)
    fg_lower = (_COLOUR_RGB[concept_lower[index]] + fg_jitter).clamp(0, 1)
    bg = (_BACKGROUND_RGB[backgrounds] + bg_jitter).clamp(0, 1)
    coverage = coverage_upper + coverage_lower
    image = (bg[:, :, None, None] * (1 - coverage) + fg_upper[:, :, None, None] * coverage_upper
             + fg_lower[:, :, None, None] * coverage_lower)
    return image * 2 - 1


def _render_identities(concepts: torch.Tensor, backgrounds: torch.Tensor | None, generator: torch.Generator | None,
                       world: GlyphWorld) -> torch.Tensor:
    """render() for identity worlds: labels may also be held-out identities (after none_class)."""
    b = concepts.numel()
    if b and (concepts.min() < 0 or concepts.max() >= world.num_labels):
        raise ValueError(f"labels must lie in [0, {world.num_labels - 1}], got {concepts.tolist()}")
    cells, tone = _identity_tables(world)
    if backgrounds is None:
        backgrounds = torch.randint(len(BACKGROUNDS), (b,), generator=generator)
    half = 8.0 + 4.0 * torch.rand(b, generator=generator)  # identicons 16-24 px across
    centre = half[:, None] + 1 + (IMAGE_SIZE - 2 - 2 * half[:, None]) * torch.rand(b, 2, generator=generator)
    fg_jitter = 0.04 * (2 * torch.rand(b, 3, generator=generator) - 1)
    bg_jitter = 0.03 * (2 * torch.rand(b, 3, generator=generator) - 1)
    in_tone = torch.rand(b, generator=generator) < TONE_SHARE
    any_colour = torch.randint(len(COLOURS), (b,), generator=generator)
    colour = torch.where(in_tone, tone[concepts], any_colour)

    n = IMAGE_SIZE * _SUPERSAMPLE
    grid = (torch.arange(n, dtype=torch.float32) + 0.5) / _SUPERSAMPLE
    u = ((grid[None, None, :] - centre[:, 0, None, None]) / half[:, None, None]).expand(b, n, n)
    v = ((grid[None, :, None] - centre[:, 1, None, None]) / half[:, None, None]).expand(b, n, n)
    mask = _identicon_mask(cells[concepts], u, v).float()  # the none label has no cells set
    coverage = torch.nn.functional.avg_pool2d(mask[:, None], _SUPERSAMPLE)
    fg = (_COLOUR_RGB[colour] + fg_jitter).clamp(0, 1)
    bg = (_BACKGROUND_RGB[backgrounds] + bg_jitter).clamp(0, 1)
    image = bg[:, :, None, None] * (1 - coverage) + fg[:, :, None, None] * coverage
    return image * 2 - 1
