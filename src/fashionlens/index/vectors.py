"""Vector storage: embeddings in chunk files on disk, and a FAISS index built from them.

Vectors are written once, in chunks (``vectors/chunk-NNNNNN.npy`` + ``.ids.npy``), as they are
computed; the FAISS index is derived from the chunks and can always be rebuilt from them, one
chunk at a time, so no step needs the whole gallery as one matrix in memory.

Index types (``IndexSpec.kind``), chosen by size when ``auto``:
- ``flat``: exact inner-product search (``IDMap2,Flat``), up to ``flat_max`` vectors;
- ``ivfpq``: ``IVF{nlist},PQ{m}`` (nlist ~ 2 sqrt(n)) above that (about ``m`` bytes a vector), trained on a sample;
- ``hnsw``: ``IDMap2,HNSW{M},Flat`` on request (fast and exact-ish, but all vectors in memory
  and no removal: removed items are filtered at search time).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import torch


@dataclass
class IndexSpec:
    kind: str  # flat | hnsw | ivfpq
    dim: int
    factory: str
    nprobe: int | None = None
    ef_search: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def choose_spec(n: int, dim: int, kind: str = "auto", flat_max: int = 100_000,
                hnsw_m: int = 32, pq_bytes: int = 64, train_sample: int = 50_000) -> IndexSpec:
    """Pick the index for ``n`` vectors of ``dim`` dimensions (``kind`` ``auto`` or forced)."""
    if kind == "auto":
        kind = "flat" if n <= flat_max else "ivfpq"
    if kind == "flat":
        return IndexSpec("flat", dim, "IDMap2,Flat")
    if kind == "hnsw":
        return IndexSpec("hnsw", dim, f"IDMap2,HNSW{hnsw_m},Flat", ef_search=128)
    if kind == "ivfpq":
        # nlist ~ 2 sqrt(n), a power of two (faiss wants ~40 training points per list, and the
        # training sample is capped for memory); PQ sub-quantisers must divide the dimension.
        nlist = int(2 ** round(math.log2(max(16.0, 2 * math.sqrt(max(n, 1))))))
        nlist = min(nlist, int(2 ** math.floor(math.log2(max(16, train_sample // 39)))))
        m = max(d for d in range(1, min(pq_bytes, dim) + 1) if dim % d == 0)
        # "np": no polysemous training, which FAISS otherwise runs for PQ codes; search never
        # uses it (polysemous_ht stays 0) and it dominated the training time.
        return IndexSpec("ivfpq", dim, f"IVF{nlist},PQ{m}np", nprobe=min(nlist, 32))
    raise ValueError(f"unknown index type {kind!r} (auto, flat, hnsw, ivfpq)")


def new_index(spec: IndexSpec) -> faiss.Index:
    index = faiss.index_factory(spec.dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    apply_search_params(index, spec)
    return index


def apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    params = faiss.ParameterSpace()
    if spec.nprobe:
        params.set_index_parameter(index, "nprobe", spec.nprobe)
    if spec.ef_search:
        params.set_index_parameter(index, "efSearch", spec.ef_search)


# FAISS's own top-k path for a flat index below this many queries (its distance_compute_blas_threshold)
_FAISS_BLAS_FROM = 20


def search_index(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(queries, k)``: (scores, ids), -1 ids where fewer than ``k`` vectors exist.

    An exact inner-product ``IDMap,Flat`` index asked for fewer than 20 queries at once (a
    server's batches) is searched here as one matrix product and a top-k, on torch's threads.
    Written by hand because FAISS scans a flat index query by query below 20 queries (and in
    blocks with a heap per block above): 3 ms a query over the shared catalog's 9,583 x 1,280
    vectors on our CPU, against 1.4 ms for the product (docs/BENCHMARKS.md, issue 6). The same
    scores, so the same ranking up to the order of exact ties; the caller keeps the index from
    changing meanwhile (as it must around FAISS's own search)."""
    flat = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else None
    if (not isinstance(flat, faiss.IndexFlat) or flat.metric_type != faiss.METRIC_INNER_PRODUCT
            or not 0 < len(queries) < _FAISS_BLAS_FROM or flat.ntotal == 0):
        return index.search(queries, k)
    n = flat.ntotal
    vectors = torch.from_numpy(faiss.rev_swig_ptr(flat.get_xb(), n * flat.d).reshape(n, flat.d))  # no copy
    top = (torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)) @ vectors.T).topk(min(k, n), dim=1)
    id_map = faiss.rev_swig_ptr(index.id_map.data(), index.id_map.size())
    scores = np.full((len(queries), k), -np.finfo(np.float32).max, np.float32)  # FAISS's fill for IP
    ids = np.full((len(queries), k), -1, np.int64)
    scores[:, :top.values.shape[1]] = top.values.numpy()
    ids[:, :top.indices.shape[1]] = id_map[top.indices.numpy()]
    return scores, ids


def supports_remove(spec: IndexSpec) -> bool:
    return spec.kind != "hnsw"


class ChunkFiles:
    """Embedding chunks in a folder: write atomically, read back one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _paths(self, chunk: int) -> tuple[Path, Path]:
        return self.folder / f"chunk-{chunk:06d}.npy", self.folder / f"chunk-{chunk:06d}.ids.npy"

    def write(self, chunk: int, rowids: np.ndarray, vectors: np.ndarray) -> None:
        for path, arr in zip(self._paths(chunk), (vectors.astype(np.float32), rowids.astype(np.int64))):
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)

    def read(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        vec_path, ids_path = self._paths(chunk)
        return np.load(ids_path), np.load(vec_path)

    def remove_orphans(self, known: set[int]) -> int:
        """Delete chunk files that no committed chunk refers to (left by a killed run)."""
        removed = 0
        for path in self.folder.glob("chunk-*"):
            match = re.fullmatch(r"chunk-(\d+)(?:\.ids)?\.npy(\.tmp)?", path.name)
            if match is None:  # not ours: leave it alone
                continue
            if match.group(2) or int(match.group(1)) not in known:
                path.unlink()
                removed += 1
        return removed


def sample_for_training(chunks: Iterator[tuple[np.ndarray, np.ndarray]], n_total: int,
                        n_sample: int, dim: int, seed: int = 0) -> np.ndarray:
    """A uniform random sample of ``min(n_sample, n_total)`` vectors, read chunk by chunk into
    one preallocated array (no second copy: this array is the largest thing ``index`` holds)."""
    rng = np.random.default_rng(seed)
    size = min(n_sample, n_total)
    chosen = np.sort(rng.choice(n_total, size=size, replace=False)) if size else np.zeros(0, np.int64)
    out = np.empty((size, dim), np.float32)
    filled = seen = 0
    for _, vecs in chunks:
        lo, hi = np.searchsorted(chosen, [seen, seen + len(vecs)])
        out[filled:filled + hi - lo] = vecs[chosen[lo:hi] - seen]
        filled += hi - lo
        seen += len(vecs)
    return out[:filled]
