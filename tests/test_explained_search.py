"""Attributes stored in the index (index-attributes), explained search, --want and recommend.

One small real index (12 drawn garments + one large JPEG, the embedded Lite0 at 64 px) and a
tiny attribute checkpoint whose heads are set by hand, so that every prediction is known:
red garments have a v-shape neckline and are black, blue ones a round neckline and are white,
every garment has long sleeves and a collar, and the pattern is never confident.
"""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from attribute_world import N, RED, SCHEMA, build_attribute_world, draw
from conftest import all_vectors, run_cli_inprocess, synthetic_index, unit
from fashionlens.index.config import IndexAttributesConfig, IndexConfig, SearchConfig
from fashionlens.index.stores import Where
from fashionlens.index.recommend import RecommendConfig
from fashionlens.errors import UserError
from fashionlens.index import LocalStore
from fashionlens.index.attribute_store import Projection, StoredAttributes, projection_spec
from fashionlens.index.attribute_indexing import index_attributes
from fashionlens.index.query import Searcher, compare, reason_text

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_attribute_world(tmp_path_factory.mktemp("explained"))


@pytest.fixture
def index_copy(world, tmp_path) -> Path:
    shutil.copytree(world["index"], tmp_path / "index")
    return tmp_path / "index"


def _db(folder: Path):
    return closing(sqlite3.connect(folder / "catalog.sqlite"))


def _stored(folder: Path) -> dict[str, list]:
    with closing(LocalStore(folder)) as idx:
        attrs = StoredAttributes(idx)
        ids = {r[0]: r[1] for r in idx.store.db.execute("SELECT item_id, rowid FROM items")}
        rows = attrs.rows(list(ids.values()))
        return {i: rows[r] for i, r in ids.items() if r in rows}


def _searcher(folder: Path) -> Searcher:
    searcher = Searcher.__new__(Searcher)  # the index's own model, without TorchScript freezing
    from fashionlens.models.embedder import build_embedder

    searcher.index = LocalStore(folder)
    searcher.attributes = StoredAttributes(searcher.index)
    searcher.embedder = build_embedder("lite0", 64, optimize="none")
    searcher.optimize = "none"
    return searcher


# --- index-attributes --------------------------------------------------------------------------


def test_rows_per_item_and_attribute_with_known_predictions(world):
    stored = _stored(world["index"])
    assert len(stored) == N + 1
    with _db(world["index"]) as db:
        assert db.execute("SELECT COUNT(*) FROM item_attributes").fetchone()[0] == (N + 1) * len(SCHEMA)
        blob_sizes = {r[0] for r in db.execute("SELECT length(feature) FROM item_attributes WHERE feature IS NOT NULL")}
        meta = json.loads(db.execute("SELECT value FROM meta WHERE key='attributes'").fetchone()[0])
    assert blob_sizes == {128 * 2}  # 128 float16
    assert meta["schema"] == SCHEMA and meta["loss"] == "sigmoid" and meta["box_threshold"] == 0.5
    assert meta["feature"]["shape"] == [1280, 128] and meta["feature"]["seed"] == 0
    for item, attrs in stored.items():
        values = [a.value for a in attrs]
        red = item in RED
        assert values[:4] == ["long sleeves", "v-shape" if red else "round", "black" if red else "white", "yes"]
        assert all(a.confidence > 0.7 for a in attrs[:4]) and attrs[4].confidence < 0.5
        assert attrs[1].scores["other"] < 0.01 and abs(sum(attrs[0].scores.values()) - 1) < 0.02
        assert attrs[4].box is None and attrs[4].feature is None  # zero weights: no CAM region
        assert attrs[0].box is not None and attrs[0].feature.dtype == np.float16
    # the large photo (decoded at 1/4 scale): boxes in its own 400 x 300 pixels
    boxes = [a.box for a in stored["item-12"] if a.box]
    assert all(x + w <= 400 and y + h <= 300 for x, y, w, h in boxes) and max(b[2] for b in boxes) > 100


def test_resume_skips_done_items_and_retries_unreadable(index_copy, world):
    before = _stored(index_copy)
    with _db(index_copy) as db, db:  # as if killed before the last two items were done
        db.execute("DELETE FROM attribute_state WHERE item IN (SELECT rowid FROM items WHERE item_id IN "
                   "('item-03', 'item-04'))")
    image = Path(world["rows"][4][1])
    saved = image.read_bytes()
    try:
        image.write_bytes(b"not a jpeg")
        report = index_attributes(index_copy, world["ckpt"], IndexAttributesConfig(batch_size=5))
    finally:
        image.write_bytes(saved)
    assert (report.explained, report.skipped, report.total) == (1, 1, N)
    assert "item-04" in (index_copy / "attributes-skipped.csv").read_text()
    assert "item-04" not in _stored(index_copy)  # no predictions of a photo that is not there any more
    report = index_attributes(index_copy, world["ckpt"], IndexAttributesConfig(batch_size=5))
    assert (report.explained, report.skipped, report.total) == (1, 0, N + 1)
    after = _stored(index_copy)
    assert [[(a.value, round(a.confidence, 5)) for a in after[i]] for i in sorted(after)] == \
           [[(a.value, round(a.confidence, 5)) for a in before[i]] for i in sorted(before)]
    assert index_attributes(index_copy, world["ckpt"], IndexAttributesConfig()).explained == 0


def test_another_model_needs_replace_and_remove_drops_rows(index_copy, world):
    with pytest.raises(UserError, match="--replace"):
        index_attributes(index_copy, world["other"], IndexAttributesConfig())
    with pytest.raises(UserError, match="feature"):
        index_attributes(index_copy, world["ckpt"], IndexAttributesConfig(feature_dim=0))
    report = index_attributes(index_copy, world["other"], IndexAttributesConfig(feature_dim=0), replace=True)
    assert report.explained == report.total == N + 1
    with _db(index_copy) as db:
        assert {r[0] for r in db.execute("SELECT length(feature) FROM item_attributes WHERE feature IS NOT NULL")} \
            == {1280 * 2}
        rowid = db.execute("SELECT rowid FROM items WHERE item_id='item-05'").fetchone()[0]
    with closing(LocalStore(index_copy, write=True)) as idx:
        assert idx.remove(["item-05"]) == []
    with _db(index_copy) as db:
        assert db.execute("SELECT COUNT(*) FROM item_attributes WHERE item=?", (rowid,)).fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM attribute_state WHERE item=?", (rowid,)).fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM item_attributes").fetchone()[0] == N * len(SCHEMA)


def test_a_changed_item_loses_its_old_attributes(index_copy, world):
    from fashionlens.index.pipeline import build_index
    from fashionlens.models.embedder import build_embedder

    root = index_copy.parent
    moved = root / "moved.jpg"
    draw(moved, 1)  # item-02 becomes a blue garment at a new path
    rows = [[i, str(moved) if i == "item-02" else p, t] for i, p, t in world["rows"]]
    with open(root / "catalog.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["id", "path", "articleType"], *rows])
    build_index(root / "catalog.csv", index_copy, IndexConfig(input_size=64, workers=0),
                embedder=build_embedder("lite0", 64, optimize="none"))
    assert "item-02" not in _stored(index_copy)
    with _db(index_copy) as db:
        assert db.execute("SELECT COUNT(*) FROM item_attributes WHERE item NOT IN (SELECT rowid FROM items)"
                          ).fetchone()[0] == 0
    assert index_attributes(index_copy, world["ckpt"], IndexAttributesConfig()).explained == 1
    assert _stored(index_copy)["item-02"][1].value == "round"


def test_projection_is_orthonormal_float16_and_keeps_cosines():
    spec = projection_spec(1280, 128, 7)
    project = Projection(spec)
    assert project.matrix.shape == (1280, 128)
    np.testing.assert_allclose(project.matrix.T @ project.matrix, np.eye(128), atol=1e-4)
    rng = np.random.default_rng(0)
    x, z = unit(rng, 300, 1280), unit(rng, 300, 1280)
    target = rng.uniform(-1, 1, 300)
    z -= (z * x).sum(1, keepdims=True) * x
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    y = target[:, None] * x + np.sqrt(1 - target[:, None] ** 2) * z  # cos(x, y) = target
    px, py = np.stack([project(v) for v in x]), np.stack([project(v) for v in y])
    assert px.dtype == np.float16 and px.shape == (300, 128)
    got = (px.astype(np.float32) * py.astype(np.float32)).sum(1)
    err = np.abs(got - target)
    # expected error ~ sqrt(1 - cos^2) / sqrt(128): mean ~0.06, loose bounds
    assert err.mean() < 0.1 and err.max() < 0.4
    assert Projection(projection_spec(1280, 0, 0)).matrix is None


# --- explained search ---------------------------------------------------------------------------


def test_reasons_same_and_differs():
    from fashionlens.explain.explainer import AttributeResult
    from fashionlens.index.attribute_store import StoredAttribute

    spec = projection_spec(8, 0, 0)
    f = lambda *v: np.array(v + (0,) * (8 - len(v)), np.float32)  # noqa: E731
    q = [AttributeResult("sleeve_length_labels", "long sleeves", 1, 0.9, {}, (0, 0, 1, 1), None, "long sleeves",
                         None, f(1, 0)),
         AttributeResult("neckline_labels", "round", 1, 0.8, {}, (0, 0, 1, 1), None, "round neckline", None, f(0, 1)),
         AttributeResult("colour_labels", "black", 0, 0.95, {}, None, None, "black colour", None, None),
         AttributeResult("collar_labels", "yes", 1, 0.4, {}, None, None, "collar", None, None)]
    s = [StoredAttribute("sleeve_length_labels", "long sleeves", 1, 0.7, {}, None, f(1, 1)),
         StoredAttribute("neckline_labels", "round", 1, 0.9, {}, None, f(0, 1)),
         StoredAttribute("colour_labels", "white", 1, 0.6, {}, None, None),
         StoredAttribute("collar_labels", "yes", 1, 0.9, {}, None, None)]
    reasons = compare(q, s, Projection(spec), 0.5)
    assert [r["value"] for r in reasons["same"]] == ["round", "long sleeves"]  # most similar region first
    assert [r["similarity"] for r in reasons["same"]] == [1.0, pytest.approx(0.7071, abs=1e-3)]
    assert reasons["differs"] == [{"attribute": "colour_labels", "query_value": "black", "item_value": "white",
                                   "similarity": None}]
    assert reason_text(reasons) == "same: round neckline, long sleeves; differs: colour (black vs white)"
    assert reason_text(reasons, max_reasons=1) == "same: round neckline, +1 more; differs: colour (black vs white)"
    assert reason_text(compare(q, s, Projection(spec), 0.99)) == "no attribute confidently predicted on both"
    absent = {"same": [{"phrase": "no collar", "value": "no"}, {"phrase": "round neckline", "value": "round"}]}
    assert reason_text(absent) == "same: round neckline, no collar"  # absences last in the text


def test_explained_search_of_a_red_garment(world):
    from fashionlens.data.images import open_image

    photo = open_image(world["rows"][0][1])  # red
    searcher = _searcher(world["index"])
    try:
        (hits,), (query,) = searcher.search_explained([photo], SearchConfig(k=N + 1, explain=True))
    finally:
        searcher.close()
    assert [a.value for a in query][:3] == ["long sleeves", "v-shape", "black"]
    assert len(hits) == N + 1
    for h in hits:
        same = [r["attribute"] for r in h.reasons["same"]]
        assert sorted(same + [r["attribute"] for r in h.reasons["differs"]]) == sorted(list(SCHEMA)[:4])
        sims = [r["similarity"] for r in h.reasons["same"]]
        assert sims == sorted(sims, reverse=True)
        if h.id in RED:
            assert h.reasons["differs"] == [] and h.reasons["text"].startswith("same: ")
        else:
            assert sorted(same) == ["collar_labels", "sleeve_length_labels"]
            assert h.reasons["text"].endswith("; differs: neckline (v-shape vs round), colour (black vs white)")
            assert set(h.reasons["text"].split(";")[0].removeprefix("same: ").split(", ")) == {"long sleeves", "collar"}


def test_the_attribute_model_is_traced_only_for_many_photos(world, monkeypatch):
    """A search of a few photos keeps the eager attribute model (tracing costs more than it
    saves); from ``TRACE_FROM`` photos the searcher's own ``optimize`` applies."""
    from fashionlens.data.images import open_image
    from fashionlens.index import query

    asked = []
    original = StoredAttributes.explainer

    def explainer(self, device="cpu", optimize="auto"):
        asked.append(optimize)
        return original(self, device, optimize)
    monkeypatch.setattr(StoredAttributes, "explainer", explainer)
    photos = [open_image(world["rows"][n][1]) for n in (0, 1)]
    searcher = _searcher(world["index"])
    searcher.optimize = "jit"
    try:
        few = searcher.search_explained(photos, SearchConfig(k=3, explain=True))
        monkeypatch.setattr(query, "TRACE_FROM", 2)
        many = searcher.search_explained(photos, SearchConfig(k=3, explain=True))
    finally:
        searcher.close()
    assert asked == ["none", "jit"]
    assert [[a.value for a in q] for q in few[1]] == [[a.value for a in q] for q in many[1]]


def test_want_is_the_plain_order_filtered(world):
    from fashionlens.data.images import open_image

    photo = open_image(world["rows"][0][1])
    stored = _stored(world["index"])
    searcher = _searcher(world["index"])
    try:
        plain = [h.id for h in searcher.search_images([photo], k=N + 1)[0]]
        for want, k in (["colour=white"], 3), (["neckline_labels=round", "Sleeve length=long sleeves"], 20):
            (hits,), queries = searcher.search_explained([photo], SearchConfig(k=k, want=want))
            expected = [i for i in plain if i not in RED][:k]
            assert [h.id for h in hits] == expected and queries is None
            assert all(stored[h.id][2].value == "white" for h in hits)
            text = "wanted: round neckline, long sleeves" if len(want) == 2 else "wanted: white colour"
            assert {h.reasons["text"] for h in hits} == {text}
        (hits,), _ = searcher.search_explained([photo], SearchConfig(k=5, want=["colour=white"], max_pool=4))
        assert [h.id for h in hits] == [i for i in plain[:4] if i not in RED]  # never past the cap
        for bad, words in (["fit=slim"], "sleeve length"), (["colour=green"], "black, white"), (["colour"], "neckline"):
            with pytest.raises(UserError, match=words):
                searcher.search_explained([photo], SearchConfig(want=bad))
    finally:
        searcher.close()


def test_want_pools_grow_until_k_found(tmp_path):
    """300 random vectors, the wanted value on 6 far-apart items: pools grow x4 up to max_pool."""
    rng = np.random.default_rng(5)
    vecs = unit(rng, 300, 16)
    idx = synthetic_index(tmp_path / "s", vecs)
    query = unit(rng, 1, 16)[0]
    order = np.argsort(-(vecs @ query), kind="stable")
    wanted = set(order[[3, 40, 41, 120, 150, 299]].tolist())
    spec = projection_spec(4, 0, 0)
    idx.store.set_meta("attributes", {"schema": {"fit_labels": ["slim", "loose"]}, "feature": spec})
    rowids = {int(r[1][1:]): r[0] for r in idx.store.db.execute("SELECT rowid, item_id FROM items")}
    with idx.store.db:
        idx.store.db.executemany("INSERT INTO item_attributes VALUES (?, 0, ?, 0.9, ?, NULL, NULL, NULL, NULL, NULL)",
                                 [(rowids[i], int(i in wanted), np.zeros(2, np.float16).tobytes()) for i in range(300)])
    searcher = Searcher.__new__(Searcher)
    searcher.index, searcher.attributes = idx, StoredAttributes(idx)
    calls = []
    search = idx.search
    idx.search = lambda q, k: calls.append(k) or search(q, k)
    try:
        hits = idx.search_where(query, 4, Where(wants=[(0, 1)]), searcher.attributes)
        assert [int(h.id[1:]) for h in hits] == order[[3, 40, 41, 120]].tolist() and calls == [40, 160]
        calls.clear()
        hits = idx.search_where(query, 4, Where(wants=[(0, 1)], max_pool=100), searcher.attributes)
        assert len(hits) == 4 - 1 and calls == [40, 100]
    finally:
        idx.close()


# --- recommend ----------------------------------------------------------------------------------


def test_recommend_against_brute_force(world):
    from fashionlens.index.recommend import recommend

    folder, liked = world["index"], ["item-00", "item-02", "item-05"]
    stored = _stored(folder)
    cfg = RecommendConfig(k=20, pool=100, min_share=0.6)
    shared, ranked = recommend(folder, liked, cfg)
    # brute force: 2 of 3 liked items needed; red ones (00, 02) share v-shape + black
    expected = []
    for a, name in enumerate(SCHEMA):
        counts = {}
        for i in liked:
            if stored[i][a].confidence >= 0.5:
                counts[stored[i][a].value] = counts.get(stored[i][a].value, 0) + 1
        best = max(counts.items(), key=lambda kv: kv[1], default=(None, 0))
        if best[1] >= 2:
            expected.append((name, best[0]))
    assert sorted((s["attribute"], s["value"]) for s in shared) == sorted(expected)
    assert {s["phrase"] for s in shared} == {"long sleeves", "v-shape neckline", "black colour", "collar"}
    with closing(LocalStore(folder)) as idx:
        rowids, vecs = all_vectors(idx)
        names = {r: v["id"] for r, v in idx.store.get_rows(rowids.tolist()).items()}
    by_id = {names[int(r)]: v for r, v in zip(rowids, vecs)}
    centre = np.mean([by_id[i] for i in liked], axis=0)
    centre /= np.linalg.norm(centre)
    scores = {}
    for i, v in by_id.items():
        if i not in liked:
            attr = np.mean([stored[i][list(SCHEMA).index(a)].scores[val] for a, val in expected])
            scores[i] = attr + 0.5 * float(v @ centre)
    truth = sorted(scores, key=lambda i: -scores[i])
    assert [r.id for r in ranked] == truth and not set(liked) & {r.id for r in ranked}
    np.testing.assert_allclose([r.score for r in ranked], [scores[i] for i in truth], atol=2e-3)
    assert all(("v-shape neckline" in r.shares) == (r.id in RED) for r in ranked)
    with pytest.raises(UserError, match="nope"):
        recommend(folder, ["item-00", "nope"], cfg)


# --- the command line ---------------------------------------------------------------------------


def test_cli_explain_json_info_and_errors(world, monkeypatch, capsys, tmp_path):
    import fashionlens.index.query as query_mod

    real = query_mod.build_embedder
    monkeypatch.setattr(query_mod, "build_embedder", lambda *a, **kw: real(*a, **{**kw, "optimize": "none"}))
    index, photo = world["index"], world["rows"][1][1]
    rc, out, err = run_cli_inprocess(monkeypatch, capsys, "search", index, photo, "-k", "3", "--explain", "--json",
                                     "--want", "neckline=round")
    assert rc == 0, err
    (entry,) = json.loads(out)
    assert len(entry["results"]) == 3 and entry["attributes"][1]["value"] == "round"
    reasons = entry["results"][0]["reasons"]
    assert reasons["wanted"][0]["value"] == "round" and reasons["differs"] == []
    assert reasons["text"].startswith("wanted: round neckline; same: ")
    rc, out, _ = run_cli_inprocess(monkeypatch, capsys, "search", index, photo, "-k", "2", "--explain")
    assert rc == 0 and "1. item-01: same: " in out
    rc, out, _ = run_cli_inprocess(monkeypatch, capsys, "info", index)
    assert rc == 0 and json.loads(out)["attributes"]["items_done"] == N + 1
    rc, out, _ = run_cli_inprocess(monkeypatch, capsys, "recommend", index, "item-01", "item-03", "--json")
    assert rc == 0 and json.loads(out)["results"][0]["text"].startswith("shares: ")
    bare = tmp_path / "bare"
    synthetic_index(bare, unit(np.random.default_rng(0), 4, 8)).close()
    for args, words in ((["search", bare, photo, "--explain"], "index-attributes"),
                        (["recommend", index, "item-01", "missing-id"], "missing-id"),
                        (["search", index, photo, "--want", "size=xl"], "neckline"),
                        (["index-attributes", index, "--model", world["other"]], "--replace")):
        rc, _, err = run_cli_inprocess(monkeypatch, capsys, *args)
        assert rc == 2 and err.count("\n") == 1 and words in err, err


def test_a_catalog_photo_finds_itself_with_score_one(world, monkeypatch, capsys):
    """item-12 is a 400 x 300 JPEG, indexed at 64 px (decoded at 1/4 scale): search decodes the
    query the same way, plain and explained, so the photo's own item scores 1."""
    photo = str(world["rows"][N][1])
    for extra in ([], ["--explain"], ["--filter", "articleType=Tops"]):
        rc, out, _ = run_cli_inprocess(monkeypatch, capsys, "search", str(world["index"]), photo, "-k", "1", "--json",
                                       *extra)
        first = json.loads(out)[0]["results"][0]
        assert rc == 0 and first["id"] == "item-12" and first["score"] == pytest.approx(1.0, abs=1e-5), extra
