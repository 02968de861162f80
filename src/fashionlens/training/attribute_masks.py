"""Pixel masks as training targets for the street tag classifier's CAMs (``pointing_loss``).

:func:`cell_shares` turns a photo's label mask into, per tag, the share of each cell of the
model's letterboxed input that the tag covers; :class:`MaskedMapDataset` serves them beside the
cached feature maps, with the map-level augmentations (flip, 180 degree turn, crop) applied to
map and shares together so that they stay aligned. Photos without a mask get zeros and
``has = False`` (no pointing loss). See :mod:`fashionlens.losses.pointing`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fashionlens.data.street import read_labels, read_mask
from fashionlens.data.transforms import Letterbox
from fashionlens.training.feature_cache import CachedMapDataset


def cell_shares(mask: np.ndarray, label_ids: Sequence[int], size: int, cells: tuple[int, int]) -> np.ndarray:
    """(len(label_ids), cells_h, cells_w) float32: for each label id, the share of each cell of
    the ``size`` x ``size`` letterboxed input that ``mask`` (H, W) labels with it, the mask placed
    as :func:`fashionlens.data.transforms.letterbox` places the photo (nearest-neighbour resize;
    padding belongs to no label). A negative id (a tag the label list lacks) covers nothing."""
    mask = np.asarray(mask)
    geometry = Letterbox(mask.shape[1], mask.shape[0], size)
    (nw, nh), (left, top) = geometry.inner, geometry.offset
    resized = np.asarray(Image.fromarray(mask.astype(np.int32)).resize((nw, nh), Image.NEAREST))
    canvas = np.full((size, size), -1, dtype=np.int64)
    canvas[top:top + nh, left:left + nw] = resized
    ids = torch.as_tensor(list(label_ids), dtype=torch.long)
    binary = ((torch.from_numpy(canvas)[None] == ids[:, None, None]) & (ids[:, None, None] >= 0)).float()
    return torch.nn.functional.adaptive_avg_pool2d(binary, cells).numpy()


class MaskedMapDataset(Dataset):
    """``ds[i]`` -> (map, label, shares (M, h, w), has) for ``samples`` of (image path, label).

    ``shares``: label -> (M, h, w) tensor at the cached maps' resolution (photos with a mask);
    ``augment`` (e.g. :class:`~fashionlens.training.feature_cache.MapAugment`) acts on map and
    shares stacked, so both see the same flip and crop."""

    def __init__(self, samples: Sequence[tuple[Path, int]], cache, shares: dict[int, torch.Tensor], channels: int,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.base = CachedMapDataset(samples, cache)  # no augmentation there: it is applied here, jointly
        self.labels = self.base.labels
        self.shares, self.channels, self.augment = shares, channels, augment

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        t, label = self.base[index]
        s = self.shares.get(label)
        has = s is not None
        if s is None:
            s = torch.zeros(self.channels, *t.shape[-2:])
        if self.augment is not None:
            both = self.augment(torch.cat([t, s]))
            t, s = both[:t.shape[0]], both[t.shape[0]:]
        return t, label, s, has


def street_shares(data, rows: Sequence[int], size: int, cells: tuple[int, int]) -> dict[int, torch.Tensor]:
    """Row -> (tags, h, w) :func:`cell_shares` of the schema's tags, for the ``rows`` of a street
    :class:`~fashionlens.training.attribute_data.AttributeSet` that have a mask. A mask whose
    size is not its photo's is a :class:`UserError` (its cells would not be the photo's)."""
    labels = read_labels(data.root)
    ids = [labels.index(tag) if tag in labels else -1 for tag in data.schema]
    out = {}
    for i in rows:
        if data.masks[i] is None:
            continue
        try:
            with Image.open(data.images[i]) as photo:
                photo_size = photo.size
        except OSError:  # an unreadable photo is left out of training by the feature cache
            continue
        out[int(i)] = torch.from_numpy(cell_shares(read_mask(data.masks[i], labels, photo_size), ids, size, cells))
    return out
