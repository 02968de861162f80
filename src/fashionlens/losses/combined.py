"""Weighted sum of named loss terms (the retrieval method's "triplet + ID + attribute")."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


class WeightedSum:
    """``WeightedSum({"triplet": 1.0, "identity": 0.5})(terms) -> (total, {name: value})``.

    * Terms with weight 0 are skipped (not added, not reported), so a disabled head may
      be left out of ``terms`` or passed anyway.
    * A term whose name has no weight raises ``KeyError`` (catches typos); so does a
      term with a non-zero weight that is missing from ``terms``.
    * The returned dict holds each used term's unweighted value as a float, plus ``"total"``.
      Weights must be finite and >= 0.
    """

    def __init__(self, weights: Mapping[str, float]):
        self.weights = {str(k): float(v) for k, v in weights.items()}
        for name, w in self.weights.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"loss weight {name!r} must be finite and >= 0, got {w}")
        if "total" in self.weights:
            raise ValueError("'total' is reserved for the sum")

    def __call__(self, terms: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        unknown = sorted(set(terms) - set(self.weights))
        if unknown:
            raise KeyError(f"loss terms without a weight: {unknown} (known: {sorted(self.weights)})")
        missing = sorted(n for n, w in self.weights.items() if w > 0 and n not in terms)
        if missing:
            raise KeyError(f"loss terms with a non-zero weight are missing: {missing}")
        total: Tensor | None = None
        values: dict[str, float] = {}
        for name, w in self.weights.items():
            if w == 0:
                continue
            term = terms[name]
            total = term * w if total is None else total + term * w
            values[name] = float(term.detach())
        if total is None:
            total = torch.zeros(())
        values["total"] = float(total.detach())
        return total, values

    def __repr__(self) -> str:
        return f"WeightedSum({self.weights})"
