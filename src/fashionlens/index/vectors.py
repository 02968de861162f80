"""Vector storage: embeddings in chunk files on disk, and searching the FAISS index built from them.

Vectors are written once, in chunks (``vectors/chunk-NNNNNN.npy`` + ``.ids.npy``), as they are
computed; the FAISS index (its type: :mod:`fashionlens.index.types`) is derived from the chunks
and can always be rebuilt from them, one chunk at a time, so no step needs the whole gallery as
one matrix in memory. The IVF types are trained on a sample of ``train_sample`` vectors
(:func:`sample_for_training`).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import torch


def write_index(index: faiss.Index, path: Path) -> None:
    """``index`` written to ``path`` whole or not at all (a synced temporary file, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# FAISS's own top-k path for a flat index below this many queries (its distance_compute_blas_threshold)
_FAISS_BLAS_FROM = 20


def search_index(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(queries, k)``: (scores, ids), -1 ids where fewer than ``k`` vectors exist.

    An exact inner-product ``IDMap,Flat`` index asked for fewer than 20 queries at once (a
    server's batches) is searched here as one matrix product and a top-k, on torch's threads.
    Written by hand because FAISS scans a flat index query by query below 20 queries (and in
    blocks with a heap per block above): 3 ms a query over the shared catalog's 9,583 x 1,280
    vectors on our CPU, against 1.4 ms for the product (docs/experiments/serving.md). The same
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


def rerank_exact(queries: np.ndarray, ids: np.ndarray, vectors_of, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each query's candidate ``ids`` (FAISS's answer, -1 = none) by the exact inner
    product with their stored vectors; (scores, ids) of the best ``k``, -1 padded, as ``search_index``.

    ``vectors_of(sorted unique ids)`` gives ``(found ids, vectors)``; a candidate it does not find
    (removed since) is dropped. Written by hand: FAISS's ``IndexRefineFlat`` does the same but keeps
    every vector in memory (5 GB a million at 1,280 dims), which an index above ``ivf_flat_max``
    must not; the vectors here come from the chunk files, a few hundred a query."""
    n_q = len(queries)
    scores = np.full((n_q, k), -np.finfo(np.float32).max, np.float32)
    out = np.full((n_q, k), -1, np.int64)
    found, vectors = vectors_of(np.unique(ids[ids >= 0]))
    if len(found) == 0:
        return scores, out
    at = np.clip(np.searchsorted(found, ids), 0, len(found) - 1)
    is_candidate = np.zeros((n_q, len(found)), bool)
    rows, cols = np.nonzero((ids >= 0) & (found[at] == ids))
    is_candidate[rows, at[rows, cols]] = True
    # torch, as search_index: on the caller's threads (a server's worker runs one), where numpy's
    # BLAS starts its own pool, whose spinning threads took 17 ms of CPU a search under load
    exact = (torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
             @ torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).T).numpy()
    exact[~is_candidate] = -np.inf
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(exact, order, axis=1)
    keep = np.isfinite(best)
    width = order.shape[1]
    scores[:, :width] = np.where(keep, best, scores[:, :width])
    out[:, :width] = np.where(keep, found[order], -1)
    return scores, out


class ChunkFiles:
    """Embedding chunks in a folder: write atomically, read back one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # committed chunk files never change (a number is never reused), so their layouts can be kept;
        # bounded, since a server's adds write one-item chunks
        self._layouts = functools.lru_cache(maxsize=4096)(self._layout)

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

    def _layout(self, chunk: int) -> tuple[np.ndarray, np.ndarray, str, int, int]:
        """(the chunk's row ids sorted, their positions in the file, the file, where its vectors
        start, dim)."""
        vec_path, ids_path = self._paths(chunk)
        ids = np.load(ids_path)
        order = np.argsort(ids, kind="stable")
        with open(vec_path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            if fortran or dtype != np.float32 or len(shape) != 2 or shape[0] != len(ids):
                raise ValueError(f"{vec_path}: not a chunk of {len(ids)} float32 vectors")
            return ids[order], order, str(vec_path), fh.tell(), shape[1]

    def rows(self, chunk: int, rowids: np.ndarray) -> np.ndarray:
        """The vectors of ``rowids`` (each held by ``chunk``), read row by row from the chunk file:
        only those rows are read, whatever the chunk's size. (Not a memory map: touching a few
        rows of a mapped file maps the pages around each as well, which a server's re-scoring
        turned into gigabytes of resident memory over a million items.)"""
        ids, order, path, start, dim = self._layouts(chunk)
        at = np.searchsorted(ids, rowids)
        if (at >= len(ids)).any() or (ids[np.minimum(at, len(ids) - 1)] != rowids).any():
            raise KeyError(f"chunk {chunk} does not hold rows {sorted(set(rowids.tolist()) - set(ids.tolist()))}")
        out = np.empty((len(rowids), dim), np.float32)
        size = dim * 4
        fd = os.open(path, os.O_RDONLY)
        try:
            for i, position in enumerate(order[at].tolist()):
                out[i] = np.frombuffer(os.pread(fd, size, start + position * size), np.float32)
        finally:
            os.close(fd)
        return out

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
