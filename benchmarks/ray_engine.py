"""The Ray engine against the local engine on the same photos, in one run: images/s and peak memory.

Each arm runs the real ``fashionlens index`` in a subprocess on a fresh store, one after the
other (``--rounds`` times, alternating, so drift on a shared machine hits both): the embedding
rate the command reports (its ``img/s``: decode + model, the model's loading excluded; and the
rate after its first batch came back, which also leaves out an engine's start-up: Ray's workers
and actors starting, each loading the model), the end-to-end rate
(Python, model and, for Ray, the local cluster's start-up included), and the peak memory of the
whole process tree (the command, Ray's raylet, GCS and workers): the sum of every process's
proportional set size (``Pss`` in ``/proc/PID/smaps_rollup``, so pages shared between processes,
such as Ray's object store, count once), sampled every 0.2 s.

    python benchmarks/ray_engine.py --limit 2000 [--rounds 2]
    taskset -c 1 python benchmarks/ray_engine.py --config one-core.yaml    # one core (ray_cpus: 1, OMP_NUM_THREADS=1)
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import SHARED, emit

ARMS = {
    "local": ["--engine", "local"],
    "local-1-worker": ["--engine", "local", "--workers", "1"],
    "ray": ["--engine", "ray"],
    "ray-to-milvus-lite": ["--engine", "ray"],
}


def tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def pss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run(cmd: list[str], cwd: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**os.environ, "COLUMNS": "250"})
    peak, done = 0.0, threading.Event()

    def sample():
        nonlocal peak
        while not done.wait(0.2):
            peak = max(peak, pss_mb(tree(proc.pid)))
    threading.Thread(target=sample, daemon=True).start()
    out, err = proc.communicate()
    done.set()
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(err[-3000:])
    line = next((x for x in err.splitlines() if "embedded at" in x), "")
    rate = re.search(r"embedded at ([\d.]+) img/s \(([\d.]+) after a ([\d.]+) s start\)", line)
    embedded = re.search(r"([\d,]+) embedded", line)
    n = int(embedded.group(1).replace(",", "")) if embedded else 0
    return {"items": n, "images_per_second": float(rate.group(1)) if rate else None,
            "steady_images_per_second": float(rate.group(2)) if rate else None,
            "startup_seconds": float(rate.group(3)) if rate else None,
            "end_to_end_images_per_second": round(n / wall, 2), "wall_seconds": round(wall, 1),
            "peak_pss_mb": round(peak), "line": line.strip()}


def decode_rate(paths: list[str], size: int = 224) -> float:
    """Photos a second one core decodes and letterboxes (the Ray engine's decode task, in this
    process): what bounds a GPU node, whose model outruns its CPUs' decoding."""
    from fashionlens.index.engines.ray import decode_batch

    decode_batch({"key": paths[:20], "path": paths[:20]}, size)  # warm the imports
    start = time.perf_counter()
    out = decode_batch({"key": paths, "path": paths}, size)
    assert not any(out["error"]), out["error"]
    return round(len(paths) / (time.perf_counter() - start), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--catalog", default=str(SHARED / "catalog"))
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--decode", type=int, default=500, help="photos for the one-core decode rate (0: skip)")
    parser.add_argument("--config", help="a YAML of index settings for every arm (e.g. ray_cpus: 1 when the run "
                        "is pinned to one core with taskset)")
    args = parser.parse_args()
    src = Path(args.catalog)
    src = next(src.glob("*.csv")) if src.is_dir() else src
    exe = str(Path(sys.executable).parent / "fashionlens")
    results: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open(src, newline="") as fh, open(tmp / "catalog.csv", "w", newline="") as out:
            reader, writer = csv.reader(fh), csv.writer(out)
            writer.writerow(next(reader) + ["path"])
            for row in list(reader)[:args.limit]:
                writer.writerow(row + [str((src.parent / "images" / f"{row[0]}.jpg").resolve())])
        decode = None
        if args.decode:
            import torch

            torch.set_num_threads(1)
            paths = [row[-1] for row in csv.reader(open(tmp / "catalog.csv"))][1:args.decode + 1]
            decode = decode_rate(paths)
        for r in range(args.rounds):
            for arm in args.arms:
                store = (f"milvus+lite://{tmp}/{arm}-{r}.db/items" if "milvus" in arm else str(tmp / f"{arm}-{r}"))
                extra = ["--config", str(Path(args.config).resolve())] if args.config else []
                results[arm].append(run([exe, "index", str(tmp / "catalog.csv"), "--store", store, *ARMS[arm], *extra],
                                        tmp))
                print(arm, results[arm][-1], file=sys.stderr)
    def best(runs, key):
        return max(x[key] for x in runs)

    local = results.get("local")
    summary = {arm: {"images_per_second_best": best(runs, "images_per_second"),
                     "steady_images_per_second_best": best(runs, "steady_images_per_second"),
                     "startup_seconds_min": min(x["startup_seconds"] for x in runs),
                     "end_to_end_best": best(runs, "end_to_end_images_per_second"),
                     "peak_pss_mb_max": best(runs, "peak_pss_mb"),
                     "vs_local": local and round(best(runs, "images_per_second") / best(local, "images_per_second"), 3),
                     "steady_vs_local": local and round(best(runs, "steady_images_per_second")
                                                        / best(local, "steady_images_per_second"), 3)}
               for arm, runs in results.items()}
    emit({"benchmark": "ray_engine", "photos": args.limit, "rounds": args.rounds, "config": args.config and
          Path(args.config).read_text(), "cpus_allowed": len(os.sched_getaffinity(0)), "summary": summary,
          "decode_letterbox_one_core_images_per_second": decode, "runs": results})


if __name__ == "__main__":
    main()
