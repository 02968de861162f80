"""A bounded load test of ``fashionlens serve`` on localhost, against the model alone.

    python benchmarks/serve_load.py INDEX_DIR [--photos DIR] [--requests 500] [--concurrency 8]

1. The model alone: the index's own embedder on the same query photos, already decoded, in
   batches of ``max_batch`` (the server's batch size): photos per second. This is the ceiling of
   any server on this machine. Measured before and after the load (a shared machine's speed
   drifts within minutes); the share is taken against the mean of the two.
2. The server as a separate process (default settings), ``--concurrency`` clients each sending
   multipart searches one after the other (keep-alive), ``--requests`` in all after a warm-up:
   latency percentiles, throughput, errors, and the server's own batch sizes (from /metrics).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from _common import SHARED, emit, percentile

from fashionlens.config import ServeConfig
from fashionlens.data.catalog import iter_image_folder
from fashionlens.data.images import open_image
from fashionlens.index import CatalogIndex
from fashionlens.index.query import embedder_for
from fashionlens.serving.process import Server


def model_alone(index_dir: Path, photos: list[Path], batch: int, rounds: int = 3) -> float:
    """Photos per second of the embedder alone (decoded photos, batches of ``batch``)."""
    index = CatalogIndex(index_dir)
    try:
        embedder = embedder_for(index)
    finally:
        index.close()
    images = [open_image(p, draft_size=embedder.preprocess.size) for p in photos]
    embedder.embed_images(images[:batch])  # warm-up
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for start in range(0, len(images), batch):
            embedder.embed_images(images[start:start + batch])
        best = max(best, len(images) / (time.perf_counter() - t))
    return best


def load(url: str, photos: list[bytes], n: int, concurrency: int, k: int, explain: bool) -> tuple[list, list]:
    latencies, errors, lock, counter = [], [], threading.Lock(), iter(range(n))

    def client(_):
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                try:
                    r = c.post("/api/search", files={"image": ("q.jpg", photos[i % len(photos)], "image/jpeg")},
                               data={"k": str(k), "explain": str(explain).lower()})
                    ok = r.status_code == 200 and len(r.json()["results"]) == k
                except httpx.HTTPError as exc:
                    ok, r = False, exc
                ms = (time.perf_counter() - t) * 1000
                with lock:
                    latencies.append(ms)
                    if not ok:
                        errors.append(str(getattr(r, "status_code", r)))

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    return latencies, errors


def cpu_idle() -> tuple[int, int]:
    """(idle, total) jiffies of the whole machine so far (Linux /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_sizes(metrics: str) -> float | None:
    total = re.search(r"^fashionlens_embed_batch_size_sum ([\d.e+]+)", metrics, re.M)
    count = re.search(r"^fashionlens_embed_batch_size_count ([\d.e+]+)", metrics, re.M)
    return round(float(total.group(1)) / float(count.group(1)), 2) if total and count and float(count.group(1)) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index")
    parser.add_argument("--photos", default=str(SHARED / "consumer" / "test"))
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("-k", type=int, default=12)
    parser.add_argument("--explain", action="store_true", help="explained searches (needs index-attributes)")
    parser.add_argument("--config", help="the server's YAML config (default: its defaults)")
    args = parser.parse_args()
    paths = [it.path for it in iter_image_folder(Path(args.photos))][:200]
    photos = [p.read_bytes() for p in paths]
    batch = ServeConfig.load(args.config).max_batch
    before = model_alone(Path(args.index), paths, batch)
    with Server(Path(args.index), config=args.config) as srv:
        load(srv.url, photos, args.warmup, args.concurrency, args.k, args.explain)
        t, server_cpu, client_cpu = time.perf_counter(), cpu_seconds(srv.proc.pid), time.process_time()
        idle = cpu_idle()
        latencies, errors = load(srv.url, photos, args.requests, args.concurrency, args.k, args.explain)
        seconds = time.perf_counter() - t
        idle = [b - a for a, b in zip(idle, cpu_idle())]
        server_cpu, client_cpu = cpu_seconds(srv.proc.pid) - server_cpu, time.process_time() - client_cpu
        metrics = srv.client.get("/metrics").text
        items = srv.client.get("/health").json()["items"]
    after = model_alone(Path(args.index), paths, batch)
    alone = (before + after) / 2
    throughput = len(latencies) / seconds
    emit({"benchmark": "serve_load", "index": args.index, "items": items, "photos": len(photos),
          "requests": len(latencies), "concurrency": args.concurrency, "k": args.k, "explain": args.explain,
          "errors": len(errors), "error_samples": errors[:5],
          "p50_ms": round(percentile(latencies, 50), 1), "p90_ms": round(percentile(latencies, 90), 1),
          "p99_ms": round(percentile(latencies, 99), 1), "max_ms": round(max(latencies), 1),
          "mean_ms": round(statistics.mean(latencies), 1), "seconds": round(seconds, 2),
          "throughput_rps": round(throughput, 2), "model_alone_photos_per_s": round(alone, 2),
          "model_alone_before_after": [round(before, 2), round(after, 2)],
          "throughput_share_of_model": round(throughput / alone, 3),
          "mean_server_batch": batch_sizes(metrics),
          # the load generator runs on the same cores: its CPU time is taken from the server's
          "server_cpu_ms_per_request": round(1000 * server_cpu / len(latencies), 1),
          "client_cpu_ms_per_request": round(1000 * client_cpu / len(latencies), 1),
          "machine_idle_share_under_load": round(idle[0] / idle[1], 3) if idle[1] else None,
          "model_alone_cpu_ms_per_photo": round(1000 * os.cpu_count() / alone, 1)})


if __name__ == "__main__":
    main()
