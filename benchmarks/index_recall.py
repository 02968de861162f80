"""Recall and cost of each vector index type against exact search, on Lite0 vectors of real photos.

No catalog here has more than 9,583 photos, so larger galleries are made from real feature maps:
the Lite0 maps (7 x 7 cells, 1,280 channels) of the shared catalog's photos cached for cached
training, and of their augmented views where those are cached too. Gallery item i is the
L2-normalised mean of a random window of at least 4 x 4 cells of one photo's map (the whole map
for the first pass over the photos: the real catalog vectors), so a photo gives several
near-duplicates at different crops and augmentations, as a real catalog holds the same garment in
several photos and colours. Queries: the 341 buyers' photos of consumer ``validation/``, whole maps.

For each gallery size, against the exact top 10 (a matrix product over the whole gallery):
recall@10 and the share of queries whose first result is the exact first (by score: exact ties count), each type's search time
a query on one thread (batches of 1 and 4), its memory a vector, and its build time. IVF-PQ is
measured with its codes' own scores and with its shortlist re-scored exactly (``rerank_exact``, the
index's own code, here reading the rows from a memory-mapped copy of the gallery; the index reads
them from its chunk files, one ``pread`` a row, which ``index_scale.py`` times end to end).

    fashionlens train configs/recipe-cached-cpu.yaml        # makes runs/cache-lite0-224 (once)
    python benchmarks/index_recall.py --sizes 20000 100000 200000 1000000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from _common import REPO, emit

from fashionlens.index.config import IndexConfig
from fashionlens.index.types import choose_spec, new_index
from fashionlens.index.vectors import rerank_exact, search_index

K = 10


def sources(cache: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """([(maps, catalog rows)] of the plain cache and each view, the buyers' photos' maps)."""
    part = cache / "part-0000"
    if not (part / "maps.npy").exists():
        raise SystemExit(f"{cache}: no cached Lite0 maps; make them with "
                         "'fashionlens train configs/recipe-cached-cpu.yaml' (or pass --cache)")
    plain = np.load(part / "maps.npy", mmap_mode="r")
    paths = (part / "paths.txt").read_text().split("\n")[:len(plain)]
    catalog = np.array(["/catalog/" in p for p in paths])
    buyers = np.array(["/consumer/validation/" in p for p in paths])
    out = [(plain, np.flatnonzero(catalog))]
    for views in sorted(cache.glob("views-*/v*/part-0000/maps.npy")):
        out.append((np.load(views, mmap_mode="r"), np.arange(len(np.load(views, mmap_mode="r")))))
    return out, np.asarray(plain[np.flatnonzero(buyers)], np.float32)


def pooled(maps: np.ndarray) -> np.ndarray:
    v = maps.mean(axis=(2, 3))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def windows(maps: np.ndarray, per: int, rng: np.random.Generator) -> np.ndarray:
    """``per`` vectors a map: the mean over a random window of 4..7 x 4..7 cells, L2-normalised
    (summed-area tables, so each window costs four lookups)."""
    x = torch.from_numpy(np.asarray(maps, np.float32))
    b, c, h, w = x.shape
    table = torch.zeros(b, c, h + 1, w + 1)
    table[:, :, 1:, 1:] = x.cumsum(2).cumsum(3)
    hh = torch.from_numpy(rng.integers(4, h + 1, (b, per)))
    ww = torch.from_numpy(rng.integers(4, w + 1, (b, per)))
    y0 = (torch.from_numpy(rng.random((b, per))) * (h + 1 - hh)).long()
    x0 = (torch.from_numpy(rng.random((b, per))) * (w + 1 - ww)).long()
    rows = torch.arange(b)[:, None].expand(b, per)

    def at(yy, xx):
        return table[rows, :, yy, xx]

    sums = at(y0 + hh, x0 + ww) - at(y0, x0 + ww) - at(y0 + hh, x0) + at(y0, x0)
    return torch.nn.functional.normalize(sums.reshape(-1, c), dim=1).numpy()


def gallery(srcs, n: int, out: np.ndarray, seed: int = 0, block: int = 256) -> None:
    """Fill ``out`` (n x d, a memory map) with the real catalog vectors, then windows."""
    rng = np.random.default_rng(seed)
    plain, catalog = srcs[0]
    filled = 0
    for s in range(0, len(catalog), block):
        v = pooled(np.asarray(plain[catalog[s:s + block]], np.float32))[:n - filled]
        out[filled:filled + len(v)] = v
        filled += len(v)
    per = max(1, -(-(n - filled) // sum(len(rows) for _, rows in srcs)))
    while filled < n:
        for maps, rows in srcs:
            for s in range(0, len(rows), block):
                if filled >= n:
                    return
                v = windows(maps[rows[s:s + block]], per, rng)[:n - filled]
                out[filled:filled + len(v)] = v
                filled += len(v)


def exact_top(queries: np.ndarray, vectors: np.ndarray, block: int = 100_000) -> np.ndarray:
    """The exact top-``K`` scores of each query (a matrix product over the gallery, in blocks)."""
    best = np.full((len(queries), 0), 0, np.float32)
    q = torch.from_numpy(queries)
    for s in range(0, len(vectors), block):
        scores = (q @ torch.from_numpy(np.asarray(vectors[s:s + block])).T).topk(min(K, len(vectors) - s))[0]
        best = -np.sort(-np.concatenate([best, scores.numpy()], axis=1), axis=1)[:, :K]
    return best


def quality(found: np.ndarray, queries: np.ndarray, vectors: np.ndarray, truth: np.ndarray) -> dict:
    """recall@10 and the first result's agreement, by exact score, so that ties count as found (the
    gallery holds exact duplicates: a window can be drawn twice, and the whole map is one): a found
    item counts when its true score reaches the exact 10th (or first) score, less 1e-5."""
    rows = np.unique(found[found >= 0])
    lookup = dict(zip(rows.tolist(), range(len(rows))))
    vecs = np.asarray(vectors[rows])
    score = np.array([[float(q @ vecs[lookup[i]]) if i >= 0 else -np.inf for i in f] for q, f in zip(queries, found)])
    return {"recall_at_10": round(float(np.mean((score[:, :K] >= truth[:, K - 1:K] - 1e-5).sum(1) / K)), 4),
            "same_first": round(float(np.mean(score[:, 0] >= truth[:, 0] - 1e-5)), 4)}


def timed(search, queries: np.ndarray, batch: int, reps: int = 120) -> float:
    """ms a query, one thread, over ``reps`` calls of ``batch`` queries."""
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    search(queries[:batch])  # warm
    t = time.perf_counter()
    for r in range(reps):
        s = (r * batch) % (len(queries) - batch)
        search(queries[s:s + batch])
    torch.set_num_threads(threads[0])
    faiss.omp_set_num_threads(threads[1])
    return round((time.perf_counter() - t) / (reps * batch) * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "cache-lite0-224")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 200_000, 1_000_000])
    parser.add_argument("--train-sample", type=int, default=50_000)
    parser.add_argument("--work", type=Path, default=None, help="folder for the gallery file (default: a temporary one)")
    args = parser.parse_args()
    srcs, buyer_maps = sources(args.cache)
    queries = pooled(buyer_maps)
    cfg = IndexConfig()  # what `fashionlens index` picks by default
    sizes = dict(flat_max=cfg.flat_max, ivf_flat_max=cfg.ivf_flat_max)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for n in args.sizes:
            path = Path(tmp) / f"gallery-{n}.npy"
            t = time.perf_counter()
            vectors = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, queries.shape[1]))
            gallery(srcs, n, vectors)
            vectors.flush()
            made = time.perf_counter() - t
            truth = exact_top(queries, vectors)
            auto = choose_spec(n, queries.shape[1], **sizes).kind
            sample = np.asarray(vectors[np.sort(np.random.default_rng(0).choice(n, min(n, args.train_sample),
                                                                                 replace=False))])
            print(f"n={n:,}: gallery {made:.0f} s, auto -> {auto}", flush=True)

            def measure(kind: str, **spec_kw) -> None:
                spec = choose_spec(n, queries.shape[1], kind, train_sample=args.train_sample, **spec_kw)
                default = kind == auto and spec_kw.get("pq_bytes", cfg.pq_bytes) == cfg.pq_bytes
                index = new_index(spec)
                if hasattr(index, "do_polysemous_training"):
                    index.do_polysemous_training = False
                t0 = time.perf_counter()
                if not index.is_trained:
                    index.train(sample)
                for s in range(0, n, 100_000):
                    index.add_with_ids(np.ascontiguousarray(vectors[s:s + 100_000]), np.arange(s, min(n, s + 100_000)))
                build = time.perf_counter() - t0
                size = faiss.serialize_index(index).size / n
                probes = [spec.nprobe] if kind == "flat" else sorted({16, 32, 64, spec.nprobe})
                for nprobe in probes:
                    if nprobe is not None:
                        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
                    for rerank in ([None] if kind != "ivfpq" else [None, 100, 200, 400]):
                        if rerank:
                            def find(q, r=rerank):
                                ids = search_index(index, q, r)[1]
                                return rerank_exact(q, ids, lambda i: (i, np.asarray(vectors[i])), K)[1]
                        else:
                            def find(q):
                                return search_index(index, q, K)[1]
                        found = np.concatenate([find(queries[s:s + 32]) for s in range(0, len(queries), 32)])
                        row = {"n": n, "index": spec.factory, "kind": kind, "nprobe": nprobe,
                               "rerank": rerank, **quality(found, queries, vectors, truth),
                               "ms_per_query_batch1": timed(find, queries, 1),
                               "ms_per_query_batch4": timed(find, queries, 4),
                               "bytes_per_vector_in_memory": round(size), "build_seconds": round(build, 1),
                               "auto_default": default and nprobe == spec.nprobe and rerank == spec.rerank}
                        rows.append(row)
                        print({k: v for k, v in row.items() if k != "n"}, flush=True)

            if n <= 200_000:
                measure("flat")
            if n <= 2 * cfg.ivf_flat_max:
                measure("ivfflat")
            measure("ivfpq", pq_bytes=64)  # the earlier default's 64-byte codes (measured with and without re-scoring)
            measure("ivfpq", pq_bytes=cfg.pq_bytes, rerank=cfg.rerank)
            path.unlink()  # the map stays readable until it is dropped
    emit({"benchmark": "index_recall", "queries": "consumer/validation (341 buyers' photos, Lite0 224 px)",
          "gallery": "Lite0 vectors of catalog photos: whole maps, then random windows of >= 4 x 4 cells "
                     "of the plain and cached augmented views' maps", "k": K,
          "train_sample": args.train_sample, "rows": rows})


if __name__ == "__main__":
    main()
