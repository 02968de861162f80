"""``ivfpq``: ``IVF{nlist},PQ{m}`` (nlist ~ 2 sqrt(n), about ``pq_bytes`` bytes a vector in memory);
``auto`` above ``ivf_flat_max``. Its shortlist of ``rerank`` candidates is re-scored exactly with
their vectors, read from the chunk files, so the scores it returns are true inner products."""

from __future__ import annotations

from fashionlens.index.types.base import INDEX_TYPES, NPROBE, IndexSettings, IndexSpec, IndexType, nlist


@INDEX_TYPES.register("ivfpq")
class IVFPQ(IndexType):
    rescored = True

    def spec(self, n: int, dim: int, settings: IndexSettings) -> IndexSpec:
        lists = nlist(n, 2, settings.train_sample)
        m = max(d for d in range(1, min(settings.pq_bytes, dim) + 1) if dim % d == 0)  # sub-quantisers divide dim
        # "np": no polysemous training, which FAISS otherwise runs for PQ codes; search never
        # uses it (polysemous_ht stays 0) and it dominated the training time.
        return IndexSpec("ivfpq", dim, f"IVF{lists},PQ{m}np", nprobe=min(lists, NPROBE),
                         rerank=settings.rerank or None, nlist=lists)

    def training_minimum(self, spec: IndexSpec) -> int:
        return max(spec.nlist or 0, 256)  # and 256 for PQ's 8-bit codebooks
