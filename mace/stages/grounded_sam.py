"""Concept masks from Grounding DINO boxes segmented by SAM (``mask_method: grounded_sam``).

For each image, Grounding DINO finds the boxes of a text query ("person."), SAM segments every
box, and the image's mask is the union of its boxes' masks (L mode, 255 inside, image size).
As in the original tools, an image where nothing is detected gets a full mask (every pixel is
trained on, as without a mask), and an image whose boxes SAM segments into nothing keeps that
empty mask (the attention loss then takes nothing from it). Both kinds are counted
(``fallbacks``, ``empty``) and warned about, so a wrong query or threshold does not go unnoticed.

Both models see the image through their transformers processors (resized and normalised as
they were trained), as the original's Hugging Face tools give them; its official-checkpoint
tools hand Grounding DINO the unnormalised [0, 1] image and SAM a brightened copy (see
docs/fidelity.md). Both models load from local folders or hub ids.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mace.utils.names import is_hub_id

_ARTICLES = ("a ", "an ", "the ")


def detection_query(text: str) -> str:
    """Grounding DINO's form of a phrase: lower case, no leading article, one final '.'.

    ``"a Person"`` -> ``"person."``.
    """
    query = " ".join(str(text).lower().split())
    for article in _ARTICLES:
        if query.startswith(article):
            query = query[len(article):]
            break
    query = query.rstrip(". ")
    if not query:
        raise ValueError(f"cannot detect an empty phrase (got {text!r})")
    return query + "."


def union_mask(masks: torch.Tensor, size: tuple[int, int]) -> Image.Image | None:
    """The union of boolean masks (n, H, W) as an L image (255 inside); None if it is empty.

    ``size`` is the image's (width, height); the masks must already have that size.
    """
    width, height = size
    if masks.ndim != 3 or tuple(masks.shape[1:]) != (height, width):
        raise ValueError(f"expected masks of shape (n, {height}, {width}), got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return None
    union = masks.bool().any(0)
    if not bool(union.any()):
        return None
    return Image.fromarray(union.cpu().numpy().astype(np.uint8) * 255, mode="L")


def _full_mask(size: tuple[int, int]) -> Image.Image:
    return Image.new("L", size, 255)


def _check_source(name: str | os.PathLike, key: str) -> str:
    """A local model folder, or something that can only be a hub id; otherwise FileNotFoundError."""
    name = str(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{key}: {path} has no config.json; expected a folder written by save_pretrained")
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"{key}: {path} is a file; expected a model folder or a hub id")
    if not is_hub_id(name):
        raise FileNotFoundError(f"{key}: model folder {name} does not exist")
    return name


def _load(cls, name: str, key: str, **kwargs):
    try:
        return cls.from_pretrained(name, **kwargs)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise FileNotFoundError(
            f"{key}: cannot load {name!r} ({cls.__name__}) from a local folder or the Hugging Face cache: {error}"
        ) from error


class GroundedSamMasker:
    """Callable ``(images, text) -> masks``: Grounding DINO boxes for ``text``, segmented by SAM.

    ``fallbacks`` counts the images (over all calls) that got a full mask because nothing was
    detected; ``last_fallbacks`` lists their indices in the latest call. ``empty`` and
    ``last_empty`` do the same for images whose boxes SAM segmented into an empty mask.
    """

    def __init__(self, detector, detector_processor, sam, sam_processor, *, box_threshold: float = 0.3,
                 text_threshold: float = 0.25, batch_size: int = 4):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.detector = detector.eval()
        self.detector_processor = detector_processor
        self.sam = sam.eval()
        self.sam_processor = sam_processor
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.batch_size = batch_size
        self.detector_device = next(detector.parameters()).device
        self.sam_device = next(sam.parameters()).device
        self.sam_dtype = next(sam.parameters()).dtype
        self.fallbacks = 0
        self.empty = 0
        self.images_seen = 0
        self.last_fallbacks: list[int] = []
        self.last_empty: list[int] = []

    @classmethod
    def from_pretrained(cls, grounding_model: str | os.PathLike, sam_model: str | os.PathLike, *, box_threshold: float = 0.3,
                        text_threshold: float = 0.25, device: str | torch.device | None = None,
                        batch_size: int = 4) -> GroundedSamMasker:
        """Load Grounding DINO and SAM (folders or hub ids); ``device`` defaults to CUDA when present."""
        grounding_model = _check_source(grounding_model, "grounding_model")
        sam_model = _check_source(sam_model, "sam_model")
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel, SamProcessor

        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        detector_processor = _load(AutoProcessor, grounding_model, "grounding_model")
        # Weights from safetensors only (a pickled checkpoint is never loaded), no remote code.
        detector = _load(AutoModelForZeroShotObjectDetection, grounding_model, "grounding_model",
                         use_safetensors=True, trust_remote_code=False).to(device)
        sam_processor = _load(SamProcessor, sam_model, "sam_model")
        sam = _load(SamModel, sam_model, "sam_model", use_safetensors=True).to(device)
        return cls(detector, detector_processor, sam, sam_processor, box_threshold=box_threshold,
                   text_threshold=text_threshold, batch_size=batch_size)

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image], text: str) -> list[torch.Tensor]:
        """Boxes (n_i, 4) per image, (x0, y0, x1, y1) in pixels, of ``text`` above the thresholds."""
        query = detection_query(text)
        inputs = self.detector_processor(images=list(images), text=[query] * len(images), return_tensors="pt", padding=True)
        inputs = inputs.to(self.detector_device)
        outputs = self.detector(**inputs)
        sizes = [(im.height, im.width) for im in images]
        results = self.detector_processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold, target_sizes=sizes)
        boxes = []
        for result, (height, width) in zip(results, sizes, strict=True):
            b = result["boxes"].detach().float().cpu().reshape(-1, 4)
            b[:, 0::2] = b[:, 0::2].clamp(0, width)
            b[:, 1::2] = b[:, 1::2].clamp(0, height)
            boxes.append(b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])])
        return boxes

    @torch.no_grad()
    def segment(self, images: Sequence[Image.Image], boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """SAM masks (n_i, H, W) bool, one per box, at each image's size; images without boxes get (0, H, W)."""
        out = [torch.zeros(0, im.height, im.width, dtype=torch.bool) for im in images]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        if not todo:
            return out
        most = max(len(boxes[i]) for i in todo)
        # One batch needs the same number of boxes per image: repeat an image's own boxes, which
        # leaves the union unchanged; the repeats are dropped below.
        prompts = [[boxes[i][j % len(boxes[i])].tolist() for j in range(most)] for i in todo]
        inputs = self.sam_processor(images=[images[i] for i in todo], input_boxes=prompts, return_tensors="pt")
        sizes, reshaped = inputs.pop("original_sizes"), inputs.pop("reshaped_input_sizes")
        inputs = {k: v.to(self.sam_device, self.sam_dtype) if v.is_floating_point() else v.to(self.sam_device)
                  for k, v in inputs.items()}
        outputs = self.sam(**inputs, multimask_output=False)
        masks = self.sam_processor.post_process_masks(outputs.pred_masks.float().cpu(), sizes, reshaped)
        for k, i in enumerate(todo):
            out[i] = masks[k][: len(boxes[i])].any(1)  # (boxes, masks per box, H, W) -> (boxes, H, W)
        return out

    def __call__(self, images: Sequence[Image.Image], text: str) -> list[Image.Image]:
        """One L mask per image (255 inside): the union of the SAM masks of ``text``'s boxes;
        the whole image where nothing is detected, nothing where SAM segments nothing."""
        images = [im.convert("RGB") for im in images]
        result, missed, empty = [], [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            for k, (image, masks) in enumerate(zip(chunk, self.segment(chunk, self.detect(chunk, text)), strict=True)):
                mask = union_mask(masks, image.size)
                if mask is None and masks.shape[0] == 0:
                    missed.append(start + k)
                    mask = _full_mask(image.size)
                elif mask is None:
                    empty.append(start + k)
                    mask = Image.new("L", image.size, 0)
                result.append(mask)
        self.images_seen += len(images)
        self.fallbacks += len(missed)
        self.empty += len(empty)
        self.last_fallbacks, self.last_empty = missed, empty
        query = detection_query(text)
        if missed:
            warnings.warn(f"grounded_sam: nothing found for {query!r} in {len(missed)} of {len(images)} "
                          "image(s); their masks cover the whole image", stacklevel=2)
        if empty:
            warnings.warn(f"grounded_sam: {query!r} detected but SAM segmented nothing in {len(empty)} of "
                          f"{len(images)} image(s); their masks are empty (no loss from them, as the original)",
                          stacklevel=2)
        return result
