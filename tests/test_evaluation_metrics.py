"""Retrieval metrics against brute-force references, aggregation by hand, and the reports."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from fashionlens.evaluation import (
    HtmlReport,
    MetricAccumulator,
    average_precision_at_k,
    hit_rate_at_k,
    plot_hit_rate,
    recall_at_k,
    summarize,
    write_json,
)

# --- brute-force references, written from the definitions ------------------------------------


def ranked_relevance(rng: random.Random, gallery: int, n_retrieved: int) -> tuple[list[bool], int]:
    """Random scores and relevance over a gallery; fully sort; keep the top ``n_retrieved``."""
    items = [(rng.random(), rng.random() < 0.3) for _ in range(gallery)]
    items.sort(key=lambda it: it[0], reverse=True)
    n_relevant = 0
    for _, rel in items:
        if rel:
            n_relevant += 1
    return [rel for _, rel in items[:n_retrieved]], n_relevant


def ref_hit(hits: list[bool], k: int) -> float:
    for rank in range(1, k + 1):
        if rank <= len(hits) and hits[rank - 1]:
            return 1.0
    return 0.0


def ref_recall(hits: list[bool], n_relevant: int, k: int) -> float:
    if n_relevant == 0:
        return 0.0
    found = 0
    for rank in range(1, k + 1):
        if rank <= len(hits) and hits[rank - 1]:
            found += 1
    return found / n_relevant


def ref_ap(hits: list[bool], n_relevant: int, k: int) -> float:
    if n_relevant == 0:
        return 0.0
    total = 0.0
    for i in range(1, min(k, len(hits)) + 1):
        if hits[i - 1]:
            relevant_up_to_i = 0
            for j in range(1, i + 1):
                if hits[j - 1]:
                    relevant_up_to_i += 1
            total += relevant_up_to_i / i
    return total / min(k, n_relevant)


# --- single-query metrics ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_metrics_match_brute_force(seed):
    rng = random.Random(seed)
    gallery = rng.randint(0, 30)
    n_retrieved = min(gallery, rng.choice([1, 5, 10, 20]))
    hits, n_relevant = ranked_relevance(rng, gallery, n_retrieved)
    for k in (1, 2, 4, 10, 20, 50):
        assert hit_rate_at_k(hits, k) == ref_hit(hits, k)
        assert recall_at_k(hits, n_relevant, k) == pytest.approx(ref_recall(hits, n_relevant, k))
        assert average_precision_at_k(hits, n_relevant, k) == pytest.approx(
            ref_ap(hits, n_relevant, k)
        )


def test_no_hit():
    hits = [False] * 10
    assert hit_rate_at_k(hits, 10) == 0.0
    assert recall_at_k(hits, 3, 10) == 0.0
    assert average_precision_at_k(hits, 3, 10) == 0.0


def test_hit_at_rank_one():
    hits = [True] + [False] * 9
    assert hit_rate_at_k(hits, 1) == 1.0
    assert recall_at_k(hits, 1, 1) == 1.0
    assert average_precision_at_k(hits, 1, 1) == 1.0
    assert average_precision_at_k(hits, 1, 10) == 1.0
    assert recall_at_k(hits, 4, 10) == 0.25


def test_hit_exactly_at_k():
    hits = [False, False, False, True, False]
    assert hit_rate_at_k(hits, 3) == 0.0
    assert hit_rate_at_k(hits, 4) == 1.0
    assert recall_at_k(hits, 2, 3) == 0.0
    assert recall_at_k(hits, 2, 4) == 0.5
    assert average_precision_at_k(hits, 2, 4) == pytest.approx((1 / 4) / 2)


def test_n_relevant_larger_than_k():
    hits = [True, True, False, True]
    # 10 relevant in the gallery: AP normalises by min(k, 10) = k, recall by 10.
    assert average_precision_at_k(hits, 10, 2) == 1.0
    assert average_precision_at_k(hits, 10, 4) == pytest.approx((1 + 1 + 3 / 4) / 4)
    assert recall_at_k(hits, 10, 4) == pytest.approx(0.3)


def test_empty_hits_and_gallery_smaller_than_k():
    assert hit_rate_at_k([], 5) == 0.0
    assert recall_at_k([], 2, 5) == 0.0
    assert average_precision_at_k([], 2, 5) == 0.0
    hits = [False, True]  # a gallery of two, everything retrieved
    assert hit_rate_at_k(hits, 20) == 1.0
    assert recall_at_k(hits, 1, 20) == 1.0
    assert average_precision_at_k(hits, 1, 20) == 0.5


def test_zero_relevant_and_bad_input():
    assert recall_at_k([False], 0, 1) == 0.0
    assert average_precision_at_k([False], 0, 1) == 0.0
    with pytest.raises(ValueError):
        hit_rate_at_k([True], 0)
    with pytest.raises(ValueError):
        recall_at_k([True, True], 1, 2)  # more relevant retrieved than exist
    with pytest.raises(ValueError):
        MetricAccumulator(ks=[])


# --- aggregation ----------------------------------------------------------------------------


def test_aggregation_by_hand():
    acc = MetricAccumulator(ks=(1, 2, 3))
    acc.add("A", [False, True, False], 2)
    acc.add("A", [True, False, True], 3)
    acc.add("B", [False, False, False], 1)
    acc.add("B", [False, False, False], 0)  # skipped
    acc.add("C", [False, False, False], 0)  # skipped: C has nothing to average
    s = acc.summary()
    assert s["ks"] == [1, 2, 3]
    ov = s["overall"]
    assert ov["n_queries"] == 3 and ov["n_without_relevant"] == 2
    assert ov["hit_rate"] == pytest.approx({"1": 1 / 3, "2": 2 / 3, "3": 2 / 3})
    assert ov["recall"] == pytest.approx({"1": (1 / 3) / 3, "2": (0.5 + 1 / 3) / 3,
                                          "3": (0.5 + 2 / 3) / 3})
    assert ov["map"] == pytest.approx({"1": 1 / 3, "2": (0.25 + 0.5) / 3,
                                       "3": (0.25 + 5 / 9) / 3})
    a = s["per_category"]["A"]
    assert a["n_queries"] == 2
    assert a["hit_rate"] == pytest.approx({"1": 0.5, "2": 1.0, "3": 1.0})
    assert a["map"]["3"] == pytest.approx((0.25 + 5 / 9) / 2)
    b = s["per_category"]["B"]
    assert b["n_queries"] == 1 and b["n_without_relevant"] == 1
    assert b["hit_rate"] == {"1": 0.0, "2": 0.0, "3": 0.0}
    c = s["per_category"]["C"]
    assert c["n_queries"] == 0 and c["hit_rate"] == {"1": None, "2": None, "3": None}
    # macro: mean of the A and B means; C has no queries and is left out
    assert s["macro"]["n_categories"] == 2
    assert s["macro"]["hit_rate"] == pytest.approx({"1": 0.25, "2": 0.5, "3": 0.5})
    assert list(s["per_category"]) == ["A", "B", "C"]


def test_ks_filtered_to_retrieved():
    queries = [("x", [True, False, False], 1)]
    assert summarize(queries)["ks"] == [1]  # default ks (1, 4, 10, 20), three retrieved
    assert summarize(queries, ks=(1, 2, 3, 4))["ks"] == [1, 2, 3]
    assert summarize(queries, k_max=20)["ks"] == [1, 4, 10, 20]


@pytest.mark.parametrize("seed", range(5))
def test_accumulator_matches_brute_force_means(seed):
    rng = random.Random(100 + seed)
    ks = (1, 4, 10, 20)
    acc = MetricAccumulator(ks)
    by_cat: dict[str, list[tuple[list[bool], int]]] = {}
    for _ in range(60):
        cat = rng.choice(["shirt", "dress", "shoe"])
        hits, n_rel = ranked_relevance(rng, rng.randint(5, 40), 20)
        acc.add(cat, hits, n_rel)
        by_cat.setdefault(cat, []).append((hits, n_rel))
    s = acc.summary()
    everything = [q for qs in by_cat.values() for q in qs if q[1] > 0]
    for k in ks:
        n = len(everything)
        assert s["overall"]["hit_rate"][str(k)] == pytest.approx(
            sum(ref_hit(h, k) for h, _ in everything) / n)
        assert s["overall"]["recall"][str(k)] == pytest.approx(
            sum(ref_recall(h, r, k) for h, r in everything) / n)
        assert s["overall"]["map"][str(k)] == pytest.approx(
            sum(ref_ap(h, r, k) for h, r in everything) / n)
        for cat, qs in by_cat.items():
            valid = [q for q in qs if q[1] > 0]
            assert s["per_category"][cat]["map"][str(k)] == pytest.approx(
                sum(ref_ap(h, r, k) for h, r in valid) / len(valid))


# --- reports ----------------------------------------------------------------------------------


def _summary() -> dict:
    return summarize(
        [("shirt", [True, False, False, False], 2), ("dress", [False, False, True, False], 1),
         ("<script>alert(1)</script>", [False] * 4, 1)],
        ks=(1, 4),
    )


def test_json_round_trip(tmp_path):
    s = _summary()
    out = tmp_path / "sub" / "metrics.json"
    write_json(s, out)
    assert json.loads(out.read_text(encoding="utf-8")) == s


def test_plot_is_png(tmp_path):
    out = tmp_path / "hit_rate.png"
    plot_hit_rate(_summary(), out, title="Test plot")
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.width > 300 and img.height > 200


def test_plot_with_no_queries(tmp_path):
    out = tmp_path / "empty.png"
    plot_hit_rate(summarize([("x", [False], 0)], ks=(1,)), out)
    with Image.open(out) as img:
        assert img.format == "PNG"


def _image(path: Path, color: str) -> Path:
    Image.new("RGB", (300, 200), color).save(path)
    return path


def test_html_report(tmp_path):
    red, blue = _image(tmp_path / "red.png", "red"), _image(tmp_path / "blue.jpg", "blue")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    page = tmp_path / "out" / "report.html"
    report = HtmlReport(page, title="Eval <b>run</b>", thumb_size=48, max_queries=2)
    results = [
        {"id": "1", "path": blue, "score": 0.91, "hit": True, "label": "<script>alert(1)</script>"},
        {"id": "2", "path": broken, "score": 0.5, "hit": False, "label": "Tshirts"},
        {"id": "3", "path": None, "score": 0.4, "hit": False, "label": "Dress"},
        {"id": "4", "path": tmp_path / "missing.jpg", "score": 0.3, "hit": False, "label": "x"},
    ]
    report.add(red, "Shirts & Tops", results)
    report.add(blue, "Dress", results[:1])
    report.add(red, "over the cap", results)
    report.close(_summary())

    text = page.read_text(encoding="utf-8")
    assert "<script>" not in text
    assert "&lt;script&gt;" in text
    assert "Eval &lt;b&gt;run&lt;/b&gt;" in text
    assert "Shirts &amp; Tops" in text
    assert "Showing 2 of 3 queries" in text and "1 more queries not shown" in text
    assert "over the cap" not in text
    assert text.count('class="q"') == 2
    assert "image unavailable" in text and "no image" in text
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert srcs and all(not Path(s).is_absolute() for s in srcs)
    for src in srcs:
        thumb = page.parent / src
        assert thumb.is_file()
        with Image.open(thumb) as img:
            assert img.format == "JPEG" and max(img.size) <= 48
    assert len(set(srcs)) == 2  # red and blue, each written once
    assert sorted(p.name for p in (page.parent / "report_thumbs").iterdir()) == sorted(
        Path(s).name for s in set(srcs))
    with pytest.raises(RuntimeError):
        report.add(red, "late", [])
