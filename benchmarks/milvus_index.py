"""What each Milvus index type really gives in Milvus Lite (the embedded, pure-Python Milvus that
``MilvusClient("/path/x.db")`` opens), on Lite0 vectors of real photos, COSINE metric.

Galleries and queries are those of ``index_recall.py`` (catalog vectors, then random windows of the
cached Lite0 maps; the 341 buyers' photos of consumer ``validation/``); the truth is the exact top 10
by a matrix product. Each (size, type) runs in a child process of its own (so that its peak resident
memory is its own): a new .db folder, rows ``{"id", "vector", "metadata": {"gender"}}`` inserted
2,000 at a time and flushed (compaction drained), then ``create_index`` + ``load_collection``; then
one query a call through ``MilvusClient.search``, without and with the filter
``metadata["gender"] == "Men"`` (a quarter of the rows; its truth is the exact top 10 of those).
A type Milvus Lite refuses, or whose build passes ``--max-build-seconds``, is recorded with the
reason. IVF lists as the project picks them (a power of two near 4 sqrt(n), 2 sqrt(n) for IVF_PQ,
capped by the rows a segment trains on, <= 100,000 in Milvus Lite), 64 lists probed; HNSW M 32,
efConstruction 200, ef 128; DISKANN its defaults. The JSON is rewritten after every type (a size
run before and not rerun is kept).

    fashionlens train configs/recipe-cached-cpu.yaml        # makes runs/cache-lite0-224 (once)
    OMP_NUM_THREADS=1 python benchmarks/milvus_index.py --sizes 100000 1000000 \\
        --types FLAT HNSW IVF_FLAT IVF_SQ8 IVF_PQ DISKANN
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, emit, machine, percentile

K, DIM, BATCH = 10, 1280, 2000
GENDERS = ["Men", "Women", "Boys", "Girls"]
FILTER = 'metadata["gender"] == "Men"'
SEGMENT_ROWS = 100_000  # milvus_lite.constants.MAX_SEGMENT_ROWS: each segment's index trains on its own rows


def lists(n: int, per_sqrt: float) -> int:
    """The project's IVF list count (fashionlens.index.types.base.nlist), the sample being a segment."""
    want = int(2 ** round(math.log2(max(16.0, per_sqrt * math.sqrt(n)))))
    return min(want, int(2 ** math.floor(math.log2(max(16, min(n, SEGMENT_ROWS) // 39)))))


def params(kind: str, n: int) -> tuple[dict, dict]:
    """(build params, search params) of an index type at n vectors."""
    if kind == "HNSW":
        return {"M": 32, "efConstruction": 200}, {"ef": 128}
    if kind in ("IVF_FLAT", "IVF_SQ8"):
        return {"nlist": lists(n, 4)}, {"nprobe": min(lists(n, 4), 64)}
    if kind == "IVF_PQ":
        return {"nlist": lists(n, 2), "m": 128, "nbits": 8}, {"nprobe": min(lists(n, 2), 64)}
    return {}, {}  # FLAT, DISKANN (its defaults), anything else


def peak_rss_mb(field: str = "VmHWM") -> int:
    """This process's peak resident memory (VmRSS: the current one): VmHWM, as ``ru_maxrss`` of an
    exec'd child starts from its parent's peak (Linux keeps the larger across fork + exec)."""
    status = Path("/proc/self/status").read_text()
    if f"{field}:" not in status:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return round(int(status.split(f"{field}:")[1].split()[0]) / 1024)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def child(job: dict) -> None:
    """Build one type's collection and time its searches; writes job["result"] (JSON) and .npz."""
    from milvus_lite.server_manager import server_manager_instance
    from pymilvus import DataType, MilvusClient
    from fashionlens.index.stores.milvus import KEEPALIVE

    n, kind, db = job["n"], job["type"], Path(job["db"])
    genders = np.load(job["genders"])
    queries = np.load(job["queries"])
    client = MilvusClient(str(db), grpc_options=KEEPALIVE)  # see the store: long builds must not be pinged off
    lite = server_manager_instance._servers[os.path.abspath(db)][1]  # the in-process engine, to drain its worker

    def drain():
        lite.get_collection("items")._wait_for_bg()

    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=16)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    schema.add_field("metadata", DataType.JSON)
    client.create_collection("items", schema=schema)
    out = {"build_params": job["build"], "search_params": job["search"]}
    t = time.perf_counter()
    with open(job["gallery"], "rb") as f:  # read, not mapped: the gallery's pages stay out of this RSS
        for s in range(0, n, BATCH):
            v = np.fromfile(f, np.float32, count=min(BATCH, n - s) * DIM).reshape(-1, DIM)
            client.insert("items", [{"id": str(s + i), "vector": row.tolist(), "metadata": {"gender": GENDERS[g]}}
                                    for i, (row, g) in enumerate(zip(v, genders[s:s + BATCH]))])
            Path(job["built"] + ".rows").write_text(str(s + len(v)))  # for the record of a killed build
    client.flush("items")
    drain()
    out["insert_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    step = "create_index"
    try:
        index_params = client.prepare_index_params()
        # pymilvus 3 sends params as top-level pairs, which Milvus Lite drops (its defaults are then
        # built, silently); it reads a "params" pair only, so both are sent
        index_params.add_index(field_name="vector", index_type=kind, metric_type="COSINE",
                               params={**job["build"], "params": job["build"]})
        client.create_index("items", index_params)
        step = "load_collection"
        client.load_collection("items")
        drain()
    except Exception as e:  # noqa: BLE001 - a refusal is a result
        out.update(status="refused", step=step, reason=f"{type(e).__name__}: {e}"[:600],
                   seconds_to_refusal=round(time.perf_counter() - t, 1))
        Path(job["result"]).write_text(json.dumps(out))
        return
    out["index_s"] = round(time.perf_counter() - t, 1)
    Path(job["built"]).touch()
    col = lite.get_collection("items")
    out["segments"] = len(col._segment_cache)
    built = [s.indexes.get("vector") for s in col._segment_cache.values()]
    out["engine_index_classes"] = sorted({type(i).__name__ for i in built})
    faiss_ix = [getattr(i, "_index", None) for i in built]  # what was really built, per segment
    out["engine_built"] = sorted({json.dumps({"nlist": getattr(f, "nlist", None),
                                              "hnsw_M": f.hnsw.nb_neighbors(1) if hasattr(f, "hnsw") else None,
                                              "efConstruction": getattr(getattr(f, "hnsw", None), "efConstruction", None),
                                              "rows": i.num_vectors}) for f, i in zip(faiss_ix, built)})
    out["peak_rss_mb_after_load"], out["rss_mb_after_load"] = peak_rss_mb(), peak_rss_mb("VmRSS")
    out["bytes_per_vector_on_disk"] = round(disk_bytes(db) / n)
    out["index_files_bytes_per_vector"] = round(sum(disk_bytes(d) for d in db.rglob("indexes")) / n)
    found = {}
    order = np.random.default_rng(2).permutation(len(queries))  # the filtered calls' queries, when capped
    for name, flt, calls, budget in (("unfiltered", "", len(queries), float("inf")),
                                     ("filtered", FILTER, job["filtered_calls"], job["filtered_seconds"])):
        def search(q, flt=flt):
            return client.search("items", data=[q.tolist()], limit=K, filter=flt, anns_field="vector",
                                 search_params={"metric_type": "COSINE", "params": job["search"]})[0]
        for q in queries[:3]:
            search(q)  # warm
        ms, ids, start = [], np.full((len(queries), K), -1, np.int64), time.perf_counter()
        for i in np.sort(order[:calls]):
            if len(ms) >= 10 and time.perf_counter() - start > budget:
                break
            t = time.perf_counter()
            hits = search(queries[i])
            ms.append((time.perf_counter() - t) * 1000)
            ids[i, :len(hits)] = [int(h["id"]) for h in hits]
        found[name], found[name + "_rows"] = ids, np.sort(order[:calls])[:len(ms)]
        out[f"{name}_ms_p50"], out[f"{name}_ms_p99"] = round(percentile(ms, 50), 2), round(percentile(ms, 99), 2)
        out[f"{name}_calls"] = len(ms)
    out["peak_rss_mb_end"] = peak_rss_mb()
    np.savez(job["result"] + ".npz", **found)
    out["status"] = "ok"
    Path(job["result"]).write_text(json.dumps(out))
    client.close()


def run_type(job: dict, max_build: float, max_rss_gb: float) -> dict:
    """Run ``child`` in a process of its own, killed when its build passes ``max_build`` seconds or its
    resident memory ``max_rss_gb``."""
    Path(job["job"]).write_text(json.dumps(job))
    with open(job["job"] + ".err", "w") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", job["job"]], stdout=err, stderr=err)
    t, rss = time.perf_counter(), 0.0
    while proc.poll() is None:
        time.sleep(2)
        try:
            rss = max(rss, int(Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 2**20)
        except (OSError, IndexError):
            pass
        built = Path(job["built"]).exists()
        why = (f"insert + index not done in {max_build:.0f} s" if not built and time.perf_counter() - t > max_build
               else f"resident memory passed {max_rss_gb} GB ({'searching' if built else 'building'})"
               if rss > max_rss_gb else None)
        if why:
            proc.kill()
            proc.wait()
            rows = Path(job["built"] + ".rows")
            why += f" ({rows.read_text() if rows.exists() else 0} rows inserted)"
            return {"status": "timeout" if "done in" in why else "memory", "reason": why + "; killed",
                    "seconds": round(time.perf_counter() - t), "build_params": job["build"],
                    "search_params": job["search"]}
    if proc.returncode or not Path(job["result"]).exists():
        tail = Path(job["job"] + ".err").read_text()[-1500:]
        return {"status": "error", "reason": f"child exit {proc.returncode}: {tail}"}
    return json.loads(Path(job["result"]).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "cache-lite0-224")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--types", nargs="+", default=["FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "DISKANN"])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "milvus_index",
                        help="folder for the .db folders (and the gallery file)")
    parser.add_argument("--max-build-seconds", type=float, default=1800)
    parser.add_argument("--max-rss-gb", type=float, default=18, help="kill a type's process above this memory")
    parser.add_argument("--filtered-calls", type=int, default=200, help="filtered searches (of the 341 queries)")
    parser.add_argument("--filtered-seconds", type=float, default=1500,
                        help="stop the filtered searches after this long (at least 10 calls)")
    parser.add_argument("--keep-db", action="store_true", help="keep each .db folder (default: removed once measured)")
    parser.add_argument("--skipped", nargs="*", default=[], metavar="TYPE=REASON",
                        help="types not run at these sizes, recorded with the reason")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "milvus_index.json")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(Path(args.child).read_text()))
    import shutil
    from importlib.metadata import version

    import pymilvus
    from index_recall import exact_top, gallery, pooled, quality, sources

    srcs, buyer_maps = sources(args.cache)
    queries = pooled(buyer_maps)
    args.out.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.json.read_text()) if args.json.exists() else {}
    result = {"benchmark": "milvus_index", "versions": {"pymilvus": pymilvus.__version__,
                                                        "milvus_lite": version("milvus-lite")},
              "queries": "consumer/validation (341 buyers' photos, Lite0 224 px), one a call",
              "gallery": "as index_recall.py: Lite0 vectors of catalog photos, then random windows of their maps",
              "metric": "COSINE", "k": K, "filter": FILTER, "genders": GENDERS, "insert_batch": BATCH,
              "max_build_seconds": args.max_build_seconds,
              "sizes": old.get("sizes", {})}
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, "machine": machine(), "command": command}, indent=2) + "\n")

    for n in args.sizes:
        path = args.out / f"gallery-{n}.f32"
        t = time.perf_counter()
        vectors = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, DIM))
        gallery(srcs, n, vectors)
        vectors.flush()
        genders = np.random.default_rng(1).integers(0, len(GENDERS), n)
        men = np.flatnonzero(genders == 0)
        truth, truth_men = exact_top(queries, vectors), exact_top(queries, np.asarray(vectors[men]))
        np.save(args.out / "genders.npy", genders)
        np.save(args.out / "queries.npy", queries)
        types = {k: v for k, v in result["sizes"].get(str(n), {}).get("types", {}).items() if k not in args.types}
        size = result["sizes"][str(n)] = {"n": n, "gallery_s": round(time.perf_counter() - t, 1),
                                          "men_rows": len(men), "types": types}  # a type not rerun is kept
        for skip in args.skipped:
            size["types"][skip.split("=")[0]] = {"status": "skipped", "reason": skip.split("=", 1)[1]}
        print(f"n={n:,}: gallery and truth {size['gallery_s']} s", file=sys.stderr, flush=True)
        for kind in args.types:
            db = args.out / f"n{n}-{kind.lower()}.db"
            shutil.rmtree(db, ignore_errors=True)
            build, search = params(kind, n)
            stem = str(args.out / f"n{n}-{kind.lower()}")
            for f in (stem + ".built", stem + ".json", stem + ".built.rows"):
                Path(f).unlink(missing_ok=True)
            job = {"n": n, "type": kind, "db": str(db), "gallery": str(path), "genders": str(args.out / "genders.npy"),
                   "queries": str(args.out / "queries.npy"), "build": build, "search": search,
                   "filtered_calls": args.filtered_calls, "filtered_seconds": args.filtered_seconds,
                   "job": stem + ".job", "built": stem + ".built", "result": stem + ".json"}
            row = run_type(job, args.max_build_seconds, args.max_rss_gb)
            if row["status"] == "ok":
                found = np.load(stem + ".json.npz")
                row.update(quality(found["unfiltered"], queries, vectors, truth))
                rows = found["filtered_rows"]
                filt = quality(found["filtered"][rows], queries[rows], vectors, truth_men[rows])
                row["filtered_recall_at_10"], row["filtered_same_first"] = filt["recall_at_10"], filt["same_first"]
                hit = found["filtered"][found["filtered"] >= 0]
                row["filtered_off_filter_results"] = int((genders[hit] != 0).sum())
            size["types"][kind] = {**row, "command": command}
            print(kind, {k: v for k, v in row.items() if k not in ("build_params", "search_params")},
                  file=sys.stderr, flush=True)
            save()
            if not args.keep_db:
                shutil.rmtree(db, ignore_errors=True)
        del vectors
        path.unlink()
    emit({k: v for k, v in result.items()})


if __name__ == "__main__":
    main()
