"""`fashionlens evaluate inshop` end to end on a fixture in the exact DeepFashion layout."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashionlens.evaluation.protocols import read_label_mapping
from fashionlens.errors import UserError

FASHIONLENS = Path(sys.executable).parent / "fashionlens"

# Three items, each a distinct colour and pattern; one query and two gallery photos each.
ITEMS = {
    "id_00000001": ("WOMEN/Dresses", (220, 30, 30), "stripes"),
    "id_00000002": ("WOMEN/Dresses", (30, 160, 40), "dots"),
    "id_00000003": ("MEN/Denim", (30, 40, 200), "checks"),
}


def _photo(colour, pattern, seed):
    rng = np.random.default_rng(seed)
    arr = np.full((96, 64, 3), 245, np.uint8)
    body = np.array(colour, np.uint8)
    arr[10:90, 8:56] = body
    if pattern == "stripes":
        arr[10:90:8, 8:56] = 255
    elif pattern == "dots":
        arr[20:90:12, 14:56:12] = 255
    else:
        arr[10:90, 8:56:10] = 0
        arr[10:90:10, 8:56] = 0
    noise = rng.integers(-8, 8, arr.shape)
    return Image.fromarray(np.clip(arr.astype(int) + noise, 0, 255).astype(np.uint8))


@pytest.fixture
def inshop(tmp_path):
    rows = []
    for n, (item_id, (category, colour, pattern)) in enumerate(ITEMS.items()):
        for view, split in (("01_1_front", "query"), ("01_2_side", "gallery"), ("02_1_front", "gallery")):
            rel = f"img/{category}/{item_id}/{view}.jpg"
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            _photo(colour, pattern, seed=hash((item_id, view)) % 1000).save(tmp_path / rel)
            rows.append(f"{rel} {item_id} {split}")
    (tmp_path / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n")
    return tmp_path


@pytest.mark.slow
def test_evaluate_inshop_end_to_end(inshop, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run([str(FASHIONLENS), "evaluate", "inshop", str(inshop), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["overall"]["n_queries"] == 3
    assert set(summary["per_category"]) == {"WOMEN/Dresses", "MEN/Denim"}
    assert summary["index"]["items"] == 6  # the gallery split only
    # The whole 6-image gallery is within k=20: every query finds both of its item's photos.
    assert summary["overall"]["hit_rate"]["20"] == 1.0
    assert summary["overall"]["recall"]["20"] == 1.0
    # Distinct colours and patterns: the same item's photos rank first.
    assert summary["overall"]["hit_rate"]["1"] == 1.0
    assert (out / "hit_rate.png").stat().st_size > 1000
    assert "MEN/Denim" in (out / "report.html").read_text()


def test_label_mapping_reader(tmp_path):
    path = tmp_path / "map.csv"
    path.write_text("label,catalog_article_types\nt-shirt,Tshirts\nshoes,Casual Shoes; Heels\n")
    assert read_label_mapping(path) == {"t-shirt": frozenset({"Tshirts"}),
                                        "shoes": frozenset({"Casual Shoes", "Heels"})}
    path.write_text("label,catalog_article_types\nt-shirt,Tshirts,extra\n")
    with pytest.raises(UserError, match=":2:"):
        read_label_mapping(path)
    path.write_text("label,catalog_article_types\n")
    with pytest.raises(UserError, match="empty"):
        read_label_mapping(path)


def test_interleave_by_category_keeps_every_query_once():
    from fashionlens.data.records import Item
    from fashionlens.evaluation.protocols import Relevance, interleave_by_category

    items = [Item(f"{c}{i}", Path(f"{c}{i}.jpg"), {"label": c}) for c, n in (("a", 3), ("b", 1), ("c", 2))
             for i in range(n)]
    order = interleave_by_category(items, lambda it: Relevance(it.metadata["label"], "x", frozenset()))
    assert [it.id for it in order] == ["a0", "b0", "c0", "a1", "c1", "a2"]
    assert interleave_by_category([], lambda it: None) == []
