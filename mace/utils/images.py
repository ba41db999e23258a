"""Images as the workflow reads them: listing a folder, opening a file with a clear error, and
converting to tensors. Every image a user gives goes through ``read_image``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageFileError(ValueError):
    """An image file that cannot be read; the message names the file."""


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The PNG/JPG files of ``folder`` in natural order (2.png before 10.png)."""
    files = [f for f in Path(folder).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: (len(p.stem), p.stem))


def read_image(path: str | os.PathLike, mode: str = "RGB", size: int | None = None,
               resample: int = Image.BICUBIC) -> Image.Image:
    """Open ``path`` as a ``mode`` image, resized to ``size`` x ``size`` when given."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            image = im.convert(mode)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:  # bomb: PIL's pixel cap
        raise ImageFileError(f"{path}: not a readable image ({err.__class__.__name__}: {err})") from None
    if size is not None:
        image = image.resize((size, size), resample)
    return image


def image_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) float tensor in [-1, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1


def mask_tensor(image: Image.Image) -> torch.Tensor:
    """An L-mode mask as a (1, H, W) float tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32).copy())[None] / 255
