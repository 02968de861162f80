"""Ring pooling: concentric square rings of the map, robust to rotation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fashionlens.models.necks.base import Neck, Outputs, check_map, register


def ring_index(height: int, width: int, rings: int) -> torch.Tensor:
    """Ring number (0 = centre) of every cell of an H x W map, as an (H, W) long tensor.

    Hand-written. Cell (i, j) has the normalised Chebyshev distance
    ``max(|2i+1-H| / H, |2j+1-W| / W)`` from the map centre (cell centres, each axis scaled by
    its half-size, so it lies in [0, 1)); its ring is ``floor(R * distance)``, i.e. ring r
    holds distances in [r/R, (r+1)/R). Integer arithmetic keeps it exact, so the rings of a
    square map are exactly symmetric under 90/180 degree rotation and flips. Every cell gets
    exactly one ring; raises ValueError when a ring would be empty (R too large for the map).
    """
    if rings < 1:
        raise ValueError("rings must be >= 1")
    rows = (rings * (2 * torch.arange(height) + 1 - height).abs()) // height
    cols = (rings * (2 * torch.arange(width) + 1 - width).abs()) // width
    index = torch.maximum(rows[:, None], cols[None, :])
    empty = sorted(set(range(rings)) - set(index.unique().tolist()))
    if empty:
        raise ValueError(f"{rings} rings on a {height}x{width} map leave ring(s) {empty} empty")
    return index


@register("rings")
class RingNeck(Neck):
    """Concentric square rings (docs/METHODS.md, retrieval 7): rotation-robust pooling.

    Ring r of an H x W map is given by :func:`ring_index`; each ring is average-pooled over
    its cells (masked mean). The ring masks are built once per (H, W) and cached. With
    ``dim`` one Linear(C, dim), shared by all rings, reduces each ring feature. Output
    ``{"rings": (N, R, C or dim), "embedding": (N, R*(C or dim))`` L2-normalised``}``.
    On square maps the ring features are unchanged by ``torch.rot90(T, k, (2, 3))``.
    """

    def __init__(self, in_channels: int, rings: int = 3, dim: int | None = None):
        super().__init__()
        if rings < 1:
            raise ValueError("rings must be >= 1")
        self.in_channels, self.rings = in_channels, rings
        self.reduce = nn.Linear(in_channels, dim) if dim is not None else None
        self.out_dim = rings * (dim if dim is not None else in_channels)
        self._weights: dict[tuple[int, int], torch.Tensor] = {}  # (H, W) -> (R, H, W) cache

    def ring_weights(self, height: int, width: int) -> torch.Tensor:
        """(R, H, W) weights: 1/|ring| on the ring's cells, 0 elsewhere (rows sum to 1)."""
        key = (height, width)
        if key not in self._weights:
            index = ring_index(height, width, self.rings)
            masks = (index[None] == torch.arange(self.rings)[:, None, None]).float()
            self._weights[key] = masks / masks.sum(dim=(1, 2), keepdim=True)
        return self._weights[key]

    def forward(self, t: torch.Tensor) -> Outputs:
        check_map(t, self.in_channels)
        weights = self.ring_weights(t.shape[2], t.shape[3]).to(device=t.device, dtype=t.dtype)
        rings = torch.einsum("nchw,rhw->nrc", t, weights)  # masked means
        if self.reduce is not None:
            rings = self.reduce(rings)
        return {"rings": rings, "embedding": F.normalize(rings.flatten(1), dim=1)}
