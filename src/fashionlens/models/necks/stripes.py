"""Horizontal and vertical stripes of the map, each pooled, reduced and (optionally) classified."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fashionlens.models.necks.base import Neck, Outputs, check_map, register


@register("stripes")
class StripeNeck(Neck):
    """Multi-granularity stripes (docs/METHODS.md, retrieval 6; the MGN head layout).

    For each part count p in ``parts`` and each direction ("h": p horizontal bands, top to
    bottom; "v": p vertical bands, left to right), the map is average-pooled to (p, 1) or
    (1, p) - adaptive pooling, so any H, W works. A part count of 1 (the whole map) is taken
    once, not once per direction. Each stripe is reduced to ``dim`` by Linear (= 1x1 conv on
    the pooled cell) + BatchNorm + ReLU: its own reduction per stripe as in MGN, or one
    shared by all stripes with ``share_reduction=True``. With ``num_classes`` each stripe gets
    its own identity classifier. Output ``{"stripes": (N, S, dim), "embedding": (N, S*dim)``
    L2-normalised, ``"stripe_logits": [S x (N, num_classes)]}`` (the last only with
    classifiers). BatchNorm needs N > 1 in training mode.
    """

    uses_identities = True

    def __init__(
        self,
        in_channels: int,
        parts: Sequence[int] = (2, 3),
        directions: Sequence[str] = ("h", "v"),
        dim: int = 256,
        num_classes: int | None = None,
        share_reduction: bool = False,
    ):
        super().__init__()
        if not parts or any(int(p) < 1 for p in parts):
            raise ValueError(f"parts must be positive integers, got {parts!r}")
        if not directions or any(d not in ("h", "v") for d in directions):
            raise ValueError(f"directions must be 'h' and/or 'v', got {directions!r}")
        self.in_channels, self.dim = in_channels, dim
        # (part count, output size of the adaptive pooling) in output order.
        self.splits: list[tuple[int, tuple[int, int]]] = []
        for p in parts:
            for d in directions if p > 1 else directions[:1]:
                self.splits.append((int(p), (int(p), 1) if d == "h" else (1, int(p))))
        self.num_stripes = sum(p for p, _ in self.splits)
        self.out_dim = self.num_stripes * dim

        def reduction() -> nn.Module:
            return nn.Sequential(
                nn.Linear(in_channels, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)
            )

        n_red = 1 if share_reduction else self.num_stripes
        self.reductions = nn.ModuleList(reduction() for _ in range(n_red))
        self.classifiers = None
        if num_classes is not None:
            self.classifiers = nn.ModuleList(
                nn.Linear(dim, num_classes) for _ in range(self.num_stripes)
            )

    def pool(self, t: torch.Tensor) -> torch.Tensor:
        """Average-pooled stripes before reduction: (N, S, C), in output order."""
        check_map(t, self.in_channels)
        pooled = [F.adaptive_avg_pool2d(t, size).flatten(2) for _, size in self.splits]
        return torch.cat(pooled, dim=2).transpose(1, 2)

    def forward(self, t: torch.Tensor) -> Outputs:
        pooled = self.pool(t)
        stripes = torch.stack(
            [self.reductions[i % len(self.reductions)](pooled[:, i]) for i in range(pooled.shape[1])],
            dim=1,
        )
        out: Outputs = {"stripes": stripes, "embedding": F.normalize(stripes.flatten(1), dim=1)}
        if self.classifiers is not None:
            out["stripe_logits"] = [clf(stripes[:, i]) for i, clf in enumerate(self.classifiers)]
        return out
