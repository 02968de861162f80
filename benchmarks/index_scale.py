"""Memory and time of the index machinery at catalog sizes this CPU cannot embed for real.

A CSV of N rows (all pointing at one real image) goes through the real catalog sync into SQLite;
random unit vectors stand in for the embeddings and go through the real chunk store; then the
real ``refresh`` builds the FAISS index (exact below ``flat_max``, IVF-PQ above) one chunk at a
time, and single-vector searches are timed. Peak resident memory is the whole process's.

    python benchmarks/index_scale.py --n 1000000 [--dim 1280]
"""

from __future__ import annotations

import argparse
import csv
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import emit, percentile

from fashionlens.data.catalog import open_catalog
from fashionlens.index.catalog_index import CatalogIndex
from fashionlens.index.pipeline import IndexReport, Progress, sync_catalog


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--index-type", default="auto")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # Load and run the real model first, then drop it, as `fashionlens index` does before its
    # FAISS build, so that the peak memory below is the command's own.
    from fashionlens.models import build_embedder
    from PIL import Image

    embedder = build_embedder()
    embedder.embed_images([Image.new("RGB", (224, 224))] * 8)
    del embedder
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        image = Path(tmp) / "x.jpg"
        Image.new("RGB", (8, 8)).save(image)
        catalog = Path(tmp) / "catalog.csv"
        with open(catalog, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "path", "articleType", "baseColour"])
            for i in range(args.n):
                w.writerow([f"sku{i:08d}", str(image), ("Tshirts", "Jeans", "Dresses")[i % 3], "Blue"])
        index = CatalogIndex(Path(tmp) / "idx", create=True)
        t0 = time.perf_counter()
        sync_catalog(index, open_catalog(catalog), IndexReport(), Progress())
        t_sync = time.perf_counter() - t0
        store = index.store
        store.set_meta("embedder", {"model": "random", "dim": args.dim, "letterbox": 0})
        store.set_meta("index_settings", {"index_type": args.index_type, "flat_max": 100_000,
                                          "train_sample": 50_000})
        t0 = time.perf_counter()
        for page in store.pending(args.chunk):
            ids = np.array([r for r, _ in page], np.int64)
            vecs = rng.standard_normal((len(ids), args.dim), dtype=np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            chunk = store.next_chunk()
            index.chunks.write(chunk, ids, vecs)
            store.commit_chunk(chunk, ids.tolist(), [])
        t_chunks = time.perf_counter() - t0
        t0 = time.perf_counter()
        spec = index.refresh()
        t_refresh = time.perf_counter() - t0
        queries = rng.standard_normal((200, args.dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        lat = []
        for q in queries:
            t = time.perf_counter()
            index.search(q[None], 10)
            lat.append((time.perf_counter() - t) * 1000)
        index_bytes = sum(p.stat().st_size for p in (Path(tmp) / "idx").glob("index-*.faiss"))
        index.close()
    emit({"benchmark": "index_scale", "n": args.n, "dim": args.dim, "index": spec.factory,
          "nprobe": spec.nprobe, "sync_seconds": round(t_sync, 1), "chunk_write_seconds": round(t_chunks, 1),
          "faiss_build_seconds": round(t_refresh, 1), "faiss_file_mb": round(index_bytes / 2**20),
          "search_p50_ms": round(percentile(lat, 50), 2), "search_p99_ms": round(percentile(lat, 99), 2),
          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})


if __name__ == "__main__":
    main()
