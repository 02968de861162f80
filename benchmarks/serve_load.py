"""A bounded load test of ``fashionlens serve`` on localhost, against the model alone.

    python benchmarks/serve_load.py INDEX_DIR [--photos DIR] [--requests 500] [--concurrency 8]

1. The model alone: the index's own embedder on the same query photos, already decoded:
   photos per second in one stream on all cores, and in as many streams side by side as the
   server's ``model_workers`` (at least two) each on its share of the cores, each at batch sizes
   1, 2, 3, 4, 8 up to what one model call of that layout may take (``max_batch``, or its share
   per worker). The fastest is the ceiling of any server on this machine (on a small CPU the
   model is fastest at a few photos a call, not at the largest batch).
   Measured before and after the load (a shared machine's speed drifts within minutes); the
   share is taken against the mean of the two.
2. The server as a separate process (default settings), ``--concurrency`` clients each sending
   multipart searches one after the other (keep-alive), ``--requests`` in all after a warm-up:
   latency percentiles, throughput, errors, and the server's own batch sizes (from /metrics).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from _common import SHARED, emit, percentile

from fashionlens.serving.config import ServeConfig
from fashionlens.config import usable_cores
from fashionlens.data.catalog import iter_image_folder
from fashionlens.data.images import open_image
from fashionlens.index import CatalogIndex
from fashionlens.index.query import embedder_for
from fashionlens.cli.serve_process import Server


def decoded(index_dir: Path, photos: list[Path]) -> tuple:
    """The index's embedder and ``photos`` decoded as the server decodes uploads."""
    index = CatalogIndex(index_dir)
    try:
        embedder = embedder_for(index)
    finally:
        index.close()
    return embedder, [open_image(p, draft_size=embedder.preprocess.size) for p in photos]


def model_alone(embedder, images: list, batch: int, threads: int, rounds: int = 3, streams: int = 1) -> float:
    """Photos per second of the embedder alone (decoded photos, batches of ``batch``), in
    ``streams`` threads side by side, each on ``threads`` torch threads (as the server's
    ``model_workers``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        embedder.embed_images(images[:batch])  # warm-up
        share = [images[s::streams] for s in range(streams)]

        def run(part):
            for start in range(0, len(part), batch):
                embedder.embed_images(part[start:start + batch])
        best = 0.0
        with ThreadPoolExecutor(streams) as pool:
            for _ in range(rounds):
                t = time.perf_counter()
                list(pool.map(run, share))
                best = max(best, len(images) / (time.perf_counter() - t))
        return best
    finally:
        torch.set_num_threads(before)


def multipart(photo: bytes, fields: dict[str, str], boundary: str) -> bytes:
    """A multipart/form-data body: the photo as ``image`` and the text ``fields``."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
                 f'Content-Type: image/jpeg\r\n\r\n'.encode() + photo + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def load(url: str, photos: list[bytes], n: int, concurrency: int, k: int, explain: bool,
         client_kind: str = "plain") -> tuple[list, list]:
    """``n`` searches from ``concurrency`` client threads, each one after the other on a
    keep-alive connection; every answer is checked (200 and k results).

    ``plain`` (default) sends request bodies encoded once beforehand through the standard
    library's http.client; ``httpx`` encodes each request with httpx, as an application would.
    The client shares the server's cores, so the lighter it is, the less it takes from the server."""
    latencies, errors, lock, counter = [], [], threading.Lock(), iter(range(n))
    boundary = "fashionlens-load-test-boundary"
    fields = {"k": str(k), "explain": str(explain).lower()}
    bodies = [multipart(p, fields, boundary) for p in photos] if client_kind == "plain" else []
    host, port = url.split("://", 1)[1].rsplit(":", 1)

    def send(conn, i):
        if client_kind == "plain":
            conn.request("POST", "/api/search", body=bodies[i % len(bodies)],
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            r = conn.getresponse()
            body = r.read()
            return r.status, (json.loads(body) if r.status == 200 else None)
        r = conn.post("/api/search", files={"image": ("q.jpg", photos[i % len(photos)], "image/jpeg")}, data=fields)
        return r.status_code, (r.json() if r.status_code == 200 else None)

    def client(_):
        conn = (http.client.HTTPConnection(host, int(port), timeout=60) if client_kind == "plain"
                else httpx.Client(base_url=url, timeout=60))
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                try:
                    status, doc = send(conn, i)
                    ok, what = status == 200 and len(doc["results"]) == k, status
                except (httpx.HTTPError, OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as exc:
                    ok, what = False, exc
                    if client_kind == "plain":  # a broken connection is not reused
                        conn.close()
                ms = (time.perf_counter() - t) * 1000
                with lock:
                    latencies.append(ms)
                    if not ok:
                        errors.append(str(what))
        finally:
            conn.close()

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


def batch_sizes_upto(cap: int) -> list[int]:
    """The batch sizes the ceiling is measured at: 1, 2, 3, 4, 8 up to ``cap``, and ``cap``."""
    return sorted({b for b in (1, 2, 3, 4, 8) if b <= cap} | {cap})


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
    parser.add_argument("--client", choices=("plain", "httpx"), default="plain",
                        help="plain: bodies encoded once, http.client (light); httpx: encoded per request")
    args = parser.parse_args()
    paths = [it.path for it in iter_image_folder(Path(args.photos))][:200]
    photos = [p.read_bytes() for p in paths]
    serve_cfg = ServeConfig.load(args.config)
    # the ceiling: the model's best on this machine, one stream on every core or as many
    # streams as the server's workers (at least two), whichever is faster
    streams = sorted({1, max(2, serve_cfg.resolved_model_workers())})

    embedder, images = decoded(Path(args.index), paths)

    layouts = [(n, b) for n in streams for b in batch_sizes_upto(serve_cfg.worker_batch(n))]

    def ceiling() -> dict[tuple[int, int], float]:
        return {(n, b): model_alone(embedder, images, b, serve_cfg.model_threads(n), streams=n) for n, b in layouts}
    before = ceiling()
    with Server(Path(args.index), config=args.config) as srv:
        load(srv.url, photos, args.warmup, args.concurrency, args.k, args.explain, args.client)
        t, server_cpu, client_cpu = time.perf_counter(), cpu_seconds(srv.proc.pid), time.process_time()
        idle = cpu_idle()
        latencies, errors = load(srv.url, photos, args.requests, args.concurrency, args.k, args.explain, args.client)
        seconds = time.perf_counter() - t
        idle = [b - a for a, b in zip(idle, cpu_idle())]
        server_cpu, client_cpu = cpu_seconds(srv.proc.pid) - server_cpu, time.process_time() - client_cpu
        metrics = srv.client.get("/metrics").text
        items = srv.client.get("/health").json()["items"]
    after = ceiling()
    per_layout = {key: (before[key] + after[key]) / 2 for key in layouts}
    best = max(per_layout, key=per_layout.get)
    alone = per_layout[best]
    throughput = len(latencies) / seconds
    emit({"benchmark": "serve_load", "index": args.index, "items": items, "photos": len(photos),
          "requests": len(latencies), "concurrency": args.concurrency, "client": args.client, "k": args.k, "explain": args.explain,
          "errors": len(errors), "error_samples": errors[:5],
          "p50_ms": round(percentile(latencies, 50), 1), "p90_ms": round(percentile(latencies, 90), 1),
          "p99_ms": round(percentile(latencies, 99), 1), "max_ms": round(max(latencies), 1),
          "mean_ms": round(statistics.mean(latencies), 1), "seconds": round(seconds, 2),
          "throughput_rps": round(throughput, 2), "model_alone_photos_per_s": round(alone, 2),
          "model_alone_before_after": [round(before[best], 2), round(after[best], 2)],
          "model_alone_photos_per_s_by_streams_and_batch": {f"{n}x{b}": round(v, 2) for (n, b), v in per_layout.items()},
          "model_alone_best": {"streams": best[0], "batch": best[1]},
          "throughput_share_of_model": round(throughput / alone, 3),
          "mean_server_batch": batch_sizes(metrics),
          # the load generator runs on the same cores: its CPU time is taken from the server's
          "server_cpu_ms_per_request": round(1000 * server_cpu / len(latencies), 1),
          "client_cpu_ms_per_request": round(1000 * client_cpu / len(latencies), 1),
          "machine_idle_share_under_load": round(idle[0] / idle[1], 3) if idle[1] else None,
          "model_alone_cpu_ms_per_photo": round(1000 * usable_cores() / alone, 1)})


if __name__ == "__main__":
    main()
