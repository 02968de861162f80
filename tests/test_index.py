"""The catalog index: search against brute force, updates, removal, resume after a kill,
bad files, and refusing to mix models."""

from __future__ import annotations

import csv
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from conftest import (
    TESTS_DIR, all_vectors, brute_force, indexed_rowids, make_catalog, make_image, make_tiny_embedder, recall,
    search_ids, synthetic_index, unit,
)
from fashionlens.config import IndexConfig
from fashionlens.errors import UserError
from fashionlens.index import CatalogIndex
from fashionlens.index.pipeline import build_index
from fashionlens.index.vectors import choose_spec, new_index, search_index


# --- search against brute force ----------------------------------------------------------------


def test_flat_index_of_a_catalog_equals_brute_force(catalog, tiny_embedder, index_cfg, tmp_path):
    report = build_index(catalog, tmp_path / "idx", index_cfg, embedder=tiny_embedder)
    assert (report.added, report.embedded, report.total, report.index) == (24, 24, 24, "IDMap2,Flat")
    assert report.skipped == report.missing == 0
    with closing(CatalogIndex(tmp_path / "idx")) as idx:
        assert idx.spec.kind == "flat" and idx.load().ntotal == 24
        queries = unit(np.random.default_rng(1), 20, tiny_embedder.dim)
        truth_ids, truth_scores = brute_force(idx, queries, 5)
        hits = idx.search(queries, 5)
        assert [[h.id for h in q] for q in hits] == truth_ids
        np.testing.assert_allclose([[h.score for h in q] for q in hits], truth_scores, atol=1e-5)
        # every item's own vector finds itself first, with its metadata and image path
        rowids, vecs = all_vectors(idx)
        for rowid, hit in zip(rowids, (q[0] for q in idx.search(vecs, 1))):
            item = idx.store.get_item(hit.id)
            assert item["rowid"] == rowid and hit.score == pytest.approx(1.0, abs=1e-5)
            assert hit.metadata == item["metadata"] and set(hit.metadata) == {"articleType", "baseColour"}
            assert Path(hit.path).name == f"{hit.id}.jpg"


def test_hnsw_recall_against_brute_force(tmp_path):
    rng = np.random.default_rng(2)
    with closing(synthetic_index(tmp_path / "h", unit(rng, 600, 32), index_type="hnsw", chunk=128)) as idx:
        assert idx.spec.kind == "hnsw" and idx.spec.factory.startswith("IDMap2,HNSW")
        assert idx.load().ntotal == 600
        assert recall(idx, unit(rng, 50, 32)) >= 0.9


def test_ivfpq_chosen_above_flat_max_with_useful_recall(tmp_path, fast_ivfpq):
    """3000 clustered 64-d vectors (like real embeddings: groups of similar items), flat_max 1000.

    Threshold: IVF-PQ is approximate; with nprobe 32 of 128 lists and PQ64 on 64 dimensions the
    measured recall@10 on this (seeded) data is 0.975; 0.8 leaves room for FAISS version and
    threading differences, while a broken index (wrong metric, untrained quantiser, mismatched
    ids, too few lists probed) falls far below it.
    """
    rng = np.random.default_rng(3)
    centres = unit(rng, 40, 64)
    data = centres[rng.integers(0, 40, 3000)] + 0.35 * unit(rng, 3000, 64)
    data = (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)
    with closing(synthetic_index(tmp_path / "q", data[:800], flat_max=1000)) as idx:
        assert idx.spec.kind == "flat"
    # the catalog grows past flat_max: auto rebuilds as IVF-PQ
    with closing(synthetic_index(tmp_path / "q", data[800:], flat_max=1000, first=800)) as idx:
        spec = idx.spec
        assert spec == choose_spec(3000, 64, "ivfpq") and spec.nprobe == 32
        assert re.fullmatch(r"IVF\d+,PQ64(np)?", spec.factory)
        assert idx.store.get_meta("index_spec")["kind"] == "ivfpq"
        assert idx.load().ntotal == 3000 and idx.load().is_trained
        queries = data[rng.integers(0, 3000, 60)] + 0.1 * unit(rng, 60, 64)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        assert recall(idx, queries.astype(np.float32)) >= 0.8
    with closing(CatalogIndex(tmp_path / "q")) as reopened:
        assert faiss.extract_index_ivf(reopened.load()).nprobe == 32  # search settings survive reopening


def test_ivfpq_skips_polysemous_training():
    """FAISS's factory string "IVFn,PQm" enables polysemous training, which here took ~250 s of
    the training of 3000 vectors (PQ64) and is never used by search (polysemous_ht stays 0);
    "PQ{m}np" turns it off."""
    index = new_index(choose_spec(200_000, 1280))
    assert index.do_polysemous_training is False


def test_search_index_equals_faiss_and_brute_force(monkeypatch):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(300, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    ids = rng.permutation(10_000)[:300].astype(np.int64)
    index = new_index(choose_spec(300, 16, "flat"))
    index.add_with_ids(base, ids)
    index.remove_ids(ids[:40])  # removal compacts the vectors and the id map
    live, live_ids = base[40:], ids[40:]
    calls = []
    own = type(index).search
    monkeypatch.setattr(type(index), "search", lambda self, x, k, **kw: calls.append(len(x)) or own(self, x, k, **kw))
    for nq, k in ((1, 5), (4, 12), (19, 7), (25, 7), (3, 400)):  # 25: FAISS's own path; 400 > live items
        q = rng.normal(size=(nq, 16)).astype(np.float32)
        calls.clear()
        scores, got = search_index(index, q, k)
        assert calls == ([] if nq < 20 else [nq])  # below 20 queries, FAISS's own search is not used
        want_scores, want = index.search(q, k)
        assert got.shape == want.shape == (nq, k) and np.array_equal(got, want)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
        exact = q @ live.T  # brute force over the live vectors
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        n = min(k, len(live))
        assert np.array_equal(got[:, :n], live_ids[order[:, :n]])
        assert (got[:, n:] == -1).all()
    empty = new_index(choose_spec(0, 16, "flat"))
    assert (search_index(empty, q[:2], 3)[1] == -1).all()
    hnsw = new_index(choose_spec(300, 16, "hnsw"))  # not a flat index: FAISS's own search
    hnsw.add_with_ids(base, ids)
    assert np.array_equal(search_index(hnsw, q[:2], 5)[1], hnsw.search(q[:2], 5)[1])


def test_choose_spec():
    assert choose_spec(100, 1280, flat_max=100).kind == "flat"
    assert choose_spec(0, 8).factory == "IDMap2,Flat"
    big = choose_spec(101, 1280, flat_max=100)
    assert big.kind == "ivfpq" and re.fullmatch(r"IVF\d+,PQ64(np)?", big.factory)

    def parse(spec):
        return map(int, re.fullmatch(r"IVF(\d+),PQ(\d+)(?:np)?", spec.factory).groups())

    lists = []
    for n in (101, 10_000, 10**6, 10**7):  # nlist: a power of two, growing like sqrt(n)
        nlist, _ = parse(choose_spec(n, 64, "ivfpq"))
        assert nlist & (nlist - 1) == 0 and 16 <= nlist <= max(16, 8 * n ** 0.5)
        lists.append(nlist)
    assert lists == sorted(lists) and lists[-1] > lists[0]
    for dim, want_m in ((8, 8), (96, 48), (100, 50), (1280, 64), (97, 1), (768, 64)):
        spec = choose_spec(50_000, dim, "ivfpq")
        nlist, m = parse(spec)
        assert m == want_m and dim % m == 0 and 1 <= spec.nprobe <= nlist
        new_index(spec)  # a valid FAISS factory string
    assert choose_spec(10, 16, "hnsw").factory == "IDMap2,HNSW32,Flat"
    with pytest.raises(ValueError, match="unknown index type"):
        choose_spec(10, 16, "annoy")


# --- updates -----------------------------------------------------------------------------------


def test_adding_rows_embeds_only_the_new_and_a_moved_image_is_reembedded(catalog, tiny_embedder, index_cfg,
                                                                         tmp_path):
    out = tmp_path / "idx"
    build_index(catalog, out, index_cfg, embedder=tiny_embedder)
    make_catalog(catalog, 28, start=24)
    report = build_index(catalog, out, index_cfg, embedder=tiny_embedder)
    assert (report.added, report.changed, report.embedded, report.total) == (4, 0, 4, 28)
    # item-0005's image is replaced by a different picture under a new name: a changed path
    with closing(CatalogIndex(out)) as idx:
        old = idx.store.get_item("item-0005")
        rowids, vecs = all_vectors(idx)
        old_vec = vecs[rowids == old["rowid"]]
    (catalog / "images" / "item-0005.jpg").unlink()
    make_image(catalog / "images" / "item-0005.png", 99)
    report = build_index(catalog, out, index_cfg, embedder=tiny_embedder)
    assert (report.added, report.changed, report.embedded, report.total) == (0, 1, 1, 28)
    with closing(CatalogIndex(out)) as idx:
        new = idx.store.get_item("item-0005")
        assert new["rowid"] != old["rowid"] and new["path"].endswith("item-0005.png")
        ids_in_faiss = indexed_rowids(idx)
        assert old["rowid"] not in ids_in_faiss and new["rowid"] in ids_in_faiss and len(ids_in_faiss) == 28
        hits = idx.search(old_vec, 28)[0]
        assert [h.id for h in hits].count("item-0005") == 1
        rowids, vecs = all_vectors(idx)
        new_vec = vecs[rowids == new["rowid"]]
        assert not np.allclose(old_vec, new_vec, atol=1e-3)
        assert next(h.score for h in hits if h.id == "item-0005") == pytest.approx((old_vec @ new_vec.T).item(), abs=1e-5)
        top = idx.search(new_vec, 1)[0][0]
        assert top.id == "item-0005" and top.score == pytest.approx(1.0, abs=1e-5)


def test_duplicate_ids_keep_the_first_row(catalog, tiny_embedder, index_cfg, tmp_path):
    with open(catalog / "styles.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["item-0003", "Other", "dup"])
    report = build_index(catalog, tmp_path / "idx", index_cfg, embedder=tiny_embedder)
    assert report.duplicates == ["item-0003"] and report.total == 24
    with closing(CatalogIndex(tmp_path / "idx")) as idx:
        assert idx.store.get_item("item-0003")["metadata"]["baseColour"] == "colour03"


# --- removal -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_removed_items_never_come_back(tmp_path, kind):
    rng = np.random.default_rng(4)
    vecs = unit(rng, 300, 16)
    synthetic_index(tmp_path / "r", vecs, index_type=kind, chunk=64).close()
    gone = [f"v{i:05d}" for i in range(0, 300, 10)]
    with closing(CatalogIndex(tmp_path / "r", write=True)) as idx:
        assert idx.remove([*gone, "nope"]) == ["nope"]
        assert idx.remove(["nope", "v00000"]) == ["nope", "v00000"]  # already removed
    queries = np.concatenate([vecs[::10], unit(rng, 20, 16)])
    for _ in range(2):  # after removal, and again after reopening
        with closing(CatalogIndex(tmp_path / "r")) as idx:
            results = search_ids(idx, queries, 10)
            assert all(len(r) == 10 for r in results)
            assert not set(gone) & {i for r in results for i in r}
            assert results == brute_force(idx, queries, 10)[0] or kind == "hnsw"
            assert idx.store.count("embedded") == 270
            assert idx.load().ntotal == (270 if kind == "flat" else 300)  # HNSW filters tombstones
            assert len(idx.store.tombstones()) == (0 if kind == "flat" else 30)


# --- resume after a kill -----------------------------------------------------------------------

RESUME_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import make_tiny_embedder
from fashionlens.config import IndexConfig
from fashionlens.index.pipeline import build_index
cfg = IndexConfig(chunk_size=4, batch_size=4, workers=0)
build_index(Path(sys.argv[1]), Path(sys.argv[2]), cfg, embedder=make_tiny_embedder(delay=0.05))
"""


def _committed_chunks(db: Path) -> int:
    try:  # read-only: never create the database before the indexer does
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            return con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_resume_after_sigkill(tmp_path):
    n = 200
    make_catalog(tmp_path / "cat", n, size=16)
    out = tmp_path / "idx"
    script = tmp_path / "run_index.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(TESTS_DIR)))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cat"), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _committed_chunks(out / "catalog.sqlite") < 1:
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "no chunk committed in time"
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed: slow the tiny model down"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()

    with closing(CatalogIndex(out)) as idx:
        done_before = idx.store.count("embedded")
    assert 1 <= done_before < n
    report = build_index(tmp_path / "cat", out, IndexConfig(chunk_size=64, workers=0),
                         embedder=make_tiny_embedder())
    assert report.embedded == n - done_before and report.total == n

    with closing(CatalogIndex(out)) as idx:
        chunk_ids = np.concatenate([idx.chunks.read(c)[0] for c in idx.store.chunks()])
        assert len(chunk_ids) == len(set(chunk_ids.tolist())) == n  # every item exactly once
        assert idx.store.live_rowids(chunk_ids.tolist()) == set(chunk_ids.tolist())
        assert idx.load().ntotal == n and len(set(indexed_rowids(idx).tolist())) == n
        expected = {f"chunk-{c:06d}{s}" for c in idx.store.chunks() for s in (".npy", ".ids.npy")}
        assert {p.name for p in (out / "vectors").iterdir()} == expected
        rowids, vecs = all_vectors(idx)
        top = [hits[0].id for hits in idx.search(vecs[::20], 1)]
        assert top == [idx.store.get_rows([int(r)])[int(r)]["id"] for r in rowids[::20]]


def test_orphan_chunks_removed_and_missing_faiss_file_rebuilt(catalog, tiny_embedder, index_cfg, tmp_path):
    out = tmp_path / "idx"
    build_index(catalog, out, index_cfg, embedder=tiny_embedder)
    queries = unit(np.random.default_rng(5), 5, tiny_embedder.dim)
    with closing(CatalogIndex(out)) as idx:
        before = search_ids(idx, queries, 5)
    real = sorted(p.name for p in (out / "vectors").iterdir())
    np.save(out / "vectors" / "chunk-999999.npy", np.ones((3, 8), np.float32))
    np.save(out / "vectors" / "chunk-999999.ids.npy", np.arange(3))
    (out / "vectors" / "chunk-000001.npy.tmp").write_bytes(b"partial")
    (faiss_file,) = out.glob("index-*.faiss")
    faiss_file.unlink()
    with closing(CatalogIndex(out, write=True)) as idx:
        assert sorted(p.name for p in (out / "vectors").iterdir()) == real
        assert idx.load().ntotal == 24
        assert len(list(out.glob("index-*.faiss"))) == 1
        assert search_ids(idx, queries, 5) == before


# --- bad files ---------------------------------------------------------------------------------


def test_bad_files_are_skipped_and_listed(catalog, tiny_embedder, index_cfg, tmp_path):
    images = catalog / "images"
    rng = np.random.default_rng(6)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / "bad-trunc.jpg")
    data = (images / "bad-trunc.jpg").read_bytes()
    (images / "bad-trunc.jpg").write_bytes(data[: len(data) // 2])
    (images / "bad-text.jpg").write_text("hello, not a jpeg")
    (images / "bad-empty.jpg").write_bytes(b"")
    with open(catalog / "styles.csv", "a", newline="") as fh:
        csv.writer(fh).writerows([[i, "Shirts", "x"] for i in ("bad-trunc", "bad-text", "bad-empty", "bad-missing")])
    report = build_index(catalog, tmp_path / "idx", index_cfg, embedder=tiny_embedder)
    assert (report.total, report.embedded, report.skipped, report.missing) == (24, 24, 3, 1)
    with open(report.skipped_report, newline="") as fh:
        rows = list(csv.DictReader(fh))
    reasons = {r["id"]: r["reason"] for r in rows}
    assert len(rows) == 4 and set(reasons) == {"bad-trunc", "bad-text", "bad-empty", "bad-missing"}
    assert "broken image" in reasons["bad-trunc"]
    assert "not an image" in reasons["bad-text"] and "not an image" in reasons["bad-empty"]
    assert "not found" in reasons["bad-missing"]
    with closing(CatalogIndex(tmp_path / "idx")) as idx:
        assert idx.load().ntotal == 24
        rowids, vecs = all_vectors(idx)
        found = {h.id for hits in idx.search(vecs, 1) for h in hits}
        assert found == {f"item-{i:04d}" for i in range(24)}


# --- one model per index -----------------------------------------------------------------------


@pytest.mark.parametrize("other", [dict(out_channels=16), dict(name="another-model")])
def test_refuses_to_mix_models(catalog, tiny_embedder, index_cfg, tmp_path, other):
    out = tmp_path / "idx"
    build_index(catalog, out, index_cfg, embedder=tiny_embedder)
    make_catalog(catalog, 26, start=24)
    with pytest.raises(UserError, match=r"holds .*vectors of tiny-test"):
        build_index(catalog, out, index_cfg, embedder=make_tiny_embedder(**other))
    with closing(CatalogIndex(out)) as idx:
        assert idx.store.count() == 24 and idx.store.count("embedded") == 24
        assert idx.store.get_meta("embedder")["dim"] == 8
        assert idx.load().ntotal == 24
        assert len(idx.search(unit(np.random.default_rng(7), 1, 8), 3)[0]) == 3


def test_refresh_with_nothing_new_writes_no_generation(tmp_path):
    rng = np.random.default_rng(3)
    idx = synthetic_index(tmp_path / "s", unit(rng, 50, 8))
    try:
        gen, files = idx.store.get_meta("generation"), sorted(p.name for p in (tmp_path / "s").glob("index-*"))
        idx.refresh()
        assert idx.store.get_meta("generation") == gen
        assert sorted(p.name for p in (tmp_path / "s").glob("index-*")) == files
        idx.remove(["v00003"])  # a change: the next generation holds it
        assert idx.store.get_meta("generation") == gen + 1 and idx.load().ntotal == 49
    finally:
        idx.close()
