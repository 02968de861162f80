"""Image transforms. Evaluation-time only here; training augmentations are in :mod:`.augment`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Letterbox:
    """Where a photo of ``width`` x ``height`` lies in the ``size`` x ``size`` letterbox, and the
    way back from the letterboxed model input to the photo's own pixels."""

    width: int
    height: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.width, self.height)

    @property
    def inner(self) -> tuple[int, int]:
        """(width, height) of the resized photo inside the letterbox."""
        return max(1, round(self.width * self.scale)), max(1, round(self.height * self.scale))

    @property
    def offset(self) -> tuple[int, int]:
        """(left, top) padding: the resized photo is centred."""
        nw, nh = self.inner
        return (self.size - nw) // 2, (self.size - nh) // 2

    def box_to_photo(self, box: Sequence[int]) -> tuple[int, int, int, int]:
        """A [x, y, w, h] box in input pixels -> the photo's pixels (clipped to the photo)."""
        left, top = self.offset
        x1 = min(max((box[0] - left) / self.scale, 0), self.width - 1)
        y1 = min(max((box[1] - top) / self.scale, 0), self.height - 1)
        x2 = min(max((box[0] + box[2] - left) / self.scale, x1 + 1), self.width)
        y2 = min(max((box[1] + box[3] - top) / self.scale, y1 + 1), self.height)
        return int(x1), int(y1), max(1, round(x2 - int(x1))), max(1, round(y2 - int(y1)))

    def map_to_photo(self, cam: np.ndarray) -> np.ndarray:
        """A (size, size) map of the input -> (height, width) over the photo (bilinear)."""
        left, top = self.offset
        nw, nh = self.inner
        inner = np.ascontiguousarray(cam[top:top + nh, left:left + nw], dtype=np.float32)
        return np.asarray(Image.fromarray(inner).resize((self.width, self.height), Image.BILINEAR))


def letterbox(img: Image.Image, size: int, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Resize so the long side is ``size`` and pad the short side to a ``size`` x ``size`` square.

    As the retrieval method does (docs/METHODS.md): the garment keeps its aspect ratio and the
    padding is zero (black), centred (:class:`Letterbox` says where).
    """
    geometry = Letterbox(img.width, img.height, size)
    resized = img.resize(geometry.inner, Image.BILINEAR, reducing_gap=2.0 if geometry.scale < 0.5 else None)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(resized, geometry.offset)
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
