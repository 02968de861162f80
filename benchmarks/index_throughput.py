"""Indexing throughput and peak memory of `fashionlens index`, end to end (decode included).

Runs the real command in a subprocess on a fresh output folder and reads its peak resident
memory (children included) from the kernel. Usage:

    python benchmarks/index_throughput.py [--catalog CATALOG] [--limit N] [fashionlens index options, e.g. --batch-size 1]
"""

from __future__ import annotations

import argparse
import csv
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED, emit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--catalog", default=str(SHARED / "catalog"))
    parser.add_argument("--limit", type=int, default=0, help="index only the first N rows of the CSV")
    args, extra = parser.parse_known_args()  # unknown options go to `fashionlens index`
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(args.catalog)
        if args.limit:
            src = next(catalog.glob("*.csv")) if catalog.is_dir() else catalog
            rows = list(csv.reader(open(src)))
            sub = Path(tmp) / "catalog.csv"
            with open(sub, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(rows[0] + ["path"])
                for r in rows[1:args.limit + 1]:
                    w.writerow(r + [str((src.parent / "images" / f"{r[0]}.jpg").resolve())])
            catalog = sub
        exe = Path(sys.executable).parent / "fashionlens"
        start = time.perf_counter()
        proc = subprocess.run([str(exe), "index", str(catalog), "--out", str(Path(tmp) / "idx"), *extra],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(proc.stderr)
        info = subprocess.run([str(exe), "info", str(Path(tmp) / "idx")], capture_output=True, text=True)
        import json
        n = json.loads(info.stdout)["items"]["embedded"]
        rate = [line for line in proc.stderr.split("\n") if "img/s" in line]
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    emit({"benchmark": "index_throughput", "catalog": str(args.catalog), "items": n,
          "wall_seconds_total": round(wall, 1),
          "images_per_second_end_to_end_incl_startup": round(n / wall, 1),
          "embedding_line": rate[-1].strip() if rate else "",
          "peak_rss_mb": round(peak_mb)})


if __name__ == "__main__":
    main()
