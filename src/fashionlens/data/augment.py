"""Training augmentations of the retrieval method (docs/METHODS.md, retrieval 2), each applied with its own probability.

Where they act: on one CHW image tensor (float in [0, 1], or uint8) **after the letterbox and
before normalisation**. Reasons: ColorJitter on float tensors assumes [0, 1] and clamps to it
(it would corrupt normalised values); and 0 there is black, the colour of the letterbox
padding, so the corners uncovered by a rotation and the erased rectangle look like padding.
:class:`TrainPreprocess` chains letterbox -> [0, 1] tensor -> augment -> normalise and gives
the same tensor layout as :class:`fashionlens.data.transforms.Preprocess`.

Evaluation uses no augmentation: the evaluation/indexing path (``Preprocess``) never calls
anything here.

Order: horizontal flip (p 0.5; mirrored selfies) -> 180 deg rotation (p 0.1; clothes photographed
upside down) -> small rotation (+-10 deg, p 0.3) -> brightness/contrast (+-0.2, p 0.5) -> erasing
(p 0.5). Erasing comes last so that the rectangle stays axis-aligned and exactly 0.
All randomness is torch's global generator (``torch.manual_seed``; DataLoader workers seed it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torchvision.transforms import v2

from fashionlens.data.transforms import letterbox


class AugmentConfig(BaseModel):
    """Probabilities and ranges of the training augmentations (defaults: the retrieval method's)."""

    model_config = ConfigDict(extra="forbid")

    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    rot180: float = Field(0.1, ge=0, le=1, description="probability of a 180 degree rotation")
    rotate: float = Field(0.3, ge=0, le=1, description="probability of a small random rotation")
    rotate_degrees: float = Field(10.0, ge=0, le=180, description="small rotation: uniform in +-degrees")
    color: float = Field(0.5, ge=0, le=1, description="probability of a brightness/contrast change")
    brightness: float = Field(0.2, ge=0, le=1, description="brightness factor uniform in [1-b, 1+b]")
    contrast: float = Field(0.2, ge=0, le=1, description="contrast factor uniform in [1-c, 1+c]")
    erase: float = Field(0.5, ge=0, le=1, description="probability of erasing a rectangle")
    erase_min: float = Field(1 / 16, gt=0, le=1, description="erased side, smallest fraction of the image side")
    erase_max: float = Field(1 / 8, gt=0, le=1, description="erased side, largest fraction of the image side")
    erase_value: float = Field(0.0, description="fill value of the erased rectangle")
    crop: float = Field(0.0, ge=0, le=1, description="probability of a random crop before the letterbox "
                        "(not in the method: zooms in on the garment as buyers' photos do; 0 = off)")
    crop_min: float = Field(0.35, gt=0, le=1, description="random crop: smallest area, as a fraction of the photo")
    background: float = Field(0.0, ge=0, le=1, description="probability of replacing a shop photo's plain "
                              "white background with a random texture, before the letterbox (not in the method: "
                              "buyers' photos show beds, floors and walls; 0 = off)")
    background_level: int = Field(245, ge=128, le=255, description="background replacement: pixels with every "
                                  "channel at least this bright, connected to the photo's border, are background")


class RandomSideErasing(torch.nn.Module):
    """With probability ``p``, set a rectangle to ``value``; each side of the rectangle is a
    uniform whole number of pixels in ``[ceil(min_frac * side), floor(max_frac * side)]`` of the
    matching image side (at least 1 pixel), placed uniformly inside the image.

    Written by hand because torchvision's RandomErasing draws the rectangle by area ``scale``
    and aspect ``ratio``, which cannot express "each side between 1/16 and 1/8 of the image's".
    """

    def __init__(self, p: float = 0.5, min_frac: float = 1 / 16, max_frac: float = 1 / 8, value: float = 0.0):
        super().__init__()
        if not 0 < min_frac <= max_frac <= 1:
            raise ValueError(f"need 0 < min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
        self.p, self.min_frac, self.max_frac, self.value = p, min_frac, max_frac, value

    def side_range(self, side: int) -> tuple[int, int]:
        lo = max(1, math.ceil(self.min_frac * side - 1e-9))
        hi = max(lo, math.floor(self.max_frac * side + 1e-9))
        return min(lo, side), min(hi, side)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return img
        h, w = img.shape[-2:]
        (hlo, hhi), (wlo, whi) = self.side_range(h), self.side_range(w)
        eh = int(torch.randint(hlo, hhi + 1, ()))
        ew = int(torch.randint(wlo, whi + 1, ()))
        top = int(torch.randint(0, h - eh + 1, ()))
        left = int(torch.randint(0, w - ew + 1, ()))
        out = img.clone()
        out[..., top:top + eh, left:left + ew] = self.value
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, min_frac={self.min_frac}, max_frac={self.max_frac}, value={self.value}"


def build_train_augment(config: AugmentConfig | dict | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training augmentation of the retrieval method for one CHW tensor (see the module docstring).

    ``config``: an :class:`AugmentConfig`, a dict of its fields, or None for the defaults.
    Augmentations with probability 0 are left out, so all-zero probabilities give the identity.
    """
    cfg = config if isinstance(config, AugmentConfig) else AugmentConfig(**(config or {}))
    steps: list[Callable] = []
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.rot180 > 0:
        # Both flips = an exact 180 degree rotation (no interpolation, no off-by-one centre).
        steps.append(v2.RandomApply([v2.RandomHorizontalFlip(p=1.0), v2.RandomVerticalFlip(p=1.0)], p=cfg.rot180))
    if cfg.rotate > 0 and cfg.rotate_degrees > 0:
        rotation = v2.RandomRotation(cfg.rotate_degrees, interpolation=v2.InterpolationMode.BILINEAR, fill=0)
        steps.append(v2.RandomApply([rotation], p=cfg.rotate))
    if cfg.color > 0 and (cfg.brightness > 0 or cfg.contrast > 0):
        jitter = v2.ColorJitter(brightness=cfg.brightness or None, contrast=cfg.contrast or None)
        steps.append(v2.RandomApply([jitter], p=cfg.color))
    if cfg.erase > 0:
        steps.append(RandomSideErasing(cfg.erase, cfg.erase_min, cfg.erase_max, cfg.erase_value))
    return v2.Compose(steps) if steps else _identity


def crop_box(width: int, height: int, min_area: float) -> tuple[int, int, int, int]:
    """A random (left, top, right, bottom) box inside a width x height photo: its area is a
    uniform fraction in [min_area, 1] of the photo's, its aspect ratio the photo's times a factor
    in [3/4, 4/3] (clipped to fit). torch's global generator draws it."""
    area = float(torch.empty(()).uniform_(min_area, 1.0)) * width * height
    ratio = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3)))) * width / height
    w = max(1, min(width, round(math.sqrt(area * ratio))))
    h = max(1, min(height, round(math.sqrt(area / ratio))))
    left = int(torch.randint(0, width - w + 1, ()))
    top = int(torch.randint(0, height - h + 1, ()))
    return left, top, left + w, top + h


def plain_background(img: Image.Image, level: int = 245) -> np.ndarray:
    """Boolean (height, width) mask of ``img``'s plain light background: pixels with every channel
    at least ``level`` that are 8-connected to the photo's border (so a white shirt inside the
    garment's outline stays). scipy.ndimage labels the regions."""
    from scipy import ndimage

    light = (np.asarray(img.convert("RGB")) >= level).all(axis=2)
    labels, _ = ndimage.label(light, structure=np.ones((3, 3), bool))
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, border[border > 0])


def random_texture(height: int, width: int) -> np.ndarray:
    """A random (height, width, 3) uint8 texture, standing in for the beds, floors, tables and
    walls behind buyers' photos: a smooth field of muted colours (one random brightness and tint,
    varied over a 2 x 2 to 5 x 5 grid and upsampled bicubically), with p 0.5 faint stripes or
    checks over it, and fine grain. torch's global generator draws it."""
    cells = int(torch.randint(2, 6, ()))
    base = float(torch.empty(()).uniform_(0.25, 0.9)) + (torch.rand(1, 3, 1, 1) - 0.5) * 0.3
    grid = base + (torch.rand(1, 3, cells, cells) - 0.5) * float(torch.empty(()).uniform_(0.05, 0.3))
    field = torch.nn.functional.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)[0]
    if float(torch.rand(())) < 0.5:
        period = float(torch.empty(()).uniform_(6, 40))
        angle = float(torch.empty(()).uniform_(0, math.pi))
        ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
        wave = torch.sin((xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / period)
        if float(torch.rand(())) < 0.5:  # checks: a second wave across the first
            wave = wave * torch.sin((-xs * math.sin(angle) + ys * math.cos(angle)) * 2 * math.pi / period)
        field = field * (1 + float(torch.empty(()).uniform_(0.05, 0.25)) * torch.sign(wave))
    field = field + torch.randn(1, height, width) * float(torch.empty(()).uniform_(0.0, 0.04))
    return (field.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def replace_background(img: Image.Image, level: int = 245, min_share: float = 0.05,
                       max_share: float = 0.9) -> Image.Image:
    """``img`` with its plain light background (:func:`plain_background`) replaced by a
    :func:`random_texture`; unchanged where that background is under ``min_share`` of the photo
    (a buyer's photo, or a garment filling the frame) or over ``max_share`` (a white garment
    whose outline does not close it off from the background)."""
    mask = plain_background(img, level)
    if not min_share <= mask.mean() <= max_share:
        return img
    arr = np.array(img.convert("RGB"))
    arr[mask] = random_texture(*mask.shape)[mask]
    return Image.fromarray(arr)


def _identity(img: torch.Tensor) -> torch.Tensor:
    return img


class TrainPreprocess:
    """Training counterpart of ``Preprocess``: letterbox to ``size`` -> float CHW in [0, 1] ->
    ``augment`` -> normalise with ``mean``/``std``. ``augment=None`` uses the method's defaults."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 augment: Callable[[torch.Tensor], torch.Tensor] | AugmentConfig | dict | None = None):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        # the settings that act on the photo before the letterbox (background, crop); a callable
        # ``augment`` has none
        self.photo: AugmentConfig | None = None
        if callable(augment):
            self.augment = augment
        else:
            self.photo = augment if isinstance(augment, AugmentConfig) else AugmentConfig(**(augment or {}))
            self.augment = build_train_augment(self.photo)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        photo = self.photo
        if photo is not None and photo.background > 0 and float(torch.rand(())) < photo.background:
            img = replace_background(img, photo.background_level)
        if photo is not None and photo.crop > 0 and float(torch.rand(())) < photo.crop:
            img = img.crop(crop_box(img.width, img.height, photo.crop_min))
        arr = np.asarray(letterbox(img, self.size), dtype=np.float32) / 255.0
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        x = self.augment(x)
        return (x - self.mean) / self.std
