"""Searches while a writable server rebuilds an outgrown index beside the one in use.

    python benchmarks/serve_rebuild.py FLAT_INDEX --work DIR [--round 100] [--after 3] [--concurrency 8]

FLAT_INDEX is an exact (``IDMap2,Flat``) index of more than ``flat_max`` items, as a catalog
grown by a server's adds leaves it (``index_scale.py --index-type flat --keep DIR`` makes one).
The script copies it to ``--work`` (the chunk files hard-linked: they never change), sets its
``index_type`` to ``auto``, and then, with ``--concurrency`` clients searching by photo:

1. a read-only server on the copy (no rebuild: readers keep the saved structure): ``--before``
   rounds of ``--round`` searches;
2. a writable server on the copy, which starts serving on the flat index at once and rebuilds it
   (IVF-Flat or IVF-PQ by size) in a low-priority thread; rounds of searches until its log says
   the new index is in use, then ``--after`` rounds on the new index.

Per phase: searches/s, p50/p99 latency, errors; and the rebuild's time from the server's log.
A round that spans the swap (the new index's last catch-up and its commit, under the lock) is
counted in neither phase; it is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from _common import SHARED, emit, percentile
from serve_load import load

from fashionlens.data.catalog import iter_image_folder
from fashionlens.cli.serve_process import Server

KEY = "benchmark-key-0123456789"


def copy_index(src: Path, dst: Path) -> None:
    """The index folder, its chunk files hard-linked (copied across file systems)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(".lock"))
    with closing(sqlite3.connect(dst / "catalog.sqlite")) as db:
        settings = json.loads(db.execute("SELECT value FROM meta WHERE key='index_settings'").fetchone()[0])
        db.execute("UPDATE meta SET value=? WHERE key='index_settings'", (json.dumps({**settings, "index_type": "auto"}),))
        db.commit()


def _link_or_copy(src: str, dst: str) -> None:
    if "vectors" in Path(src).parts:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def peak_rss_mb(pid: int) -> int | None:
    """A process's peak resident memory so far (Linux /proc), in MB."""
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) // 1024 if found else None


def summary(latencies: list[float], errors: int, seconds: float) -> dict:
    if not latencies:
        return {"requests": 0}
    return {"requests": len(latencies), "errors": errors, "seconds": round(seconds, 1),
            "throughput_rps": round(len(latencies) / seconds, 2), "p50_ms": round(percentile(latencies, 50), 1),
            "p99_ms": round(percentile(latencies, 99), 1), "max_ms": round(max(latencies), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index")
    parser.add_argument("--work", required=True, help="folder for the copy (replaced)")
    parser.add_argument("--photos", default=str(SHARED / "consumer" / "test"))
    parser.add_argument("--round", type=int, default=100, help="searches a round")
    parser.add_argument("--before", type=int, default=3, help="rounds on the read-only server")
    parser.add_argument("--after", type=int, default=3, help="rounds once the new index is in use")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="give up waiting for the rebuild")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--config", help="the server's YAML config (default: its defaults)")
    args = parser.parse_args()
    photos = [it.path.read_bytes() for it in iter_image_folder(Path(args.photos))][:200]
    copy = Path(args.work) / "idx"
    copy_index(Path(args.index), copy)

    def rounds(srv, stop) -> list[tuple[str, list[float], int, float]]:
        out = []
        while not stop(out):
            swapped_before = any(" in use: " in line for line in srv.log)
            t = time.perf_counter()
            latencies, errors = load(srv.url, photos, args.round, args.concurrency, 12, False, "plain")
            swapped_after = any(" in use: " in line for line in srv.log)
            phase = "after" if swapped_before else "during" if not swapped_after else "span"
            out.append((phase, latencies, len(errors), time.perf_counter() - t))
        return out

    def phase(done, name):
        picked = [r for r in done if r[0] == name]
        return summary([ms for r in picked for ms in r[1]], sum(r[2] for r in picked), sum(r[3] for r in picked))

    with Server(copy, config=args.config) as srv:  # read-only: no rebuild
        load(srv.url, photos, 40, args.concurrency, 12, False, "plain")
        before = rounds(srv, lambda out: len(out) >= args.before)
    started = time.monotonic()
    with Server(copy, api_key=KEY, config=args.config) as srv:
        ready = time.monotonic() - started
        load(srv.url, photos, 40, args.concurrency, 12, False, "plain")
        deadline = time.monotonic() + 60 * args.max_minutes
        done = rounds(srv, lambda out: sum(r[0] == "after" for r in out) >= args.after or time.monotonic() > deadline)
        items = srv.client.get("/health").json()["items"]
        peak_mb = peak_rss_mb(srv.proc.pid)
        log = "".join(srv.log)
    built = re.search(r"index (\S+) in use: ([\d,]+) vectors, rebuilt in (\d+) s", log)
    emit({"benchmark": "serve_rebuild", "index": args.index, "items": items, "concurrency": args.concurrency,
          "round": args.round, "writable_server_ready_s": round(ready, 1), "writable_server_peak_rss_mb": peak_mb,
          "rebuilt_as": built.group(1) if built else None, "rebuild_s": int(built.group(3)) if built else None,
          "read_only_flat": phase([("x", *r[1:]) for r in before], "x"),
          "during_rebuild": phase(done, "during"), "after_rebuild": phase(done, "after"),
          "rounds_spanning_the_swap": sum(r[0] == "span" for r in done), "spanning_the_swap": phase(done, "span"),
          "server_log": [line.strip() for line in srv.log if " INFO " in line or " ERROR " in line][-8:]})


if __name__ == "__main__":
    main()
