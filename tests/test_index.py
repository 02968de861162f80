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
from fashionlens.index.config import IndexConfig
from fashionlens.data.records import Item
from fashionlens.errors import UserError
from fashionlens.index import CatalogIndex
from fashionlens.index.pipeline import build_index
from fashionlens.index.types import IndexSpec, IVF_MIN, choose_spec, new_index
from fashionlens.index.vectors import ChunkFiles, rerank_exact, search_index


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


def clustered(rng, n: int, dim: int = 64, groups: int = 40, spread: float = 0.35) -> np.ndarray:
    """Unit vectors in groups of similar items, like real embeddings."""
    centres = unit(rng, groups, dim)
    data = centres[rng.integers(0, groups, n)] + spread * unit(rng, n, dim)
    return (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)


def exact_scores_of(idx: CatalogIndex, queries: np.ndarray, hits) -> list[list[float]]:
    """Each hit's true inner product with its query, from the stored vectors."""
    rowids, vecs = all_vectors(idx)
    at = {int(r): i for i, r in enumerate(rowids)}
    return [[float(q @ vecs[at[h.rowid]]) for h in row] for q, row in zip(queries, hits)]


def test_index_type_follows_the_catalog_size(tmp_path, fast_ivfpq):
    """9,000 clustered 64-d vectors added in three steps, flat_max 3,000 and ivf_flat_max 6,000:
    exact, then IVF-Flat, then IVF-PQ (8 bytes a vector) with its shortlist re-scored exactly.

    Thresholds: on this (seeded) data IVF-Flat (nprobe 64 of 128 lists) measured recall@10 1.0,
    and IVF-PQ 0.29 with its codes' own scores against 1.0 re-scored (nprobe 64 of 128 lists, a
    shortlist of 400); 0.9 leaves room for FAISS version and threading differences, while a broken
    index (wrong metric, untrained quantiser, mismatched ids, no re-scoring) falls below it. The
    re-scored scores are the true inner products."""
    rng = np.random.default_rng(3)
    data = clustered(rng, 9000)
    sizes = dict(flat_max=3000, ivf_flat_max=6000, pq_bytes=8)
    queries = data[rng.integers(0, 9000, 60)] + 0.1 * unit(rng, 60, 64)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    with closing(synthetic_index(tmp_path / "q", data[:2500], **sizes)) as idx:
        assert idx.spec.kind == "flat"
    # the catalog grows past flat_max: auto rebuilds as IVF-Flat, whose scores are exact
    with closing(synthetic_index(tmp_path / "q", data[2500:5000], first=2500, **sizes)) as idx:
        assert idx.spec == choose_spec(5000, 64, "ivfflat") and idx.spec.rerank is None
        assert idx.spec.factory == "IVF128,Flat" and idx.spec.nprobe == 64
        assert idx.load().ntotal == 5000 and idx.load().is_trained
        assert recall(idx, queries) >= 0.9
        hits = idx.search(queries, 10)
        np.testing.assert_allclose([[h.score for h in q] for q in hits], exact_scores_of(idx, queries, hits), atol=1e-5)
    # ... and past ivf_flat_max: IVF-PQ, its shortlist re-scored from the chunk files
    with closing(synthetic_index(tmp_path / "q", data[5000:], first=5000, **sizes)) as idx:
        spec = idx.spec
        assert spec == choose_spec(9000, 64, "ivfpq", pq_bytes=8) and spec.nprobe == 64 and spec.rerank == 400
        assert spec.factory == "IVF128,PQ8np"
        assert idx.store.get_meta("index_spec")["kind"] == "ivfpq"
        assert idx.load().ntotal == 9000 and idx.load().is_trained
        rescored = recall(idx, queries)
        hits = idx.search(queries, 10)
        got = [[h.score for h in q] for q in hits]
        np.testing.assert_allclose(got, exact_scores_of(idx, queries, hits), atol=1e-5)
        assert all(row == sorted(row, reverse=True) for row in got)
        idx._spec = IndexSpec(**{**spec.to_dict(), "rerank": None})  # the codes' own approximate scores
        approximate = recall(idx, queries)
        approx_hits = idx.search(queries, 10)
        assert np.abs(np.array([[h.score for h in q] for q in approx_hits])
                      - np.array(exact_scores_of(idx, queries, approx_hits))).max() > 1e-3
    assert rescored >= 0.9 and rescored > approximate + 0.3, (rescored, approximate)
    with closing(CatalogIndex(tmp_path / "q")) as reader, closing(CatalogIndex(tmp_path / "q", write=True)) as writer:
        assert faiss.extract_index_ivf(reader.load()).nprobe == 64  # search settings survive reopening
        first = reader.search(queries[:1], 10)[0]
        assert first[0].score == pytest.approx(hits[0][0].score, abs=1e-6)
        # removed by another process: the reader's FAISS index still holds the item, whose vector
        # the re-scoring no longer finds; it drops out, and the next candidate moves up
        writer.remove([first[0].id])
        assert reader.load().ntotal == 9000
        again = reader.search(queries[:1], 10)[0]
        assert [h.id for h in again[:9]] == [h.id for h in first[1:]] and len(again) == 10


def test_an_index_made_before_gets_the_search_settings_and_rebuilds_when_written(tmp_path, fast_ivfpq):
    """An IVF-PQ index recorded by an earlier version (32 lists probed, no re-scoring, settings
    without ivf_flat_max, pq_bytes or rerank): a reader searches it with today's search settings
    at once (re-scored, exact scores) and keeps its structure, saying how to rebuild it; a writer's
    next update rebuilds it as what the settings now give for its size (IVF-Flat here)."""
    rng = np.random.default_rng(5)
    data, queries = clustered(rng, 4000), clustered(rng, 20)
    with closing(synthetic_index(tmp_path / "old", data, flat_max=1000, index_type="ivfpq", pq_bytes=8)) as idx:
        old_spec = {k: v for k, v in idx.spec.to_dict().items() if k != "rerank"} | {"nprobe": 32}
        idx.store.set_meta("index_spec", old_spec)
        idx.store.set_meta("index_settings", {"index_type": "auto", "flat_max": 1000, "train_sample": 100_000})
    with closing(CatalogIndex(tmp_path / "old")) as reader:
        reader.load()
        assert reader._spec.factory == old_spec["factory"] and reader._spec.rerank == 400
        assert faiss.extract_index_ivf(reader.load()).nprobe == 64
        hits = reader.search(queries, 5)
        np.testing.assert_allclose([[h.score for h in q] for q in hits], exact_scores_of(reader, queries, hits), atol=1e-5)
        said = []
        assert reader.refresh(save=False, log=said.append).factory == old_spec["factory"]
        assert any("run 'fashionlens index'" in m and "IVF" in m for m in said), said
    with closing(CatalogIndex(tmp_path / "old", write=True)) as writer:
        spec = writer.refresh()
        assert spec.kind == "ivfflat" and writer.spec == spec and writer.load().ntotal == 4000
        assert recall(writer, queries, 5) >= 0.9


def _add_chunk(idx: CatalogIndex, vecs: np.ndarray, first: int) -> np.ndarray:
    """Items ``v<first+i>`` committed as one chunk, and added to the loaded FAISS index, as a
    writable server adds them (the saved file is not rewritten); their rowids."""
    store = idx.store
    store.upsert([Item(f"v{first + i:05d}", Path(f"/fake/{first + i}.jpg"), {}) for i in range(len(vecs))],
                 store.new_run())
    rowids = np.array([store.get_item(f"v{first + i:05d}")["rowid"] for i in range(len(vecs))], np.int64)
    chunk = store.next_chunk()
    idx.chunks.write(chunk, rowids, vecs)
    store.commit_chunk(chunk, rowids.tolist(), [])
    idx.load().add_with_ids(vecs, rowids)
    return rowids


def _remove(idx: CatalogIndex, item_id: str) -> int:
    """Remove an item as a writable server does: the store, then the loaded FAISS index."""
    rowid = idx.store.get_item(item_id)["rowid"]
    idx.load()
    idx.store.remove([item_id])
    if idx._spec.kind != "hnsw":
        idx.load().remove_ids(np.asarray([rowid], np.int64))
    return rowid


def test_a_rebuild_beside_the_index_in_use_catches_up_with_adds_and_removals(tmp_path):
    """A flat index that a server grew past flat_max is rebuilt as IVF-Flat from a snapshot while
    items are added and removed on the flat one, its file written before the swap; after the swap
    it holds exactly the live items (all 32 lists probed: exact search, so its answers equal brute
    force), the committed generation is its file plus what to replay (the chunks added after the
    file was written, tombstones for the removed rows in it), and a process killed right then
    loses nothing: the next writer replays them."""
    rng = np.random.default_rng(11)
    data = clustered(rng, 2200)
    with closing(synthetic_index(tmp_path / "g", data[:900], flat_max=1000)) as built:
        assert built.spec.kind == "flat"
    idx = CatalogIndex(tmp_path / "g", write=True)
    assert idx.start_rebuild() is None  # 900 items: flat is what the settings give
    _add_chunk(idx, data[900:1800], 900)  # grown past flat_max while serving
    gone_before = _remove(idx, "v00003")
    plan = idx.start_rebuild()
    assert plan.spec.kind == "ivfflat" and plan.spec.factory == "IVF32,Flat" and len(plan.live) == 1799
    # meanwhile, on the index in use: adds, and removals of old and of new items
    added = _add_chunk(idx, data[1800:2100], 1800)
    removed = [_remove(idx, "v00010"), _remove(idx, "v01000"), _remove(idx, "v01900")]
    idx.build(plan)
    assert plan.index.ntotal == 1799  # the snapshot, as noted
    later = idx.chunks_since(plan)
    assert len(later) == 1
    idx.add_chunks(plan, later)  # caught up outside the lock: every row, removals come at the end
    assert plan.index.ntotal == 2099 and idx.chunks_since(plan) == []
    idx.stage(plan)
    last = _add_chunk(idx, data[2100:2200], 2100)  # after the file was written
    added = np.concatenate([added, last])
    # a periodic write of the index in use meanwhile: the last chunk is marked as in the (old)
    # file, and the tombstones of the rows removed so far are cleared, as a server's persist() does
    idx.save(idx.store.chunks(in_index=False), idx.store.tombstones())
    assert not idx.store.chunks(in_index=False) and not idx.store.tombstones()
    assert (tmp_path / "g" / "rebuild-staged.faiss").exists()  # not taken for an old generation
    generation = idx.store.get_meta("generation")
    removed += [_remove(idx, "v02150"), _remove(idx, "v00020")]
    assert idx.spec.kind == "flat"  # nothing swapped yet
    queries = clustered(rng, 30)
    before = search_ids(idx, queries, 10)
    unsaved_chunks, unsaved_removed = idx.finish_rebuild(plan, removed)
    assert idx.spec == plan.spec and idx._spec is plan.spec and idx.load() is plan.index
    assert idx.store.get_meta("generation") == generation + 1 and not (tmp_path / "g" / "rebuild-staged.faiss").exists()
    live_rowids, _ = all_vectors(idx)
    assert sorted(indexed_rowids(idx).tolist()) == sorted(live_rowids.tolist())
    assert len(live_rowids) == 2200 - 6 and set(added.tolist()) - set(removed) <= set(live_rowids.tolist())
    assert gone_before not in live_rowids and not set(removed) & set(live_rowids.tolist())
    assert search_ids(idx, queries, 10) == brute_force(idx, queries, 10)[0] == before
    # the file holds the rows removed before it was written, not the last chunk
    assert unsaved_chunks == idx.store.chunks(in_index=False) and len(unsaved_chunks) == 1
    in_file = sorted(set(removed) - {removed[3]})  # v02150 came with the last chunk
    assert unsaved_removed == idx.store.tombstones() == in_file and len(in_file) == 4
    assert idx.start_rebuild() is None
    idx.close()  # killed here: no save of what the file lacks
    with closing(CatalogIndex(tmp_path / "g", write=True)) as again:
        again.refresh()
        assert again.spec.kind == "ivfflat" and again.load().ntotal == 2194
        assert not again.store.tombstones() and not again.store.chunks(in_index=False)
        assert search_ids(again, queries, 10) == before
    with closing(CatalogIndex(tmp_path / "g")) as reader:  # the new generation, as saved
        assert reader.load().ntotal == 2194 and reader.spec.kind == "ivfflat"
        assert search_ids(reader, queries, 10) == before


def test_a_rebuild_to_an_index_that_cannot_remove_keeps_the_tombstones_it_needs(tmp_path):
    """Settings changed to HNSW (no removal): rows removed before the snapshot are not in the new
    index, so their tombstones go; a row removed during the build is in it and stays tombstoned,
    and searches never return it."""
    rng = np.random.default_rng(12)
    data = clustered(rng, 700)
    with closing(synthetic_index(tmp_path / "h", data, flat_max=1000)) as built:
        built.store.set_meta("index_settings", {"index_type": "hnsw", "flat_max": 1000, "train_sample": 100_000})
    with closing(CatalogIndex(tmp_path / "h", write=True)) as idx:
        early = _remove(idx, "v00001")
        idx.save([], [early])  # the flat index dropped it and is saved: its tombstone is cleared
        assert not idx.store.tombstones()
        late_tomb = idx.store.get_item("v00002")["rowid"]
        idx.store.remove(["v00002"])  # a tombstone a flat index has not applied yet
        plan = idx.start_rebuild()
        assert plan.spec.kind == "hnsw" and early not in plan.live and late_tomb not in plan.live
        during = _remove(idx, "v00005")
        idx.build(plan)
        idx.save([], [during])  # a periodic write of the flat index in use clears its tombstone meanwhile
        assert idx.store.tombstones() == [late_tomb]  # only the one the flat index has not applied
        assert idx.finish_rebuild(plan, [during]) == ([], [])  # nothing to save: the file has it all
        assert idx.spec.kind == "hnsw" and idx.load().ntotal == 698  # v00005 is in it
        assert idx.store.tombstones() == [during]
        assert "v00005" not in {h.id for h in idx.search(data[5:6], 20)[0]}
        assert idx.search(data[6:7], 1)[0][0].id == "v00006"
    with closing(CatalogIndex(tmp_path / "h", write=True)) as again:  # as a restart finds it
        again.refresh()
        assert again.spec.kind == "hnsw" and again.load().ntotal == 698 and again.store.tombstones() == [during]
        hits = again.search(data[5:6], 20)[0]
        assert len(hits) == 20 and "v00005" not in {h.id for h in hits}


def test_an_ivf_index_of_too_few_vectors_is_refused_clearly(tmp_path):
    """auto stays exact below IVF_MIN whatever flat_max says; a forced IVF type on too few
    vectors to train is refused with a message, not FAISS's exception."""
    rng = np.random.default_rng(13)
    with closing(synthetic_index(tmp_path / "a", unit(rng, 40, 16), flat_max=10)) as idx:
        assert idx.spec.kind == "flat"
    with pytest.raises(UserError, match="needs at least 256 vectors to train"):
        synthetic_index(tmp_path / "b", unit(rng, 40, 16), index_type="ivfpq").close()


def test_rerank_exact_against_brute_force():
    rng = np.random.default_rng(7)
    stored = {int(r): v for r, v in zip(rng.permutation(1000)[:300], unit(rng, 300, 16))}
    known = np.array(sorted(stored), np.int64)
    lookups = []

    def vectors_of(rowids):
        lookups.append(rowids)
        found = np.array([r for r in rowids if r in stored], np.int64)
        return found, np.array([stored[int(r)] for r in found], np.float32).reshape(len(found), 16)

    twin = int(known[1])
    stored[twin] = stored[int(known[0])].copy()  # an exact tie: the lower row id comes first
    queries = unit(rng, 6, 16)
    ids = np.full((6, 40), -1, np.int64)
    for q in range(6):  # FAISS-like answers: distinct candidates, some removed since (not stored), -1 padding
        n = [40, 25, 3, 0, 40, 12][q]
        ids[q, :n] = rng.choice(np.concatenate([known, [5000, 5001, 5002]]), n, replace=False)
    ids[0, :2] = known[[1, 0]]  # the tied pair, in the wrong order
    ids[1, 30:32] = ids[1, 0]  # a row named three times
    queries[0] = stored[twin]  # the tied pair are query 0's best two
    for k in (1, 5, 30):
        scores, got = rerank_exact(queries, ids, vectors_of, k)
        assert got.shape == scores.shape == (6, k)
        for q in range(6):  # brute force: every stored candidate once, scored, best first (ties by row id)
            cands = sorted({int(r) for r in ids[q] if r in stored})
            exact = sorted(((float(queries[q] @ stored[r]), r) for r in cands), key=lambda t: -t[0])[:k]
            assert got[q, :len(exact)].tolist() == [r for _, r in exact]
            np.testing.assert_allclose(scores[q, :len(exact)], [s for s, _ in exact], atol=1e-6)
            assert (got[q, len(exact):] == -1).all()
        assert len(set(got[1][got[1] >= 0].tolist())) == (got[1] >= 0).sum()  # each row once
        assert got[0, :2].tolist() == [int(known[0]), twin][:k]  # the tie: the lower row id first
    assert all(np.array_equal(lk, np.unique(lk)) and (lk >= 0).all() for lk in lookups)  # sorted, unique, no -1
    none = rerank_exact(queries[:2], np.full((2, 4), -1, np.int64), vectors_of, 3)[1]
    assert (none == -1).all()


def test_a_writer_rebuilds_for_other_codes_or_four_times_the_lists_not_one_step(tmp_path, fast_ivfpq):
    """``refresh`` by a writer: other PQ codes (same type) rebuild; a list count one power of two
    off does not (a catalog hovering at a step would be retrained at every update); four times the
    lists, as the catalog grew, does."""
    rng = np.random.default_rng(6)
    data = clustered(rng, 6000)
    with closing(synthetic_index(tmp_path / "pq", data[:3000], index_type="ivfpq", pq_bytes=4)) as idx:
        assert idx.spec.factory.endswith("PQ4np")
        settings = idx.store.get_meta("index_settings")
        idx.store.set_meta("index_settings", {**settings, "pq_bytes": 8})
        assert idx.refresh().factory.endswith("PQ8np") and idx.load().ntotal == 3000
    with closing(synthetic_index(tmp_path / "f", data[:1248], index_type="ivfflat")) as idx:
        assert idx.spec.factory == "IVF32,Flat"
        one = idx.store.get_rows(all_vectors(idx)[0][:1].tolist())
        idx.remove([next(iter(one.values()))["id"]])  # 1,247 items call for 16 lists: kept at 32
        assert idx.spec.factory == "IVF32,Flat" and idx.load().ntotal == 1247
    with closing(synthetic_index(tmp_path / "f", data[1248:2496], index_type="ivfflat", first=1248)) as idx:
        assert idx.spec.factory == "IVF32,Flat"  # 2,495 items call for 64: one step, kept
    with closing(synthetic_index(tmp_path / "f", data[2496:], index_type="ivfflat", first=2496)) as idx:
        assert idx.spec.factory == "IVF128,Flat" and idx.load().ntotal == 5999  # 4x the lists: rebuilt


def test_stored_vectors_of_live_items_only(tmp_path):
    """``CatalogIndex.vectors``: each live item's stored vector, whatever order or repeats it is
    asked in; removed and unknown rows are left out, and `recommend` says so instead of using
    another item's vector."""
    from fashionlens.index.recommend import liked_vectors

    rng = np.random.default_rng(4)
    data = unit(rng, 1200, 8)
    with closing(synthetic_index(tmp_path / "v", data, chunk=500)) as idx:
        rowids, _ = all_vectors(idx)
        by_item = {int(r): data[int(idx.store.get_rows([int(r)])[int(r)]["id"][1:])] for r in rowids}
        ask = np.array([rowids[900], rowids[3], rowids[3], rowids[1100], 10**9])
        found, vecs = idx.vectors(ask)
        assert found.tolist() == sorted({int(r) for r in ask[:4]})
        np.testing.assert_array_equal(vecs, np.stack([by_item[int(r)] for r in found]))
        np.testing.assert_array_equal(liked_vectors(idx, [int(rowids[1100]), int(rowids[3])]),
                                      np.stack([by_item[int(rowids[1100])], by_item[int(rowids[3])]]))
        idx.remove([idx.store.get_rows([int(rowids[3])])[int(rowids[3])]["id"]])
        assert idx.vectors(ask)[0].tolist() == sorted({int(rowids[900]), int(rowids[1100])})
        with pytest.raises(UserError, match="1 of the liked items left the index"):
            liked_vectors(idx, [int(rowids[1100]), int(rowids[3])])


def test_store_reads_more_rows_than_sqlite_takes_parameters(tmp_path):
    """A batch's re-scored shortlists can name more rows than SQLite's default build allows
    parameters in one statement (32,766); the store asks in pieces."""
    import sqlite3

    from fashionlens.data.records import Item
    from fashionlens.index.store import CatalogStore

    store = CatalogStore(tmp_path / "s.sqlite")
    store.db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32_766)
    store.upsert([Item(f"i{i}", Path(f"/x/{i}.jpg"), {}) for i in range(40_000)], store.new_run())
    rowids = [r for page in store.pending(40_000) for r, _ in page]
    store.commit_chunk(1, rowids[:35_000], [])
    asked = rowids + [10**9]  # all of them, one unknown: only the 35,000 embedded come back
    assert sorted(store.chunk_of(asked)) == rowids[:35_000] and set(store.chunk_of(asked).values()) == {1}
    assert len(store.get_rows(asked)) == len(store.live_rowids(asked)) == 35_000
    store.close()


def test_chunk_rows_read_only_what_is_asked(tmp_path):
    files = ChunkFiles(tmp_path / "v")
    rng = np.random.default_rng(0)
    ids = rng.permutation(500)[:200].astype(np.int64)  # not sorted, as a chunk may be
    vecs = rng.normal(size=(200, 8)).astype(np.float32)
    files.write(3, ids, vecs)
    ask = ids[[150, 2, 77, 2]]
    np.testing.assert_array_equal(files.rows(3, ask), vecs[[150, 2, 77, 2]])
    missing = int(np.setdiff1d(np.arange(600), ids)[0])
    with pytest.raises(KeyError, match=f"does not hold rows \\[{missing}\\]"):
        files.rows(3, np.array([ids[0], missing]))


def test_ivfpq_skips_polysemous_training():
    """FAISS's factory string "IVFn,PQm" enables polysemous training, which here took ~250 s of
    the training of 3000 vectors (PQ64) and is never used by search (polysemous_ht stays 0);
    "PQ{m}np" turns it off."""
    index = new_index(choose_spec(500_000, 1280))
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
    # auto by size: exact, IVF-Flat, IVF-PQ (defaults 20,000 and 100,000)
    assert [choose_spec(n, 1280).kind for n in (20_000, 20_001, 100_000, 100_001)] == [
        "flat", "ivfflat", "ivfflat", "ivfpq"]
    assert choose_spec(5000, 64, flat_max=1000, ivf_flat_max=500).kind == "ivfpq"  # an empty IVF-Flat band
    big = choose_spec(1001, 1280, flat_max=1000, ivf_flat_max=1000)
    assert big.kind == "ivfpq" and re.fullmatch(r"IVF\d+,PQ128(np)?", big.factory) and big.rerank == 400
    assert choose_spec(10**6, 1280, rerank=0).rerank is None
    # too few vectors to train an IVF index: exact, whatever flat_max says
    assert [choose_spec(n, 64, flat_max=10).kind for n in (IVF_MIN - 1, IVF_MIN)] == ["flat", "ivfflat"]

    def parse(spec):
        return tuple(map(int, re.fullmatch(r"IVF(\d+),(?:PQ(\d+)(?:np)?|Flat)", spec.factory).groups(default="0")))

    for kind, per_sqrt in (("ivfpq", 2), ("ivfflat", 4)):
        lists = []
        for n in (101, 10_000, 10**6, 10**7):  # nlist: a power of two, growing like sqrt(n) up to the sample's cap
            nlist, _ = parse(choose_spec(n, 64, kind))
            assert nlist & (nlist - 1) == 0 and 16 <= nlist <= max(16, 2 * per_sqrt * n ** 0.5)
            assert nlist * 39 <= min(n, 50_000) or nlist == 16  # ~39 training points a list, from the sample
            lists.append(nlist)
        assert lists == sorted(lists) and lists[-1] > lists[0]
        assert parse(choose_spec(10**6, 64, kind, train_sample=200_000))[0] > lists[-1]  # a larger sample, more lists
    for dim, want_m in ((8, 8), (96, 96), (100, 100), (1280, 128), (97, 97), (768, 128), (131, 1)):
        spec = choose_spec(50_000, dim, "ivfpq")
        nlist, m = parse(spec)
        assert m == want_m and dim % m == 0 and 1 <= spec.nprobe <= nlist
        new_index(spec)  # a valid FAISS factory string
    new_index(choose_spec(50_000, 1280, "ivfflat"))
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
from fashionlens.index.config import IndexConfig
from fashionlens.data.records import Item
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
