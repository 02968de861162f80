"""Global average pooling: the baseline neck, and the attribute classifier's pool."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fashionlens.models.necks.base import Neck, Outputs, check_map, register


@register("gap")
class GAPNeck(Neck):
    """Global average pooling: ``{"embedding": (N, C)}``, L2-normalised (``normalize=False``:
    the plain mean, the input of a linear classifier such as the attribute classifier's heads, where
    Grad-CAM of a head has a closed form: :func:`fashionlens.explain.cam.linear_gap_cams`)."""

    def __init__(self, in_channels: int, normalize: bool = True):
        super().__init__()
        self.in_channels, self.normalize = in_channels, bool(normalize)
        self.out_dim = in_channels

    def forward(self, t: torch.Tensor) -> Outputs:
        check_map(t, self.in_channels)
        pooled = t.mean(dim=(2, 3))
        return {"embedding": F.normalize(pooled, dim=1) if self.normalize else pooled}
