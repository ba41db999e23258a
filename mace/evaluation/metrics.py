"""Image metrics for erasures on real models: CLIP score, CLIP zero-shot accuracy and FID.

The CLIP model is the user's (a local folder or hub id of a transformers CLIPModel with its
processor); nothing is downloaded unless the user names a hub id and is online. CLIP score and
FID are computed by torchmetrics. FID's features are CLIP image embeddings by default
("CLIP-FID", which needs no second network) or Inception-v3 when the user gives the weights file
torch-fidelity uses (``inception_weights``; needs torch-fidelity installed).

Images are tensors in [-1, 1], (N, 3, H, W), as :func:`mace.world.evaluate.generate_images`
returns them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mace.utils.names import is_hub_id


@dataclass
class Clip:
    """A transformers CLIP model and its processor."""

    model: nn.Module
    processor: object


def load_clip(name_or_path: str | os.PathLike) -> Clip:
    """Load a CLIPModel and CLIPProcessor (slow, PIL-based image processing; no torchvision)."""
    from transformers import CLIPModel, CLIPProcessor

    path = str(name_or_path)
    if os.sep in path and not os.path.exists(path) and not is_hub_id(path):
        raise FileNotFoundError(f"CLIP model folder {path} does not exist")
    model = CLIPModel.from_pretrained(path, use_safetensors=True).eval()  # a pickled checkpoint is never loaded
    processor = CLIPProcessor.from_pretrained(path, backend="pil")
    return Clip(model, processor)


def _embedding(output) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features; 4.x returned the tensor."""
    return getattr(output, "pooler_output", output)


class _TensorFeatures(nn.Module):
    """The CLIP model with get_*_features returning tensors, as torchmetrics expects."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_text_features(*args, **kwargs))


def _uint8(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: Sequence[str], clip: Clip) -> float:
    """Mean CLIP score (100 x cosine of image and prompt embeddings, floored at 0) by torchmetrics."""
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    model = _TensorFeatures(clip.model)
    return float(tm_clip_score(list(_uint8(images)), list(prompts), model_name_or_path=lambda: (model, clip.processor)))


@torch.no_grad()
def clip_image_features(images: torch.Tensor, clip: Clip, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised CLIP image embeddings (N, projection_dim)."""
    feats = []
    for chunk in _uint8(images).split(batch_size):
        pixels = clip.processor(images=list(chunk), return_tensors="pt")["pixel_values"]
        f = _embedding(clip.model.get_image_features(pixel_values=pixels))
        feats.append(nn.functional.normalize(f.float(), dim=-1))
    return torch.cat(feats)


@torch.no_grad()
def clip_zero_shot_accuracy(images: torch.Tensor, labels: Sequence[int], classnames: Sequence[str], clip: Clip,
                            template: str = "a photo of {}") -> float:
    """Share of images whose most similar class prompt (``template`` around each class name) is
    their label: the paper's CLIP accuracy of an erased or kept concept."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not classnames:
        raise ValueError("zero-shot accuracy needs at least one class name")
    text = clip.processor(text=[template.format(c) for c in classnames], return_tensors="pt", padding=True)
    t = clip.model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    t = nn.functional.normalize(_embedding(t).float(), dim=-1)
    predicted = (clip_image_features(images, clip) @ t.T).argmax(-1)
    return float((predicted == torch.as_tensor(list(labels))).float().mean())


class _ClipFeatures(nn.Module):
    def __init__(self, clip: Clip):
        super().__init__()
        self.clip = clip
        self.num_features = int(clip.model.config.projection_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # uint8 in [0, 255] from torchmetrics
        return clip_image_features(images.float() / 127.5 - 1, self.clip).double()


def fid(real: torch.Tensor, generated: torch.Tensor, *, clip: Clip | None = None, inception_weights: str | None = None) -> float:
    """Frechet distance between two image sets by torchmetrics: CLIP features, or Inception-v3
    from ``inception_weights`` (torch-fidelity's weights file; needs torch-fidelity)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(generated) < 2:
        raise ValueError("FID needs at least two images in each set")
    if inception_weights is not None:
        if not os.path.exists(inception_weights):
            raise FileNotFoundError(f"Inception weights {inception_weights} do not exist")
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=inception_weights)
    elif clip is not None:
        metric = FrechetInceptionDistance(feature=_ClipFeatures(clip))
    else:
        raise ValueError("fid needs a CLIP model (clip=) or Inception weights (inception_weights=)")
    metric.update(_uint8(real), real=True)
    metric.update(_uint8(generated), real=False)
    return max(0.0, float(metric.compute()))
