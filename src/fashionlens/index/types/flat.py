"""``flat``: exact inner-product search over every vector (``IDMap2,Flat``); ``auto`` up to
``flat_max`` vectors (20,000: 5 ms a query on one core of our CPU)."""

from __future__ import annotations

from fashionlens.index.types.base import INDEX_TYPES, IndexSettings, IndexSpec, IndexType


@INDEX_TYPES.register("flat")
class Flat(IndexType):
    def spec(self, n: int, dim: int, settings: IndexSettings) -> IndexSpec:
        return IndexSpec("flat", dim, "IDMap2,Flat")
