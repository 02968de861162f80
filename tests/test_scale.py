"""Beyond one machine: the Milvus store (Milvus Lite in this process, and a ``milvus-lite server``
on loopback for the network client), the Ray engine (a local cluster), and servers that share one
catalog. Checked against brute force: exact cosine search, Python filters, the local engine's
vectors and the local index's results.

CI installs the ``scale`` extra and sets ``FASHIONLENS_REQUIRE_SCALE=1``: these tests then fail
instead of skipping when Ray or pymilvus is missing.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import unit
from fashionlens.errors import UserError
from fashionlens.index.stores import Where, open_store
from fashionlens.index.stores.local import meets

if os.environ.get("FASHIONLENS_REQUIRE_SCALE") != "1":
    pytest.importorskip("pymilvus")
    pytest.importorskip("ray")

from fashionlens.index.stores.milvus import MilvusStore, parse  # noqa: E402
from fashionlens.index.stores.milvus_rows import item_row, where_expression  # noqa: E402

SCHEMA = {"fit": ["slim", "loose"], "neck": ["v", "round", "high"]}


def synthetic(location: str, vecs: np.ndarray, metadata: list[dict]) -> MilvusStore:
    store = MilvusStore.open(location, create=True)
    store.ensure(vecs.shape[1])
    store.set_meta("embedder", {"model": "synthetic", "dim": vecs.shape[1], "letterbox": 0})
    store.upsert([item_row(f"v{i:04d}", v, f"/fake/{i}.jpg", m) for i, (v, m) in enumerate(zip(vecs, metadata))])
    return store


def exact(vecs: np.ndarray, query: np.ndarray, keep: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    scores = np.where(keep, vecs @ query, -np.inf)
    order = np.argsort(-scores, kind="stable")[:min(k, int(keep.sum()))]
    return [f"v{i:04d}" for i in order], scores[order]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """400 random unit vectors with metadata (a column missing on some items, a value with a quote)
    and stored attribute predictions, in one Milvus Lite collection."""
    rng = np.random.default_rng(3)
    vecs = unit(rng, 400, 24)
    genders, seasons = ["Men", "Women", 'Un"isex'], ["Summer", "Winter", None]
    metadata = [{"gender": genders[i % 3], **({"season": seasons[i % 5 % 3]} if seasons[i % 5 % 3] else {})}
                for i in range(400)]
    store = synthetic(f"milvus+lite://{tmp_path_factory.mktemp('milvus')}/m.db/items", vecs, metadata)
    store.set_meta("attributes", {"schema": SCHEMA, "feature": {"projection": None}})
    preds = [(int(rng.integers(2)), float(rng.uniform(0.3, 1.0)), int(rng.integers(3)), float(rng.uniform(0.3, 1.0)))
             for _ in range(400)]
    rows = [r for i, (fv, fc, nv, nc) in enumerate(preds[:360]) for r in (
        (f"v{i:04d}", 0, fv, fc, np.asarray([1 - fc, fc], np.float16).tobytes(), None, None, None, None, None),
        (f"v{i:04d}", 1, nv, nc, np.zeros(3, np.float16).tobytes(), 1, 2, 3, 4,
         np.full(8, i / 400, np.float16).tobytes()))]
    store.record_attributes(rows, [f"v{i:04d}" for i in range(360)], [("v0399", "cannot read")])
    yield {"store": store, "vecs": vecs, "metadata": metadata, "preds": preds}
    store.close()


def test_flat_search_is_exact_cosine_search(world):
    store, vecs = world["store"], world["vecs"]
    queries = unit(np.random.default_rng(4), 12, 24)
    results = store.search(queries, 10)
    for q, hits in zip(queries, results):
        ids, scores = exact(vecs, q, np.ones(len(vecs), bool), 10)
        assert [h.id for h in hits] == ids
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)
        assert hits[0].metadata == world["metadata"][int(ids[0][1:])] and hits[0].path == f"/fake/{int(ids[0][1:])}.jpg"
    assert store.count() == 400


@pytest.mark.parametrize("filters", [{"gender": {"Men"}}, {"gender": {"Women", 'Un"isex'}, "season": {"Summer"}},
                                     {"season": {""}}, {"season": {"", "Winter"}}, {"gender": {"nobody"}}])
def test_filters_run_in_milvus_and_equal_a_python_filter(world, filters):
    store, vecs, metadata = world["store"], world["vecs"], world["metadata"]
    keep = np.array([meets(m, filters) for m in metadata])
    for q in unit(np.random.default_rng(5), 5, 24):
        hits = store.search_where(q, 10, Where(filters))
        assert [h.id for h in hits] == exact(vecs, q, keep, 10)[0]


def test_wanted_attributes_run_in_milvus_and_equal_a_python_filter(world):
    from fashionlens.index.attribute_store import StoredAttributes

    store, vecs, preds = world["store"], world["vecs"], world["preds"]
    attrs = StoredAttributes(store)
    keep = np.array([i < 360 and preds[i][2] == 1 and preds[i][3] >= 0.6 and preds[i][0] == 0 and preds[i][1] >= 0.6
                     for i in range(400)])
    where = Where({"gender": {"Men", "Women"}}, [(1, 1), (0, 0)], min_confidence=0.6)
    keep &= np.array([m["gender"] in ("Men", "Women") for m in world["metadata"]])
    for q in unit(np.random.default_rng(6), 5, 24):
        assert [h.id for h in store.search_where(q, 8, where, attrs)] == exact(vecs, q, keep, 8)[0]
    row = attrs.rows(["v0007"])["v0007"]
    assert row[1].box == (1, 2, 3, 4) and row[0].box is None and row[0].feature is None
    assert row[1].value == SCHEMA["neck"][preds[7][2]] and abs(row[1].confidence - preds[7][3]) < 1e-5
    np.testing.assert_allclose(row[1].feature, np.full(8, 7 / 400, np.float16))
    assert attrs.rows(["v0399", "v0380"]) == {}  # unreadable, and not explained
    assert store.attribute_counts() == (360, 1)
    assert [r[0] for r in store.attribute_failures()] == ["v0399"]


def test_expressions_quote_values_and_refuse_odd_names():
    assert where_expression({"a b": {'x"y'}}, [], 0.5, None) == '(metadata["a b"] == "x\\"y")'
    with pytest.raises(UserError, match="can be filtered on"):
        where_expression({'a"]) or (1': {"x"}}, [], 0.5, None)


def test_an_index_type_for_the_size_is_built_with_its_recall(tmp_path):
    rng = np.random.default_rng(7)
    vecs = unit(rng, 3000, 32)
    store = synthetic(f"milvus+lite://{tmp_path}/t.db/hnsw", vecs, [{}] * 3000)
    try:
        store.set_meta("index_settings", {"milvus_index": "auto", "flat_max": 1000, "milvus_hnsw_max": 10_000})
        assert store.fit_index()["index_type"] == "HNSW"
        assert store.get_meta("index")["params"] == {"M": 32, "efConstruction": 200}
        queries = unit(rng, 50, 32)
        found = store.search(queries, 10)
        truth = [set(exact(vecs, q, np.ones(3000, bool), 10)[0]) for q in queries]
        recall = np.mean([len(truth[i] & {h.id for h in hits}) / 10 for i, hits in enumerate(found)])
        assert recall >= 0.95
    finally:
        store.close()


def test_store_locations_and_refusals(tmp_path, world):
    assert parse("milvus://db.example:19530/items") == ("http://db.example:19530", "items", False)
    assert parse(f"milvus+lite://{tmp_path}/x.db/c")[1:] == ("c", True)
    for bad in ("milvus://host:19530", "milvus+lite://x.sqlite/items", "milvus://h/bad-name"):
        with pytest.raises(UserError):
            parse(bad)
    with pytest.raises(UserError, match="unknown kind of store"):
        open_store("redis://h/c")
    with pytest.raises(UserError, match="no such collection"):
        open_store(world["store"].location.replace("/items", "/absent"))
    with pytest.raises(UserError, match="vectors of synthetic"):
        world["store"].check_embedder({"model": "lite0", "dim": 1280, "letterbox": 224})


# --- real photos: a milvus-lite server on loopback, the Ray engine, the CLI, two servers -------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """``milvus-lite server`` on loopback: Milvus's network protocol, as a cluster speaks it."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "milvus-lite"), "server", "--data-dir",
                             str(tmp_path_factory.mktemp("milvus-server") / "data"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def test_a_network_client_never_pings_an_idle_server(milvus_server, monkeypatch):
    """gRPC's default server policy (milvus-lite server's) answers pings on an idle connection with
    GOAWAY "too many pings", after which pymilvus could not reconnect: a process idle for ~2 minutes
    then failed every call (seen in CI). The channel a store opens pings only during calls,
    less often than the policy's 5-minute minimum (a long index build is a call without data too)."""
    import grpc

    made = []
    real_channel = grpc.insecure_channel
    monkeypatch.setattr(grpc, "insecure_channel", lambda target, options=None, **kw: (
        made.append(dict(options or [])), real_channel(target, options=options, **kw))[1])
    monkeypatch.setenv("FASHIONLENS_MILVUS_TOKEN", f"fresh-{time.monotonic_ns()}")  # a new shared connection
    with pytest.raises(UserError, match="no such collection"):
        open_store(f"milvus://{milvus_server}/never_made")
    assert made, "no channel was opened"
    assert all(not o["grpc.keepalive_permit_without_calls"] and o["grpc.keepalive_time_ms"] > 300_000 for o in made)


def fashionlens(*args, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fashionlens", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def real(shared_data, tmp_path_factory, milvus_server):
    """96 catalog photos indexed twice: the local engine into a folder, the Ray engine into the
    Milvus server; 20 buyers' photos to search with."""
    root = tmp_path_factory.mktemp("real")
    rows = []
    with open(shared_data / "catalog" / "styles.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            image = shared_data / "catalog" / "images" / f"{row['id']}.jpg"
            if image.is_file() and len(rows) < 96:
                rows.append({"id": row["id"], "path": str(image), "gender": row["gender"],
                             "articleType": row["articleType"]})
    with open(root / "catalog.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["id", "path", "gender", "articleType"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "ray.yaml").write_text("ray_cpus: 2\nchunk_size: 8\nbatch_size: 4\n")
    queries = sorted((shared_data / "consumer" / "test").glob("*/*.jpg"))[::18][:20]
    local = fashionlens("index", root / "catalog.csv", "--out", root / "local")
    assert local.returncode == 0, local.stderr
    store = f"milvus://{milvus_server}/real"
    ray = fashionlens("index", root / "catalog.csv", "--store", store, "--engine", "ray", "--config", root / "ray.yaml",
                      cwd=root)
    assert ray.returncode == 0, ray.stderr
    assert "ray (2 actors x 1 CPU, 2 CPUs)" in ray.stderr and "96 embedded" in ray.stderr
    return {"root": root, "rows": rows, "queries": queries, "store": store, "local": root / "local"}


def top1(out: str) -> list[tuple[str, float]]:
    return [(p["results"][0]["id"], p["results"][0]["score"]) for p in json.loads(out)]


def test_ray_into_milvus_agrees_with_the_local_engine_and_index(real):
    ids = [r["id"] for r in real["rows"]]
    with open_store(real["store"]) as milvus, open_store(real["local"]) as local:
        assert milvus.count() == local.count() == 96
        found, vecs = milvus.vectors(ids)
        keys = {local.get_item(i)["key"]: i for i in ids}
        lfound, lvecs = local.vectors(np.array(sorted(keys)))
        by_id = {keys[int(k)]: v for k, v in zip(lfound, lvecs)}
        assert sorted(found.tolist()) == sorted(ids)
        assert max(float(np.abs(v - by_id[i]).max()) for i, v in zip(found.tolist(), vecs)) <= 1e-4
        assert milvus.get_meta("embedder") == local.get_meta("embedder")
    a = fashionlens("search", real["store"], *real["queries"], "-k", "3", "--json")
    b = fashionlens("search", real["local"], *real["queries"], "-k", "3", "--json")
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    differ = [(x, y) for x, y in zip(top1(a.stdout), top1(b.stdout)) if x[0] != y[0]]
    assert len(differ) <= 1 and all(abs(x[1] - y[1]) < 1e-4 for x, y in differ)  # at most one tie
    lite = f"milvus+lite://{real['root']}/lite.db/items"  # the command: Ray into Milvus Lite, then search
    made = fashionlens("index", real["root"] / "catalog.csv", "--store", lite, "--engine", "ray", "--config",
                       real["root"] / "ray.yaml", cwd=real["root"])
    assert made.returncode == 0, made.stderr
    c = fashionlens("search", lite, *real["queries"], "-k", "3", "--json")
    assert c.returncode == 0, c.stderr
    differ = [(x, y) for x, y in zip(top1(c.stdout), top1(b.stdout)) if x[0] != y[0]]
    assert len(differ) <= 1 and all(abs(x[1] - y[1]) < 1e-4 for x, y in differ)
    men = fashionlens("search", real["store"], real["queries"][0], "-k", "5", "--json", "--filter", "gender=Men")
    assert {r["gender"] for r in json.loads(men.stdout)[0]["results"]} == {"Men"}
    info = json.loads(fashionlens("info", real["store"]).stdout)
    assert info["store"] == "milvus" and info["items"]["embedded"] == 96 and info["index"]["index_type"] == "FLAT"


def test_a_killed_ray_index_run_reruns_to_every_item_exactly_once(real):
    store = real["store"].replace("/real", "/killed")
    slow = real["root"] / "ray-slow.yaml"  # one actor, small batches: seconds to kill it in
    slow.write_text("ray_cpus: 2\nray_actors: 1\nchunk_size: 8\nbatch_size: 2\n")
    cmd = [sys.executable, "-m", "fashionlens", "index", real["root"] / "catalog.csv", "--store", store,
           "--engine", "ray", "--config", slow]
    job = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True, cwd=real["root"], env={**os.environ, "OMP_NUM_THREADS": "1"})
    before, deadline = 0, time.monotonic() + 300
    while before < 8 and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
        try:
            with open_store(store) as s:
                before = s.count()
        except UserError:  # not created yet
            pass
    os.killpg(job.pid, signal.SIGKILL)  # the job, its local Ray cluster and its workers
    job.wait()
    assert 8 <= before < 96, before
    rerun = fashionlens("index", real["root"] / "catalog.csv", "--store", store, "--engine", "ray",
                        "--config", slow, cwd=real["root"])
    assert rerun.returncode == 0, rerun.stderr
    with open_store(store) as s:
        ids = [r["id"] for page in s.iterate("", ["id"]) for r in page]
        assert s.count() == len(ids) == 96 and sorted(ids) == sorted(r["id"] for r in real["rows"])
    embedded = int(rerun.stderr.split(" embedded")[0].rsplit(" ", 1)[-1].replace(",", ""))
    assert 96 - before - 8 <= embedded <= 96 - before  # the rerun embedded only what was missing (+ the buffer in flight)


def test_two_servers_share_one_milvus_catalog(real, tmp_path):
    from fashionlens.cli.serve_process import Server

    key = "scale-key-0123456789abcdef"
    config = tmp_path / "serve.yaml"
    config.write_text(f"uploads: {tmp_path / 'uploads'}\nconsistency: Strong\n")
    photo = real["queries"][0].read_bytes()
    local = top1(fashionlens("search", real["local"], *real["queries"][:5], "-k", "1", "--json").stdout)
    with Server(real["store"], api_key=key, config=config) as a, Server(real["store"], api_key=key, config=config) as b:
        for q, (expected, _) in zip(real["queries"][:5], local):
            got = a.client.post("/api/search", files={"image": ("q.jpg", q.read_bytes(), "image/jpeg")}, data={"k": 1})
            assert got.status_code == 200 and got.json()["results"][0]["id"] == expected
        added = a.client.post("/api/items", files={"image": ("n.jpg", photo, "image/jpeg")},
                              data={"id": "buyer-1", "gender": "Men"}, headers={"X-API-Key": key})
        assert added.status_code == 201, added.text
        seen = b.client.get("/api/items/buyer-1")
        assert seen.status_code == 200 and seen.json()["metadata"] == {"gender": "Men"}
        assert b.client.get("/api/items/buyer-1/image").content == photo  # from the shared uploads
        hits = b.client.post("/api/search", files={"image": ("q.jpg", photo, "image/jpeg")}, data={"k": 1}).json()
        assert hits["results"][0]["id"] == "buyer-1"
        assert b.client.get("/health").json()["items"] == 97
        assert b.client.delete("/api/items/buyer-1", headers={"X-API-Key": key}).status_code == 200
        assert a.client.get("/api/items/buyer-1").status_code == 404
        hits = a.client.post("/api/search", files={"image": ("q.jpg", photo, "image/jpeg")}, data={"k": 1}).json()
        assert hits["results"][0]["id"] == local[0][0]


def test_attributes_explanations_wants_and_recommendations_on_milvus_equal_the_local_index(tmp_path):
    """The attribute world (12 garments whose predictions are known) in Milvus Lite: index-attributes,
    explained and wanted search and recommend give what the local index gives."""
    from attribute_world import RED, build_attribute_world
    from fashionlens.data.images import open_image
    from fashionlens.index.attribute_indexing import index_attributes
    from fashionlens.index.config import IndexAttributesConfig, IndexConfig, SearchConfig
    from fashionlens.index.pipeline import build_index
    from fashionlens.index.query import Searcher
    from fashionlens.index.recommend import RecommendConfig, recommend
    from fashionlens.models.embedder import build_embedder

    (tmp_path / "world").mkdir()
    world = build_attribute_world(tmp_path / "world")
    store = f"milvus+lite://{tmp_path}/attr.db/items"
    build_index(world["root"] / "catalog.csv", store, IndexConfig(input_size=64, workers=0, batch_size=8),
                embedder=build_embedder("lite0", 64, optimize="none"))
    report = index_attributes(store, world["ckpt"], IndexAttributesConfig(batch_size=5))
    assert report.explained == report.total == 13 and report.skipped == 0
    images = [open_image(p, draft_size=64) for _, p, _ in world["rows"][:4]]
    cfg = SearchConfig(k=5, explain=True, want=["neckline=v-shape"])
    answers = []
    for location in (world["index"], store):
        searcher = Searcher(location, attributes=True, optimize="none")
        try:
            results, _ = searcher.search_explained(images, cfg)
        finally:
            searcher.close()
        answers.append([[(h.id, round(h.score, 4), h.reasons["text"]) for h in hits] for hits in results])
    assert answers[0] == answers[1]
    assert all(h[0] in RED for hits in answers[1] for h in hits) and all(len(hits) == 5 for hits in answers[1])
    liked = sorted(RED)[:2]
    local_rec = recommend(world["index"], liked, RecommendConfig(k=4))
    milvus_rec = recommend(store, liked, RecommendConfig(k=4))
    assert local_rec[0] == milvus_rec[0]
    assert [(r.id, round(r.score, 4), r.shares) for r in local_rec[1]] == \
        [(r.id, round(r.score, 4), r.shares) for r in milvus_rec[1]]


def test_a_parquet_manifest_of_photo_urls_indexes_as_local_paths_do(catalog, tiny_embedder, index_cfg, tmp_path):
    """Photos named by URLs fsspec opens (file:// here, s3:// on a cluster) in a Parquet manifest: the
    same vectors as the same photos by path; a URL that is not there is skipped with its reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fashionlens.index.pipeline import build_index

    rows = list(csv.DictReader(open(catalog / "styles.csv")))
    table = pa.table({"sku": [r["id"] for r in rows] + ["gone"],
                      "image": [(catalog / "images" / f"{r['id']}.jpg").resolve().as_uri() for r in rows]
                      + [(tmp_path / "gone.jpg").as_uri()],
                      "articleType": [r["articleType"] for r in rows] + ["Tshirts"], "year": [2020] * 25})
    pq.write_table(table, tmp_path / "manifest.parquet")
    urls = build_index(tmp_path / "manifest.parquet", tmp_path / "by-url", index_cfg, embedder=tiny_embedder)
    paths = build_index(catalog, tmp_path / "by-path", index_cfg, embedder=tiny_embedder)
    assert (urls.embedded, urls.skipped, paths.embedded) == (24, 1, 24)
    with open_store(tmp_path / "by-url") as a, open_store(tmp_path / "by-path") as b:
        item = a.get_item("item-0003")
        assert item["path"].startswith("file://") and item["metadata"] == {"articleType": rows[3]["articleType"],
                                                                          "year": "2020"}
        va = a.vectors(np.array([a.get_item(r["id"])["key"] for r in rows]))[1]
        vb = b.vectors(np.array([b.get_item(r["id"])["key"] for r in rows]))[1]
        np.testing.assert_array_equal(va, vb)
    skipped = list(csv.reader(open(tmp_path / "by-url" / "skipped.csv")))
    assert skipped[1][0] == "gone" and "no such file" in skipped[1][2]


def test_unreachable_clusters_are_one_line_errors(catalog, tmp_path):
    port = free_port()  # nothing listens there
    search = fashionlens("search", f"milvus://127.0.0.1:{port}/items", next((catalog / "images").iterdir()))
    assert search.returncode == 2 and "cannot reach Milvus" in search.stderr and "Traceback" not in search.stderr
    ray = fashionlens("index", catalog, "--store", tmp_path / "idx", "--engine", "ray", "--ray-address",
                      f"127.0.0.1:{port}", timeout=120)
    assert ray.returncode == 2 and "cannot reach the Ray cluster" in ray.stderr and "Traceback" not in ray.stderr

