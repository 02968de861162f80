"""Training heads on top of an embedding: identity classification and attributes.

* :class:`IdentityHead` - the BNNeck of the re-id "strong baseline" (Luo et al., 2019): a
  BatchNorm1d whose shift is frozen at zero, then a bias-free Linear to the identity logits.
  The metric loss (triplet) sees the embedding, the softmax loss the batch-normalised one,
  so the two losses do not pull the same vector in conflicting directions.
* :class:`AttributeHead` - one Linear per attribute (the retrieval method's "attribute loss", the attribute method's
  per-attribute outputs); logits concatenated, ``slices`` says which columns are which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


class IdentityHead(nn.Module):
    """Embedding (N, in_dim) -> identity logits (N, num_classes).

    ``bnneck=True``: BatchNorm1d (bias frozen at 0, as in the strong baseline) then a bias-free
    Linear initialised from N(0, 0.001^2). ``bnneck=False``: a plain Linear with bias.
    The BatchNorm needs N > 1 in training mode.
    """

    def __init__(self, in_dim: int, num_classes: int, bnneck: bool = True):
        super().__init__()
        if in_dim < 1 or num_classes < 1:
            raise ValueError("in_dim and num_classes must be >= 1")
        self.in_dim, self.num_classes = in_dim, num_classes
        self.bn = None
        if bnneck:
            self.bn = nn.BatchNorm1d(in_dim)
            self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(in_dim, num_classes, bias=not bnneck)
        if bnneck:
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            x = self.bn(x)
        return self.classifier(x)


class AttributeHead(nn.Module):
    """Embedding (N, in_dim) -> attribute logits (N, sum of value counts).

    ``schema`` maps attribute name -> its values, e.g. ``{"sleeve_length": ["short",
    "long", "invisible"]}``; attributes keep the schema's order. ``slices[name]`` is the
    column range of that attribute in the concatenated logits; :meth:`split` cuts them.
    """

    def __init__(self, in_dim: int, schema: Mapping[str, Sequence[str]]):
        super().__init__()
        if not schema:
            raise ValueError("AttributeHead needs at least one attribute")
        self.schema: dict[str, list[str]] = {}
        self.slices: dict[str, slice] = {}
        start = 0
        for name, values in schema.items():
            values = list(values)
            if not values:
                raise ValueError(f"attribute {name!r} has no values")
            if len(set(values)) != len(values):
                raise ValueError(f"attribute {name!r} has repeated values")
            self.schema[name] = values
            self.slices[name] = slice(start, start + len(values))
            start += len(values)
        self.in_dim, self.out_dim = in_dim, start
        # A ModuleList (not ModuleDict): attribute names may contain dots.
        self.heads = nn.ModuleList(nn.Linear(in_dim, len(v)) for v in self.schema.values())

    @property
    def weight(self) -> torch.Tensor:
        """(out_dim, in_dim): every value's weight row, in column order (part of the graph)."""
        return torch.cat([head.weight for head in self.heads], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(x) for head in self.heads], dim=1)

    def split(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Concatenated logits -> {attribute: (N, its value count)}."""
        return {name: logits[:, s] for name, s in self.slices.items()}
