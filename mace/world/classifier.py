"""A small CNN that names the concept in a glyph-world image (or says there is none).

It is the instrument of the evaluation: trained on rendered images only, it is applied to the
images a diffusion model generates. Its penultimate features also serve the distribution-shift
score (a Frechet distance, like FID with this network instead of Inception).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mace.world.concepts import BACKGROUNDS, NUM_CONCEPTS


class GlyphClassifier(nn.Module):
    """Concept logits (one class per concept of its world, plus a last one for "no concept") and background logits."""

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = NUM_CONCEPTS + 1,
                 num_backgrounds: int = len(BACKGROUNDS)):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes, "num_backgrounds": num_backgrounds}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU())

        w = width
        self.features = nn.Sequential(
            block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, feature_dim), nn.SiLU(),
        )
        self.concept_head = nn.Linear(feature_dim, num_classes)
        self.background_head = nn.Linear(feature_dim, num_backgrounds)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(concept logits, background logits, features) of images in [-1, 1], (B, 3, 32, 32)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (32, 32):
            images = nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        features = self.features(images)
        return self.concept_head(features), self.background_head(features), features

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted concept index (the world's ``none_class`` = no concept) and features, in eval mode."""
        was_training = self.training
        self.eval()
        labels, feats = [], []
        for chunk in images.split(batch_size):
            logits, _, f = self(chunk.float())
            labels.append(logits.argmax(-1))
            feats.append(f)
        self.train(was_training)
        return torch.cat(labels), torch.cat(feats)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2))
        state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, directory / "model.safetensors")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GlyphClassifier:
        directory = Path(directory)
        if not (directory / "model.safetensors").exists():
            raise FileNotFoundError(f"no classifier weights in {directory}")
        model = cls(**json.loads((directory / "config.json").read_text()))
        state = load_file(directory / "model.safetensors")
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return model.eval()
