"""Catalog readers: CSV (id or path column, any delimiter), image folders, and open_catalog."""

from __future__ import annotations

import inspect
import time
from itertools import islice
from pathlib import Path

import pytest

from conftest import make_catalog, make_image
from fashionlens.data.catalog import Missing, iter_catalog_csv, iter_image_folder, open_catalog
from fashionlens.data.records import Item
from fashionlens.errors import UserError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- CSV ---------------------------------------------------------------------------------------


def test_csv_with_id_column_finds_images_by_id(tmp_path):
    csv_path = make_catalog(tmp_path, 5)
    items = list(iter_catalog_csv(csv_path))
    assert [it.id for it in items] == [f"item-{i:04d}" for i in range(5)]
    assert all(isinstance(it, Item) for it in items)
    assert items[3].path == tmp_path / "images" / "item-0003.jpg"
    assert items[3].metadata == {"articleType": "Dresses", "baseColour": "colour03"}


def test_csv_id_lookup_also_beside_the_csv_and_other_extensions(tmp_path):
    make_image(tmp_path / "a1.png", 1)
    make_image(tmp_path / "images" / "b2.webp", 2)
    _write(tmp_path / "cat.csv", "sku,name\na1,first\nb2,second\n")
    items = list(iter_catalog_csv(tmp_path / "cat.csv"))
    assert [(it.id, it.path.name) for it in items] == [("a1", "a1.png"), ("b2", "b2.webp")]
    assert items[0].metadata == {"name": "first"}


def test_csv_with_path_column(tmp_path):
    make_image(tmp_path / "pics" / "shirt.jpg", 1)
    elsewhere = make_image(tmp_path / "other" / "dress.png", 2)
    _write(tmp_path / "cat.csv", f"path,colour\npics/shirt.jpg,red\n{elsewhere},blue\n")
    items = list(iter_catalog_csv(tmp_path / "cat.csv"))
    # no id column: the id is the path without its suffix
    assert [it.id for it in items] == ["pics/shirt", elsewhere.with_suffix("").as_posix()]
    assert items[0].path == tmp_path / "pics" / "shirt.jpg"
    assert items[1].path == elsewhere
    assert [it.metadata for it in items] == [{"colour": "red"}, {"colour": "blue"}]


def test_csv_with_id_and_path_columns_uses_both(tmp_path):
    make_image(tmp_path / "x" / "photo.jpg", 1)
    _write(tmp_path / "cat.csv", "item_id,image,brand\nSKU-1,x/photo.jpg,Acme\n")
    (item,) = iter_catalog_csv(tmp_path / "cat.csv")
    assert (item.id, item.path, item.metadata) == ("SKU-1", tmp_path / "x" / "photo.jpg", {"brand": "Acme"})


@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_other_delimiters_are_sniffed(tmp_path, sep):
    make_image(tmp_path / "images" / "1.jpg", 1)
    make_image(tmp_path / "images" / "2.jpg", 2)
    # commas inside values must not be taken for the delimiter (European decimals, free text)
    rows = [["id", "name", "price"], ["1", "Shirt, blue", "9,99"], ["2", "Dress", "19,50"]]
    _write(tmp_path / "cat.csv", "\n".join(sep.join(r) for r in rows) + "\n")
    items = list(iter_catalog_csv(tmp_path / "cat.csv"))
    assert [it.id for it in items] == ["1", "2"]
    assert items[0].metadata == {"name": "Shirt, blue", "price": "9,99"}


def test_metadata_and_ids_stay_strings(tmp_path):
    make_image(tmp_path / "images" / "007.jpg", 1)
    _write(tmp_path / "cat.csv", "\ufeffid,year,code,empty\n007,2011,0012,\n")  # BOM as Excel writes
    (item,) = iter_catalog_csv(tmp_path / "cat.csv")
    assert item.id == "007"
    assert item.metadata == {"year": "2011", "code": "0012", "empty": ""}
    assert all(isinstance(v, str) for v in item.metadata.values())


def test_rows_without_image_come_out_as_missing(tmp_path):
    make_image(tmp_path / "images" / "ok.jpg", 1)
    _write(tmp_path / "cat.csv", "id,type\nok,Shirts\ngone,Jeans\n")
    out = list(iter_catalog_csv(tmp_path / "cat.csv"))
    assert isinstance(out[0], Item) and out[0].id == "ok"
    assert isinstance(out[1], Missing) and out[1].id == "gone"
    assert "cat.csv:3" in out[1].reason and "not found" in out[1].reason


def test_missing_path_column_file_is_missing(tmp_path):
    _write(tmp_path / "cat.csv", "path\nnope/none.jpg\n")
    (miss,) = iter_catalog_csv(tmp_path / "cat.csv")
    assert isinstance(miss, Missing) and miss.id == "nope/none"
    assert "none.jpg" in miss.reason


def test_blank_lines_are_ignored(tmp_path):
    make_catalog(tmp_path, 2)
    _write(tmp_path / "cat.csv", "id,t\nitem-0000,a\n\n,\nitem-0001,b\n")
    assert [it.id for it in iter_catalog_csv(tmp_path / "cat.csv")] == ["item-0000", "item-0001"]


def test_wrong_field_count_names_the_line(tmp_path):
    make_catalog(tmp_path, 3)
    _write(tmp_path / "cat.csv", "id,type\nitem-0000,a\nitem-0001,b\nitem-0002,c,extra\n")
    with pytest.raises(UserError, match=r"cat\.csv:4: 3 fields, the header has 2"):
        list(iter_catalog_csv(tmp_path / "cat.csv"))


def test_no_id_or_path_column(tmp_path):
    _write(tmp_path / "cat.csv", "name,colour\nshirt,red\n")
    with pytest.raises(UserError, match="no id or image column.*found: name, colour"):
        list(iter_catalog_csv(tmp_path / "cat.csv"))


def test_empty_csv(tmp_path):
    _write(tmp_path / "cat.csv", "")
    with pytest.raises(UserError, match="empty CSV"):
        list(iter_catalog_csv(tmp_path / "cat.csv"))


def test_empty_id_names_the_line(tmp_path):
    _write(tmp_path / "cat.csv", "id,type\n,Shirts\n")
    with pytest.raises(UserError, match=r"cat\.csv:2: empty id"):
        list(iter_catalog_csv(tmp_path / "cat.csv"))


def test_not_utf8(tmp_path):
    (tmp_path / "cat.csv").write_bytes("id,name\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        list(iter_catalog_csv(tmp_path / "cat.csv"))


# --- image folders -----------------------------------------------------------------------------


def test_image_folder_with_label_subfolders(tmp_path):
    make_image(tmp_path / "shirts" / "b.jpg", 1)
    make_image(tmp_path / "shirts" / "a.png", 2)
    make_image(tmp_path / "shoes" / "sport" / "x.JPG", 3)
    make_image(tmp_path / "top.jpg", 4)
    _write(tmp_path / "shirts" / "notes.txt", "not an image")
    items = list(iter_image_folder(tmp_path))
    assert [(it.id, it.metadata["label"]) for it in items] == [
        ("top", ""), ("shirts/a", "shirts"), ("shirts/b", "shirts"), ("shoes/sport/x", "shoes/sport"),
    ]
    assert items[1].path == tmp_path / "shirts" / "a.png"


# --- open_catalog ------------------------------------------------------------------------------


def test_open_catalog_folder_with_one_csv(tmp_path):
    csv_path = make_catalog(tmp_path, 3)
    source = open_catalog(tmp_path)
    assert (source.kind, source.path) == ("csv", csv_path)
    assert [it.id for it in source] == ["item-0000", "item-0001", "item-0002"]


def test_open_catalog_csv_file(tmp_path):
    csv_path = make_catalog(tmp_path, 2)
    assert open_catalog(csv_path).kind == "csv"
    with pytest.raises(UserError, match="expected a catalog CSV"):
        open_catalog(tmp_path / "images" / "item-0000.jpg")


def test_open_catalog_several_csvs_is_an_error(tmp_path):
    make_catalog(tmp_path, 2)
    _write(tmp_path / "more.csv", "id\n1\n")
    with pytest.raises(UserError, match="several CSV files.*more.csv.*styles.csv"):
        open_catalog(tmp_path)


def test_open_catalog_image_folder(tmp_path):
    make_image(tmp_path / "dress" / "1.jpg", 1)
    source = open_catalog(tmp_path)
    assert source.kind == "folder"
    assert [(it.id, it.metadata["label"]) for it in source] == [("dress/1", "dress")]


def test_open_catalog_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        open_catalog(tmp_path / "nothing")


# --- the shared real catalog ------------------------------------------------------------------


def test_shared_catalog_streams(shared_data, monkeypatch):
    """The first 50 of ~9,600 rows come without reading (or stat-ing) the whole catalog."""
    stats = []
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: stats.append(self) or real_is_file(self))
    source = open_catalog(shared_data / "catalog")
    assert source.kind == "csv" and source.path.name == "styles.csv"
    stream = iter(source)
    assert inspect.isgenerator(stream)
    started = time.perf_counter()
    first = list(islice(stream, 50))
    n_stats = len(stats)
    assert time.perf_counter() - started < 5
    assert len(first) == 50 and all(isinstance(it, Item) for it in first)
    assert all(it.metadata.get("articleType") for it in first)
    assert all(it.path.is_file() and it.path.suffix == ".jpg" for it in first)
    assert len({it.id for it in first}) == 50
    # a handful of lookups per consumed row, not one per catalog row
    assert n_stats <= 50 * 4
