"""Latency of one photo's search (decode + letterbox + embed + FAISS search + metadata), model loaded.

    python benchmarks/search_latency.py INDEX_DIR [QUERY_FOLDER] [--n 200]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import SHARED, emit, percentile

from fashionlens.data.catalog import iter_image_folder
from fashionlens.index.query import Searcher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("index")
    parser.add_argument("queries", nargs="?", default=str(SHARED / "consumer" / "test"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    photos = [it.path for it in iter_image_folder(Path(args.queries))][: args.n]
    searcher = Searcher(Path(args.index))
    for p in photos[:5]:  # warm-up
        searcher.search_paths([p], args.k)
    times = []
    for p in photos:
        t = time.perf_counter()
        searcher.search_paths([p], args.k)
        times.append((time.perf_counter() - t) * 1000)
    emit({"benchmark": "search_latency", "index": args.index, "items": searcher.index.store.count("embedded"),
          "index_spec": searcher.index.spec.factory, "queries": len(times), "k": args.k,
          "p50_ms": round(percentile(times, 50), 1), "p99_ms": round(percentile(times, 99), 1),
          "mean_ms": round(sum(times) / len(times), 1)})


if __name__ == "__main__":
    main()
