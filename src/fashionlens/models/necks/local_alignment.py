"""The local alignment network: K branches of spatial and channel (SE) attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fashionlens.models.necks.base import Neck, Outputs, check_map, register


@register("local_alignment", aliases=("lan",))
class LocalAlignmentNeck(Neck):
    """Local alignment network (docs/METHODS.md, retrieval 4): K attention branches, concatenated.

    Branch i: mask ``M_i = sigmoid(conv1x1_i(T))`` (N, 1, H, W), ``T_i = T * M_i``; SE vector
    ``C_i = sigmoid(FC(ReLU(FC(GAP(T_i)))))`` (C -> C//reduction -> C), ``T_i = T_i * C_i``;
    then ``GAP(T_i)`` and ``Linear(C, dim)``. Output ``{"embedding": (N, K*dim)`` L2-normalised,
    ``"branch_features": (N, K, dim)`` (before normalisation), ``"masks": (N, K, H, W)}``.

    ``spatial=False`` / ``channel=False`` make that step the identity (ablations). With
    ``spatial=False`` there is no mask, so the ``"masks"`` key is *absent* from the output.

    Hand-written. Two shortcuts, both exact: the K 1x1 convs C->1 are one conv C->K, and
    since C_i scales whole channels, ``GAP(T_i * C_i) = GAP(T_i) * C_i`` - so the masked
    map is only ever needed pooled, ``einsum(T, M) / HW``, never as an (N, K, C, H, W) tensor.

    Init: the spatial conv weights are drawn from N(0, 0.01^2) with zero bias, independently
    per branch. Logits then start small (std ~ 0.01 * ||T_hw||), so masks start around 0.5
    but differ per branch, which lets the branches specialise instead of staying identical.
    """

    def __init__(
        self,
        in_channels: int,
        branches: int = 4,
        dim: int = 256,
        reduction: int = 16,
        spatial: bool = True,
        channel: bool = True,
    ):
        super().__init__()
        if branches < 1 or dim < 1 or reduction < 1:
            raise ValueError("branches, dim and reduction must be >= 1")
        self.in_channels, self.branches, self.dim = in_channels, branches, dim
        self.out_dim = branches * dim
        self.spatial = None
        if spatial:
            self.spatial = nn.Conv2d(in_channels, branches, kernel_size=1)
            nn.init.normal_(self.spatial.weight, std=0.01)
            nn.init.zeros_(self.spatial.bias)
        hidden = max(1, in_channels // reduction)
        self.se = None
        if channel:
            self.se = nn.ModuleList(
                nn.Sequential(
                    nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
                    nn.Linear(hidden, in_channels), nn.Sigmoid(),
                )
                for _ in range(branches)
            )
        self.reduce = nn.ModuleList(nn.Linear(in_channels, dim) for _ in range(branches))

    def forward(self, t: torch.Tensor) -> Outputs:
        check_map(t, self.in_channels)
        n, c, h, w = t.shape
        out: Outputs = {}
        if self.spatial is not None:
            masks = torch.sigmoid(self.spatial(t))  # (N, K, H, W)
            pooled = torch.einsum("nchw,nkhw->nkc", t, masks) / (h * w)  # GAP(T * M_i)
            out["masks"] = masks
        else:
            pooled = t.mean(dim=(2, 3)).unsqueeze(1).expand(n, self.branches, c)
        feats = []
        for i in range(self.branches):
            p = pooled[:, i]
            if self.se is not None:
                p = p * self.se[i](p)  # GAP(T_i * C_i) = GAP(T_i) * C_i
            feats.append(self.reduce[i](p))
        branch = torch.stack(feats, dim=1)  # (N, K, dim)
        out["branch_features"] = branch
        out["embedding"] = F.normalize(branch.flatten(1), dim=1)
        return out

    def attention_outputs(self) -> list[str]:
        return ["masks"] if self.spatial is not None else []

    def describe(self) -> str:
        return "local_alignment" + (" with spatial=False" if self.spatial is None else "")
