"""Batch-all triplet loss (docs/METHODS.md, retrieval 5) with pluggable distances and reducers.

Design after pytorch-metric-learning: the loss takes a ``distance`` object (embeddings ->
pairwise matrix) and a ``reducer`` object (losses of the valid triplets -> scalar).

The method: l = max(d(a, p) - d(a, n) + m, 0), Euclidean d, m = 0.2, averaged over **all**
valid triplets of a P x K batch (zeros included): ``BatchAllTripletLoss()`` with its defaults.

Cross-domain mining (docs/METHODS.md, retrieval 8): the mined negatives of a drawn identity join the
batch as an extra group "M+N" whose images are never anchor or positive. Pass
``anchor_mask`` (False for those images) and give them a label that differs from every
real identity of the batch (e.g. -1): they then serve as negatives only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fashionlens.losses.terms import LOSS_TERMS, LossTerm, Targets


class EuclideanDistance:
    """Pairwise Euclidean distance ``(N, D), (M, D) -> (N, M)``.

    Computed as ``sqrt(max(|a|^2 + |b|^2 - 2 a.b, eps))``: the clamp before the square root
    keeps the gradient finite (zero) for identical vectors, where ``sqrt`` at 0 would give
    inf/NaN. Distances below ``sqrt(eps)`` (1e-6 by default) read as ``sqrt(eps)``.
    """

    def __init__(self, eps: float = 1e-12):
        self.eps = eps

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2.0 * (a @ b.T)
        return sq.clamp_min(self.eps).sqrt()

    def __repr__(self) -> str:
        return f"EuclideanDistance(eps={self.eps})"


class CosineDistance:
    """Pairwise cosine distance ``1 - cos(a, b)``, in [0, 2]; inputs need not be normalised."""

    def __init__(self, eps: float = 1e-12):
        self.eps = eps

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        a = F.normalize(a, dim=1, eps=self.eps)
        b = F.normalize(b, dim=1, eps=self.eps)
        return 1.0 - a @ b.T

    def __repr__(self) -> str:
        return "CosineDistance()"


def _zero_like_graph(losses: Tensor) -> Tensor:
    """A scalar 0 that stays attached to the graph (its gradient is defined and zero)."""
    return losses.sum() * 0.0


class MeanAllValid:
    """Mean over all valid triplets, the zero (already satisfied) ones included (the method's).

    0 (attached to the graph) when there is no valid triplet.
    """

    def __call__(self, losses: Tensor) -> Tensor:
        if losses.numel() == 0:
            return _zero_like_graph(losses)
        return losses.mean()

    def __repr__(self) -> str:
        return "MeanAllValid()"


class MeanNonZero:
    """Mean over the valid triplets whose loss is > 0; 0 (attached to the graph) when none is."""

    def __call__(self, losses: Tensor) -> Tensor:
        positive = losses > 0
        count = int(positive.sum())
        if count == 0:
            return _zero_like_graph(losses)
        return losses[positive].sum() / count

    def __repr__(self) -> str:
        return "MeanNonZero()"


def valid_triplet_mask(labels: Tensor, anchor_mask: Tensor | None = None) -> Tensor:
    """Bool ``(N, N, N)``: ``[a, p, n]`` is True for a valid triplet.

    Valid: a != p, label[a] == label[p], label[n] != label[a], and both a and p are allowed
    to act as anchor/positive (``anchor_mask``; any sample may be a negative).
    """
    labels = labels.reshape(-1)
    n = labels.numel()
    same = labels.unsqueeze(0) == labels.unsqueeze(1)  # (N, N)
    not_self = ~torch.eye(n, dtype=torch.bool, device=labels.device)
    ap = same & not_self
    if anchor_mask is not None:
        anchor_mask = anchor_mask.reshape(-1).to(device=labels.device, dtype=torch.bool)
        if anchor_mask.numel() != n:
            raise ValueError(f"anchor_mask has {anchor_mask.numel()} entries for {n} samples")
        ap = ap & anchor_mask.unsqueeze(1) & anchor_mask.unsqueeze(0)
    an = ~same
    return ap.unsqueeze(2) & an.unsqueeze(1)


class BatchAllTripletLoss(nn.Module):
    """Online batch-all triplet loss: every valid (a, p, n) of the batch, hinge with ``margin``.

    ``distance`` defaults to :class:`EuclideanDistance`, ``reducer`` to :class:`MeanAllValid`
    (the method's). Vectorised over an (N, N, N) tensor: meant for batches of ~100 (P x K = 70
    in the method; N = 100 is 1e6 entries).

    After each call, ``last_stats`` holds plain numbers (this costs one device sync):
    ``valid_triplets``, ``positive_triplets`` (loss > 0) and ``positive_fraction``
    (0.0 when there is no valid triplet).
    """

    def __init__(self, margin: float = 0.2, distance=None, reducer=None):
        super().__init__()
        self.margin = float(margin)
        self.distance = distance if distance is not None else EuclideanDistance()
        self.reducer = reducer if reducer is not None else MeanAllValid()
        self.last_stats: dict[str, float] = {}

    def forward(self, embeddings: Tensor, labels: Tensor, anchor_mask: Tensor | None = None) -> Tensor:
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {tuple(embeddings.shape)}")
        labels = torch.as_tensor(labels, device=embeddings.device).reshape(-1)
        if labels.numel() != embeddings.shape[0]:
            raise ValueError(f"{labels.numel()} labels for {embeddings.shape[0]} embeddings")
        dist = self.distance(embeddings, embeddings)  # (N, N)
        valid = valid_triplet_mask(labels, anchor_mask)
        # loss[a, p, n] = d(a, p) - d(a, n) + margin
        all_losses = dist.unsqueeze(2) - dist.unsqueeze(1) + self.margin
        losses = F.relu(all_losses[valid])
        n_valid = losses.numel()
        n_pos = int((losses.detach() > 0).sum()) if n_valid else 0
        self.last_stats = {
            "valid_triplets": n_valid,
            "positive_triplets": n_pos,
            "positive_fraction": n_pos / n_valid if n_valid else 0.0,
        }
        return self.reducer(losses)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, distance={self.distance!r}, reducer={self.reducer!r}"


@LOSS_TERMS.register("triplet")
class TripletTerm(LossTerm):
    """The batch-all triplet loss of the embeddings (Euclidean distance); ``reducer``: the mean over
    all valid triplets (the method's) or over the non-zero ones. Mined negatives (label -1,
    ``anchor_mask`` False) are negatives only."""

    stat_names = ("valid_triplets", "positive_fraction")

    def __init__(self, margin: Annotated[float, Field(ge=0)] = 0.2, reducer: Literal["all", "nonzero"] = "all"):
        super().__init__()
        self.loss = BatchAllTripletLoss(margin, reducer=MeanAllValid() if reducer == "all" else MeanNonZero())

    def forward(self, outputs: Mapping[str, Tensor], targets: Targets) -> Tensor:
        return self.loss(outputs["embedding"].float(), targets.labels, anchor_mask=targets.anchor_mask)

    def stats(self) -> dict[str, float]:
        return {name: float(self.loss.last_stats.get(name, 0.0)) for name in self.stat_names}
