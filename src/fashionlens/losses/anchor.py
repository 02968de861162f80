"""An anchor to a frozen reference model: keep what the untrained model already knows.

Adapting to a new domain with pseudo-labels pulls photos towards the classes the labels favour
(the catalog's largest articleTypes); garment types the pseudo-labels get wrong are then
forgotten. The ``anchor`` term keeps the batch's *similarity structure* close to that of a
frozen reference model, by default the untrained backbone's pooled feature (ImageNet
EfficientNet-Lite0 + global average pooling, the embedded default), in the manner of relational
knowledge distillation (Park et al., CVPR 2019, distance-wise loss with cosine similarities):

    loss = mean over pairs i != j of (cos(e_i, e_j) - cos(r_i, r_j)) ** 2

with e the trained embedding and r the reference feature of the same images. Only the pairwise
similarities are matched, so the embedding may change its basis and width (it is not asked to
equal the reference feature), and retrieval, which ranks by these similarities, is what is kept.
Written here: the few lines of the relational loss (no well-kept library ships it as a term
that takes a reference model's outputs).

The trainer runs the reference model (``reference`` below: the same backbone and trainable
stages, a ``gap`` neck, no heads, frozen, pretrained weights) on every batch without gradients
and gives its feature as ``outputs["reference"]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fashionlens.losses.terms import LOSS_TERMS, LossTerm, Targets


def similarity_gap(embedding: Tensor, reference: Tensor) -> Tensor:
    """Mean over ordered pairs i != j of (cos(e_i, e_j) - cos(r_i, r_j)) ** 2; 0 for a single image."""
    n = len(embedding)
    if n < 2:
        return embedding.sum() * 0.0
    e = F.normalize(embedding.float(), dim=1)
    r = F.normalize(reference.float(), dim=1)
    diff = e @ e.T - r @ r.T
    off = ~torch.eye(n, dtype=torch.bool, device=diff.device)
    return (diff[off] ** 2).mean()


@LOSS_TERMS.register("anchor")
class AnchorTerm(LossTerm):
    """The relational anchor to the frozen reference model's feature (see the module docstring)."""

    reference: ClassVar[dict] = {"type": "gap"}  # the reference model's neck (with pretrained weights)

    def forward(self, outputs: Mapping[str, Tensor], targets: Targets) -> Tensor:
        if "reference" not in outputs:
            raise KeyError("the anchor term needs outputs['reference'] (the trainer's reference model)")
        return similarity_gap(outputs["embedding"], outputs["reference"])
