"""Image -> L2-normalised embedding, in batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from fashionlens.data.transforms import Preprocess
from fashionlens.models.backbones import LITE0_ALIASES, LITE0_TIMM_NAME, create_backbone


class Embedder:
    """A frozen model with its preprocessing: images in, unit-length float32 vectors out."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, name: str, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.name = name
        self.device = torch.device(device)
        with torch.inference_mode():
            probe = torch.zeros(1, 3, preprocess.size, preprocess.size, device=self.device)
            self.dim = int(self.model(probe).shape[-1])

    @torch.inference_mode()
    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a preprocessed batch (N, 3, S, S)."""
        feats = self.model(batch.to(self.device, non_blocking=True))
        feats = torch.nn.functional.normalize(feats.float(), dim=1)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed decoded RGB images as one batch."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_tensors(torch.stack([self.preprocess(im) for im in images]))

    def describe(self) -> dict:
        """What an index records about the model that made its vectors."""
        return {"model": self.name, "dim": self.dim, "pooling": "gap", "normalise": "l2",
                **self.preprocess.describe()}


def build_embedder(name: str = "lite0", input_size: int | None = None, device: str = "cpu",
                   pretrained: bool = True) -> Embedder:
    """The embedder for ``name``: ``lite0`` (offline ImageNet EfficientNet-Lite0) or a timm name.

    ``input_size`` defaults to the model's own (224 for Lite0); 227 as in thesis A works too,
    any backbone here being fully convolutional with global pooling.
    """
    model, cfg = create_backbone(name, pretrained=pretrained)
    size = int(input_size or cfg["input_size"][-1])
    canonical = LITE0_TIMM_NAME + " (offline ImageNet weights)" if name.lower() in LITE0_ALIASES else name
    model = model.to(memory_format=torch.channels_last)
    return Embedder(model, Preprocess(size, tuple(cfg["mean"]), tuple(cfg["std"])), canonical, device)
