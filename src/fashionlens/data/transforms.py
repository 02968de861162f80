"""Image transforms. Evaluation-time only here; training augmentations come with training."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def letterbox(img: Image.Image, size: int, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Resize so the long side is ``size`` and pad the short side to a ``size`` x ``size`` square.

    As in thesis A: the garment keeps its aspect ratio and the padding is zero (black), centred.
    """
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = img.resize((nw, nh), Image.BILINEAR, reducing_gap=2.0 if scale < 0.5 else None)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas


class Preprocess:
    """Letterbox to ``size`` and normalise with ``mean``/``std`` into a CHW float tensor."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.size = size
        self.mean = np.asarray(mean, dtype=np.float32) * 255.0
        self.inv_std = 1.0 / (np.asarray(std, dtype=np.float32) * 255.0)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(letterbox(img, self.size), dtype=np.float32)
        arr = (arr - self.mean) * self.inv_std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def describe(self) -> dict:
        return {
            "letterbox": self.size,
            "mean": (self.mean / 255.0).round(4).tolist(),
            "std": (1.0 / self.inv_std / 255.0).round(4).tolist(),
        }
