"""Memory and time of the index machinery at catalog sizes this CPU cannot embed for real.

A CSV of N rows (all pointing at one real image) goes through the real catalog sync into SQLite;
random unit vectors stand in for the embeddings and go through the real chunk store; then the
real ``refresh`` builds the FAISS index of the type ``fashionlens index`` picks by default
(exact up to ``flat_max``, IVF-Flat up to ``ivf_flat_max``, IVF-PQ with an exactly re-scored
shortlist above) one chunk at a time, and single-vector searches through ``CatalogIndex.search``
(results with metadata, and the re-scoring's reads of the chunk files) are timed. Peak resident
memory is the whole process's. (Random vectors have no neighbours to speak of: recall is
measured by ``index_recall.py`` on real ones.)

    python benchmarks/index_scale.py --n 1000000 [--dim 1280]
    # a 100,000-item index of Lite0 vectors of real photos, kept, to serve under load
    python benchmarks/index_scale.py --n 100000 --vectors lite0 --keep /var/tmp/idx100k
    python benchmarks/serve_load.py /var/tmp/idx100k/idx --requests 500 --concurrency 8
"""

from __future__ import annotations

import argparse
import csv
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, emit, percentile

from fashionlens.data.catalog import open_catalog
from fashionlens.index.config import IndexConfig
from fashionlens.index.catalog_index import INDEX_SETTINGS, CatalogIndex
from fashionlens.index.pipeline import IndexReport, Progress, sync_catalog


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--index-type", default="auto")
    parser.add_argument("--rerank", type=int, default=None, help="IVF-PQ shortlist re-scored (default: the index default)")
    parser.add_argument("--vectors", choices=("random", "lite0"), default="random",
                        help="lite0: Lite0 vectors of real photos, as index_recall.py makes them (needs the cached "
                             "maps; the gallery is then also held in memory, so the peak memory is not the command's)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="build the index in this new folder and keep it (e.g. for serve_load.py)")
    args = parser.parse_args()
    if args.keep is not None and args.keep.exists():
        raise SystemExit(f"{args.keep} exists; --keep makes a new index folder")
    rng = np.random.default_rng(0)
    # Load and run the real model first, then drop it, as `fashionlens index` does before its
    # FAISS build, so that the peak memory below is the command's own.
    from fashionlens.models import build_embedder
    from PIL import Image

    embedder = build_embedder()
    embedder.embed_images([Image.new("RGB", (224, 224))] * 8)
    described = embedder.describe()
    del embedder
    real = None
    if args.vectors == "lite0":
        from index_recall import gallery, sources

        real = np.empty((args.n, args.dim), np.float32)
        gallery(sources(REPO / "runs" / "cache-lite0-224")[0], args.n, real)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        if args.keep is not None:
            args.keep.mkdir(parents=True)
            tmp = str(args.keep.resolve())
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
        # with real Lite0 vectors, the real model's record, so that `serve` embeds queries with it
        store.set_meta("embedder", described if real is not None else {"model": "random", "dim": args.dim, "letterbox": 0})
        settings = IndexConfig(index_type=args.index_type).model_dump()  # the defaults of `fashionlens index`
        if args.rerank is not None:
            settings["rerank"] = args.rerank
        store.set_meta("index_settings", {k: settings[k] for k in INDEX_SETTINGS})
        store.set_meta("config", {"command": "index", "catalog": str(catalog), **settings})
        t0 = time.perf_counter()
        for page in store.pending(args.chunk):
            ids = np.array([r for r, _ in page], np.int64)
            if real is not None:
                vecs, real = real[:len(ids)], real[len(ids):]
            else:
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
          "nprobe": spec.nprobe, "rerank": spec.rerank, "sync_seconds": round(t_sync, 1), "chunk_write_seconds": round(t_chunks, 1),
          "faiss_build_seconds": round(t_refresh, 1), "faiss_file_mb": round(index_bytes / 2**20),
          "search_p50_ms": round(percentile(lat, 50), 2), "search_p99_ms": round(percentile(lat, 99), 2),
          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})


if __name__ == "__main__":
    main()
