"""A pointing loss: teach a linear-on-GAP classifier's class activation maps where a tag is,
from pixel masks of the training photos (``train-attributes ... pointing_loss``).

For a head that is linear on the global average pool of the last feature map T (N, C, h, w),
the logit of column c is the mean over cells of ``w_c . T[:, :, i, j]`` plus the bias, and
its Grad-CAM is the ReLU of those per-cell terms (:func:`fashionlens.explain.cam.linear_gap_cams`).
The loss treats each (photo, tag present in the photo's mask) pair's per-cell terms as logits
of a softmax over the cells and asks for its mass to lie on the tag's cells:

    loss = - log sum_{cells on the mask} softmax_cells(w_c . T)            (cells="touched")
    loss = - log sum_cells share(cell) * softmax_cells(w_c . T)            (cells="share")

It depends only on the differences between cells, so the image-level logit (their mean,
trained by the classification loss) is left free; it is smallest when the map's peak lies on
the mask, which is what the pointing game measures. Written by hand: no library trains CAMs
against masks. (Related: "Right for the right reasons", Ross et al. 2017, penalises input
gradients outside masks; this is the CAM form for linear heads.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PointingLoss(nn.Module):
    """``loss(feature_map, weight, targets)`` -> scalar.

    ``feature_map``: T (N, C, h, w); ``weight``: (M, C), one head row per target channel (the
    tag's ``yes`` column); ``targets``: (N, M, H, W), the share of each cell on the tag's mask,
    at T's resolution or any multiple of it (average-pooled down to h x w). ``cells="touched"``:
    every cell whose share exceeds ``min_share`` counts fully; ``"share"``: each cell counts by
    its share, which pulls the peak onto the cells the tag covers most (small garments).
    Pairs whose mask is empty give no loss; the loss is the mean over the other pairs, and 0
    (attached to the graph) when there are none.
    """

    def __init__(self, min_share: float = 0.0, cells: str = "touched"):
        super().__init__()
        if not 0.0 <= min_share < 1.0:
            raise ValueError(f"min_share must be in [0, 1), got {min_share}")
        if cells not in ("touched", "share"):
            raise ValueError(f"cells must be touched or share, got {cells!r}")
        self.min_share, self.cells = float(min_share), cells

    def forward(self, feature_map: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        n, c, h, w = feature_map.shape
        if weight.shape[1] != c or targets.shape[:2] != (n, weight.shape[0]):
            raise ValueError(f"shapes do not fit: feature map {tuple(feature_map.shape)}, weight "
                             f"{tuple(weight.shape)}, targets {tuple(targets.shape)}")
        if targets.shape[-2:] != (h, w):
            targets = F.adaptive_avg_pool2d(targets.float(), (h, w))
        shares = targets.float().flatten(2)  # (N, M, cells)
        on = shares > self.min_share
        present = on.any(-1)
        cams = torch.einsum("mc,nchw->nmhw", weight.to(feature_map.dtype), feature_map).flatten(2).float()
        if not bool(present.any()):
            return cams.sum() * 0.0
        log_p = torch.log_softmax(cams, dim=-1)
        if self.cells == "share":
            log_p = log_p + torch.log(shares.masked_fill(~on, 0.0))  # log(0) = -inf: off the mask
        inside = torch.logsumexp(log_p.masked_fill(~on, float("-inf")), dim=-1)  # log of the mass on the mask
        return -inside[present].mean()
