"""Readers for FashionAI attribute labels and DeepFashion partitions, on real-format fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fashionlens.data.deepfashion import read_consumer_to_shop, read_inshop
from fashionlens.data.fashionai import (
    FASHIONAI_ATTRIBUTES,
    AttributeLabel,
    attribute_slices,
    attribute_table,
    load_schema,
    read_fashionai,
    resolve_maybe,
)
from fashionlens.errors import UserError

SHARED_ATTRIBUTES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "attributes"

FASHIONAI_CSV = (
    "Images/sleeve_length_labels/a.jpg,sleeve_length_labels,nnnnnnnym\r\n"
    "Images/skirt_length_labels/b.jpg,skirt_length_labels,nnynnn\r\n"
    "Images/sleeve_length_labels/a.jpg,collar_design_labels,ynnnn\r\n"
)
INSHOP_TXT = (
    "4\n"
    "image_name item_id evaluation_status\n"
    "img/WOMEN/Dresses/id_00000002/02_1_front.jpg                     id_00000002 train\n"
    "img/WOMEN/Dresses/id_00000002/02_2_side.jpg                      id_00000002 train\n"
    "img/MEN/Denim/id_00000080/01_1_front.jpg                         id_00000080 query\n"
    "img/MEN/Denim/id_00000080/01_2_side.jpg                          id_00000080 gallery\n"
)
C2S_TXT = (
    "4\n"
    "image_pair_name_1 image_pair_name_2 item_id evaluation_status\n"
    "img/CLOTHING/Blouse/id_00000001/comsumer_01.jpg img/CLOTHING/Blouse/id_00000001/shop_01.jpg"
    " id_00000001 train\n"
    "img/CLOTHING/Blouse/id_00000001/comsumer_01.jpg img/CLOTHING/Blouse/id_00000001/shop_02.jpg"
    " id_00000001 train\n"
    "img/DRESSES/Dress/id_00000007/comsumer_01.jpg img/DRESSES/Dress/id_00000007/shop_01.jpg"
    " id_00000007 test\n"
    "img/DRESSES/Dress/id_00000007/comsumer_02.jpg img/DRESSES/Dress/id_00000007/shop_01.jpg"
    " id_00000007 test\n"
)


def _fashionai_root(tmp_path: Path, text: str = FASHIONAI_CSV) -> Path:
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "label.csv").write_bytes(text.encode())
    return tmp_path


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "list_eval_partition.txt").write_text(text)
    return tmp_path


# --- FashionAI ---------------------------------------------------------------------------


def test_builtin_schema_has_the_eight_attributes_with_invisible():
    assert len(FASHIONAI_ATTRIBUTES) == 8
    assert all(values[0] == "Invisible" for values in FASHIONAI_ATTRIBUTES.values())
    assert len(FASHIONAI_ATTRIBUTES["sleeve_length_labels"]) == 9
    assert len(FASHIONAI_ATTRIBUTES["neckline_design_labels"]) == 10
    assert FASHIONAI_ATTRIBUTES["coat_length_labels"][-1] == "Ankle&Floor Length"
    assert load_schema() == FASHIONAI_ATTRIBUTES and load_schema() is not FASHIONAI_ATTRIBUTES


def test_load_schema_json_keeps_order(tmp_path):
    path = tmp_path / "attributes.json"
    path.write_text(json.dumps({"b_labels": ["no", "yes"], "a_labels": ["x", "y", "z"]}))
    assert list(load_schema(path)) == ["b_labels", "a_labels"]
    path.write_text(json.dumps({"b_labels": "no"}))
    with pytest.raises(UserError, match="b_labels"):
        load_schema(path)
    with pytest.raises(UserError, match="not found"):
        load_schema(tmp_path / "missing.json")


def test_read_fashionai_rows(tmp_path):
    root = _fashionai_root(tmp_path)
    rows = read_fashionai(root)
    assert [r.attribute for r in rows] == ["sleeve_length_labels", "skirt_length_labels",
                                           "collar_design_labels"]
    first = rows[0]
    assert first.image == root / "Images/sleeve_length_labels/a.jpg"
    assert first.codes == "nnnnnnnym"
    assert first.positive_index == 7
    assert first.maybe_indices == [8]
    assert rows[1].positive_index == 2 and rows[1].maybe_indices == []


def test_targets_fixed_policies():
    label = AttributeLabel(Path("x.jpg"), "sleeve_length_labels", "nnnnnnnym")
    expected = np.array([0, 0, 0, 0, 0, 0, 0, 1, 0], dtype=np.float32)
    for policy, value in (("positive", 1.0), ("negative", 0.0), ("half", 0.5)):
        got = label.targets(maybe_policy=policy)
        assert got.dtype == np.float32
        expected[8] = value
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="maybe_policy"):
        label.targets(maybe_policy="sometimes")


def test_targets_random_policy_draws_both():
    label = AttributeLabel(Path("x.jpg"), "sleeve_length_labels", "nnnnnnnym")
    rng = np.random.default_rng(0)
    draws = np.array([label.targets(rng)[8] for _ in range(2000)])
    assert set(np.unique(draws)) == {0.0, 1.0}
    assert abs(draws.mean() - 0.5) < 0.05
    assert all(label.targets(rng)[7] == 1.0 for _ in range(20))


def test_attribute_table_groups_and_masks(tmp_path):
    schema = load_schema()
    images, targets, mask = attribute_table(read_fashionai(_fashionai_root(tmp_path)), schema)
    assert images == [tmp_path / "Images/sleeve_length_labels/a.jpg",
                      tmp_path / "Images/skirt_length_labels/b.jpg"]
    names = list(schema)
    assert targets.shape == (2, sum(len(v) for v in schema.values())) == (2, 54)
    slices = attribute_slices(schema)
    assert slices["coat_length_labels"] == slice(0, 8)
    assert slices["collar_design_labels"] == slice(8, 13)
    assert slices["sleeve_length_labels"] == slice(45, 54)
    sleeve = targets[0, slices["sleeve_length_labels"]]
    np.testing.assert_array_equal(sleeve[:8], [0, 0, 0, 0, 0, 0, 0, 1])
    assert np.isnan(sleeve[8])
    np.testing.assert_array_equal(targets[0, slices["collar_design_labels"]], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(targets[1, slices["skirt_length_labels"]], [0, 0, 1, 0, 0, 0])
    expected_mask = np.zeros((2, 8), dtype=bool)
    expected_mask[0, names.index("sleeve_length_labels")] = True
    expected_mask[0, names.index("collar_design_labels")] = True
    expected_mask[1, names.index("skirt_length_labels")] = True
    np.testing.assert_array_equal(mask, expected_mask)
    assert np.isnan(targets).sum() == 1
    resolved = resolve_maybe(targets, maybe_policy="half")
    assert resolved[0, 53] == 0.5 and not np.isnan(resolved).any() and np.isnan(targets[0, 53])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("Images/c.jpg,skirt_length_labels", "expected 3 columns"),
        ("Images/c.jpg,skirt_length_labels,nnynnn,extra", "expected 3 columns"),
        ("Images/c.jpg,hat_labels,yn", "unknown attribute"),
        ("Images/c.jpg,skirt_length_labels,nnyn", "expected 6"),
        ("Images/c.jpg,skirt_length_labels,nnynnx", "only hold"),
        ("Images/c.jpg,skirt_length_labels,nnnnnm", "exactly one 'y'"),
        ("Images/c.jpg,skirt_length_labels,ynynnn", "exactly one 'y'"),
        ("Images/skirt_length_labels/b.jpg,skirt_length_labels,ynnnnn", "first at line 2"),
    ],
)
def test_read_fashionai_malformed_row(tmp_path, line, message):
    root = _fashionai_root(tmp_path, FASHIONAI_CSV + "\r\n" + line + "\r\n")
    with pytest.raises(UserError, match=message) as caught:
        read_fashionai(root)
    assert "label.csv:5:" in str(caught.value)


def test_read_fashionai_missing_file(tmp_path):
    with pytest.raises(UserError, match="label.csv"):
        read_fashionai(tmp_path)


def test_shared_attribute_set_parses():
    if not (SHARED_ATTRIBUTES / "Annotations" / "label.csv").is_file():
        pytest.skip(f"shared attribute set not at {SHARED_ATTRIBUTES}")
    schema = load_schema(SHARED_ATTRIBUTES / "attributes.json")
    rows = read_fashionai(SHARED_ATTRIBUTES)  # picks up attributes.json by itself
    assert len(rows) > 1000
    assert all(r.codes.count("y") == 1 for r in rows)
    assert rows[0].image == SHARED_ATTRIBUTES / "Images" / "000002.jpg"
    assert rows[0].attribute == "necktie_labels" and rows[0].codes == "yn"
    images, targets, mask = attribute_table(rows, schema)
    assert len(images) == len(list((SHARED_ATTRIBUTES / "Images").iterdir())) == 1502
    assert targets.shape == (1502, sum(len(v) for v in schema.values()))
    assert mask.shape == (1502, len(schema)) and mask.sum() == len(rows)
    assert mask.sum(axis=1).max() > 1  # images labeled for several attributes


# --- DeepFashion In-shop -----------------------------------------------------------------


def test_read_inshop(tmp_path):
    splits = read_inshop(_write(tmp_path, INSHOP_TXT))
    assert [len(splits[s]) for s in ("train", "query", "gallery")] == [2, 1, 1]
    item = splits["train"][0]
    assert item.id == "img/WOMEN/Dresses/id_00000002/02_1_front.jpg"
    assert item.path == tmp_path / "img/WOMEN/Dresses/id_00000002/02_1_front.jpg"
    assert item.metadata == {"item_id": "id_00000002", "split": "train",
                             "category": "WOMEN/Dresses", "gender": "WOMEN"}
    assert splits["query"][0].metadata == {"item_id": "id_00000080", "split": "query",
                                           "category": "MEN/Denim", "gender": "MEN"}
    assert splits["gallery"][0].id.endswith("01_2_side.jpg")


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        (INSHOP_TXT.replace("4\n", "5\n", 1), ":1:", "declares 5 rows but holds 4"),
        (INSHOP_TXT.replace("4\n", "four\n", 1), ":1:", "number of rows"),
        (INSHOP_TXT.replace("item_id ", "item ", 1), ":2:", "expected header"),
        (INSHOP_TXT.replace("id_00000080 query", "id_00000080 test"), ":5:", "unknown"),
        (INSHOP_TXT.replace("id_00000080 query", "query"), ":5:", "expected 3 columns"),
        (INSHOP_TXT.replace("02_2_side", "02_1_front"), ":4:", "already listed at line 3"),
    ],
)
def test_read_inshop_malformed(tmp_path, text, where, message):
    with pytest.raises(UserError, match=message) as caught:
        read_inshop(_write(tmp_path, text))
    assert f"list_eval_partition.txt{where}" in str(caught.value)


def test_read_inshop_missing_and_eval_folder(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_inshop(tmp_path)
    (tmp_path / "Eval").mkdir()
    (tmp_path / "Eval" / "list_eval_partition.txt").write_text(INSHOP_TXT)
    assert len(read_inshop(tmp_path)["train"]) == 2


# --- DeepFashion Consumer-to-shop ---------------------------------------------------------


def test_read_consumer_to_shop(tmp_path):
    data = read_consumer_to_shop(_write(tmp_path, C2S_TXT))
    assert len(data.pairs) == 4
    consumer, shop, split = data.pairs[0]
    assert consumer.id == "img/CLOTHING/Blouse/id_00000001/comsumer_01.jpg"
    assert consumer.path == tmp_path / consumer.id
    assert consumer.metadata == {"item_id": "id_00000001", "split": "train",
                                 "category": "CLOTHING/Blouse"}
    assert shop.id == "img/CLOTHING/Blouse/id_00000001/shop_01.jpg" and split == "train"
    assert data.pairs[1][0] is consumer
    assert [i.id for i in data.queries("train")] == [consumer.id]
    assert [i.id.rsplit("/", 1)[1] for i in data.gallery("train")] == ["shop_01.jpg",
                                                                       "shop_02.jpg"]
    assert [i.id.rsplit("/", 1)[1] for i in data.queries("test")] == ["comsumer_01.jpg",
                                                                      "comsumer_02.jpg"]
    test_gallery = data.gallery("test")
    assert len(test_gallery) == 1
    assert test_gallery[0].metadata == {"item_id": "id_00000007", "split": "test",
                                        "category": "DRESSES/Dress"}
    assert data.queries("val") == [] and len(data.gallery("val", "test")) == 1
    with pytest.raises(UserError, match="unknown consumer-to-shop split"):
        data.gallery("query")


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        (C2S_TXT.replace("4\n", "3\n", 1), ":1:", "declares 3 rows but holds 4"),
        (C2S_TXT.replace("evaluation_status", "status"), ":2:", "expected header"),
        (C2S_TXT.replace("id_00000007 test\n", "id_00000007 gallery\n", 1), ":5:", "unknown"),
        (C2S_TXT.replace(" id_00000001 train\n", " train\n", 1), ":3:", "expected 4 columns"),
        (C2S_TXT.replace("shop_02.jpg id_00000001", "shop_02.jpg id_00000009"), ":4:",
         "listed with item id_00000001"),
    ],
)
def test_read_consumer_to_shop_malformed(tmp_path, text, where, message):
    with pytest.raises(UserError, match=message) as caught:
        read_consumer_to_shop(_write(tmp_path, text))
    assert f"list_eval_partition.txt{where}" in str(caught.value)
