"""``hnsw``: ``IDMap2,HNSW{M},Flat`` on request: fast and exact-ish, but all vectors in memory and
no removal (removed items are filtered at search time)."""

from __future__ import annotations

from fashionlens.index.types.base import INDEX_TYPES, IndexSettings, IndexSpec, IndexType


@INDEX_TYPES.register("hnsw")
class HNSW(IndexType):
    supports_remove = False

    def spec(self, n: int, dim: int, settings: IndexSettings) -> IndexSpec:
        return IndexSpec("hnsw", dim, f"IDMap2,HNSW{settings.hnsw_m},Flat", ef_search=128)
