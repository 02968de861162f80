"""``ivfflat``: ``IVF{nlist},Flat`` (nlist ~ 4 sqrt(n)), 64 lists probed; ``auto`` up to
``ivf_flat_max`` vectors (100,000): the full vectors in memory, the exact score of every vector
it visits."""

from __future__ import annotations

from fashionlens.index.types.base import INDEX_TYPES, NPROBE, IndexSettings, IndexSpec, IndexType, nlist


@INDEX_TYPES.register("ivfflat")
class IVFFlat(IndexType):
    def spec(self, n: int, dim: int, settings: IndexSettings) -> IndexSpec:
        lists = nlist(n, 4, settings.train_sample)
        return IndexSpec("ivfflat", dim, f"IVF{lists},Flat", nprobe=min(lists, NPROBE), nlist=lists)
