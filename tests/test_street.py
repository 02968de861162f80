"""Street-photo reader (tiny fixture and the shared set) and pointing metrics vs brute force."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashionlens.data.street import (
    StreetPhoto,
    read_labels,
    read_mask,
    read_street,
    street_labels,
    tag_mask,
    tag_schema,
)
from fashionlens.errors import UserError
from fashionlens.evaluation.pointing import (
    PointingTally,
    box_iou,
    cam_peak,
    mask_box,
    pointing_hit,
)

STREET = Path(__file__).parents[1] / "../shared/data/street"
LABELS = ["null", "bag", "dress", "hair", "shoes", "skin"]

# --- tiny fixture ------------------------------------------------------------------------------


def make_street(root: Path, rows: list[str], masks: dict[str, np.ndarray] | None = None) -> Path:
    """A street folder: labels, tags.csv (CRLF, header + ``rows``), photos for every row, masks."""
    (root / "photos").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    (root / "tags.csv").write_bytes(("photo,annotation,tags...\r\n"
                                     + "".join(r + "\r\n" for r in rows)).encode())
    for row in rows:
        name = row.split(",")[0].strip()
        if name:
            Image.new("RGB", (6, 4), (200, 10, 10)).save(root / name)
    for stem, array in (masks or {}).items():
        Image.fromarray(array.astype(np.uint8)).save(root / "masks" / f"{stem}.png")
    return root


def mask_0001() -> np.ndarray:
    mask = np.zeros((4, 6), np.uint8)
    mask[0, :] = 3  # hair
    mask[1:3, 1:4] = 2  # dress
    mask[3, 4:] = 4  # shoes
    return mask


def test_reader_on_tiny_fixture(tmp_path):
    root = make_street(tmp_path / "s", [
        "photos/0001.jpg,pixel,dress,hair,shoes",
        "",
        "photos/0002.jpg, Image ,bag,hair, ",
        "photos/0003.jpg,pixel ",
    ], masks={"0001": mask_0001(), "0003": np.zeros((4, 6), np.uint8)})
    assert read_labels(root) == LABELS
    photos = read_street(root)
    assert photos == [
        StreetPhoto(root / "photos/0001.jpg", "pixel", ("dress", "hair", "shoes"),
                    root / "masks/0001.png"),
        StreetPhoto(root / "photos/0002.jpg", "image", ("bag", "hair"), None),
        StreetPhoto(root / "photos/0003.jpg", "pixel", (), root / "masks/0003.png"),
    ]
    mask = read_mask(photos[0].mask, LABELS)
    assert mask.shape == (4, 6) and np.issubdtype(mask.dtype, np.integer)
    assert np.array_equal(mask, mask_0001())
    assert np.array_equal(tag_mask(mask, LABELS, "dress"), mask_0001() == 2)
    assert not tag_mask(mask, LABELS, "bag").any()
    with pytest.raises(ValueError):
        tag_mask(mask, LABELS, "hat")

    schema = tag_schema(photos)
    assert schema == {t: ["no", "yes"] for t in ["bag", "dress", "hair", "shoes"]}
    assert list(tag_schema(photos, min_photos=2)) == ["hair"]
    assert list(tag_schema(photos, labels=["null", "shoes", "hair", "dress", "bag"])) == [
        "shoes", "hair", "dress", "bag"]
    assert list(tag_schema(photos, tags=["skin", "bag"])) == ["skin", "bag"]
    with pytest.raises(ValueError):
        tag_schema(photos, tags=["null"])
    labels = street_labels(photos, {"dress": ["no", "yes"], "bag": ["no", "yes"]})
    assert [(lab.image.name, lab.attribute, lab.codes) for lab in labels] == [
        ("0001.jpg", "dress", "ny"), ("0001.jpg", "bag", "yn"),
        ("0002.jpg", "dress", "yn"), ("0002.jpg", "bag", "ny"),
        ("0003.jpg", "dress", "yn"), ("0003.jpg", "bag", "yn"),
    ]
    assert [lab.positive_index for lab in labels[:2]] == [1, 0]
    with pytest.raises(ValueError):
        street_labels(photos, {"dress": ["yes", "no"]})


@pytest.mark.parametrize("row, problem, line", [
    ("photos/0002.jpg,image,bag,cape", "unknown tag 'cape'", 3),
    ("photos/0002.jpg,video,bag", "unknown annotation kind", 3),
    ("photos/0002.jpg,pixel,bag", "without mask", 3),
    ("photos/0002.jpg,image,bag,bag", "listed twice", 3),
    ("photos/0001.jpg,image,bag", "listed again", 3),
])
def test_reader_errors_name_file_and_line(tmp_path, row, problem, line):
    root = make_street(tmp_path / "s", ["photos/0001.jpg,pixel,dress", row],
                       masks={"0001": mask_0001()})
    with pytest.raises(UserError) as info:
        read_street(root)
    message = str(info.value)
    assert f"tags.csv:{line}:" in message and problem in message and "\n" not in message


def test_read_mask_rejects_out_of_range_and_rgb(tmp_path):
    bad = np.zeros((3, 3), np.uint8)
    bad[1, 1] = len(LABELS)
    Image.fromarray(bad).save(tmp_path / "bad.png")
    with pytest.raises(UserError, match="bad.png.*1 pixels hold values outside 0..5"):
        read_mask(tmp_path / "bad.png", LABELS)
    bad[1, 1] = len(LABELS) - 1
    Image.fromarray(bad).save(tmp_path / "ok.png")
    assert read_mask(tmp_path / "ok.png", LABELS)[1, 1] == 5
    Image.new("RGB", (3, 3)).save(tmp_path / "rgb.png")
    with pytest.raises(UserError, match="single-channel"):
        read_mask(tmp_path / "rgb.png", LABELS)


# --- the shared set ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def street() -> Path:
    if not (STREET / "tags.csv").is_file():
        pytest.skip(f"shared street set not found at {STREET}")
    return STREET


def test_shared_counts_and_masks_match_tags(street):
    labels = read_labels(street)
    assert len(labels) == 59 and labels[0] == "null"
    photos = read_street(street)
    pixel = [p for p in photos if p.kind == "pixel"]
    assert len(photos) == 1882  # 1094 image rows + 788 pixel rows
    assert len(pixel) == 788 and all(p.mask is not None for p in pixel)
    assert all(p.mask is None for p in photos if p.kind == "image")
    assert len(list((street / "masks").glob("*.png"))) == 788
    disagree = []
    for photo in pixel:
        mask = read_mask(photo.mask, labels)
        with Image.open(photo.image) as image:
            assert mask.shape == (image.height, image.width), photo.image  # same size as photo
            assert max(image.size) == 400
        present = {labels[v] for v in np.unique(mask)} - {"null"}
        if present != set(photo.tags):
            disagree.append(photo.image.name)
    assert disagree == []  # every mask holds exactly the photo's tags (plus background)
    schema = tag_schema(photos, labels=labels)
    assert "null" not in schema and len(schema) == 55  # intimate, panties, swimwear: never
    counts = {t: sum(t in p.tags for p in photos) for t in ("shoes", "dress", "jeans", "skirt")}
    assert counts == {"shoes": 891, "dress": 402, "jeans": 211, "skirt": 448}


# --- pointing metrics vs brute force -----------------------------------------------------------


def box_pixels(box, shape) -> np.ndarray:
    x, y, w, h = box
    out = np.zeros(shape, bool)
    out[max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] = True
    return out


def test_mask_box_and_box_iou_vs_counting_pixels():
    rng = random.Random(0)
    assert mask_box(np.zeros((5, 5), bool)) is None
    assert mask_box(box_pixels((1, 2, 3, 1), (5, 5))) == (1, 2, 3, 1)
    assert box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert box_iou((0, 0, 2, 2), (2, 0, 2, 2)) == 0.0  # adjacent: no shared pixel
    assert box_iou((0, 0, 2, 2), (1, 1, 2, 2)) == pytest.approx(1 / 7)
    for _ in range(300):
        shape = (rng.randint(1, 12), rng.randint(1, 12))
        mask = np.array([[rng.random() < 0.15 for _ in range(shape[1])] for _ in range(shape[0])])
        box = mask_box(mask)
        if mask.any():
            rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
            assert box == (cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)
            assert box_pixels(box, shape)[mask].all()
        a = (rng.randint(0, 8), rng.randint(0, 8), rng.randint(0, 6), rng.randint(0, 6))
        b = (rng.randint(0, 8), rng.randint(0, 8), rng.randint(0, 6), rng.randint(0, 6))
        pa, pb = box_pixels(a, (16, 16)), box_pixels(b, (16, 16))
        union = (pa | pb).sum()
        expected = (pa & pb).sum() / union if union else 0.0
        assert box_iou(a, b) == pytest.approx(expected) and box_iou(b, a) == box_iou(a, b)


def test_cam_peak_ties_and_pointing_hit_tolerance():
    cam = np.zeros((5, 7))
    cam[3, 1] = cam[1, 5] = cam[1, 6] = 2.0
    assert cam_peak(cam) == (5, 1)  # first in row-major order
    assert cam_peak(np.ones((3, 3))) == (0, 0)
    with pytest.raises(ValueError):
        cam_peak(np.array([[0.0, np.nan]]))

    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    cam = np.zeros((20, 20))
    cam[7, 12] = 1.0  # 3 px right of the mask's column 9
    assert not pointing_hit(cam, mask) and not pointing_hit(cam, mask, tolerance=2)
    assert pointing_hit(cam, mask, tolerance=3) and pointing_hit(cam, mask, tolerance=5)
    cam2 = np.zeros((20, 20))
    cam2[7, 7] = 1.0
    assert pointing_hit(cam2, mask)
    cam3 = np.zeros((20, 20))
    cam3[12, 12] = 1.0  # 3 px off diagonally from (9, 9): distance sqrt(18) ~ 4.24
    assert not pointing_hit(cam3, mask, tolerance=4) and pointing_hit(cam3, mask, tolerance=5)
    assert not pointing_hit(cam2, np.zeros((20, 20), bool), tolerance=15)
    with pytest.raises(ValueError):
        pointing_hit(cam, mask[:, :10])


def test_pointing_hit_matches_dilation():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    for _ in range(60):
        mask = rng.random((15, 17)) < 0.03
        cam = rng.random((15, 17))
        x, y = cam_peak(cam)
        distance = ndimage.distance_transform_edt(~mask) if mask.any() else np.full(mask.shape, 99.)
        for tolerance in (0, 1, 2, 4, 7):
            assert pointing_hit(cam, mask, tolerance) == bool(distance[y, x] <= tolerance)


def test_pointing_tally():
    tally = PointingTally()
    for hit, iou in [(True, 0.5), (False, 0.25), (True, 0.0)]:
        tally.add("dress", hit, iou)
    tally.add("shoes", False, 1.0)
    table = tally.per_tag()
    assert table == {"dress": {"pointing": 2 / 3, "iou": 0.25, "photos": 3},
                     "shoes": {"pointing": 0.0, "iou": 1.0, "photos": 1}}
    assert tally.mean() == {"pointing": 1 / 3, "iou": 0.625, "tags": 2}
    assert tally.mean(["shoes", "hat"]) == {"pointing": 0.0, "iou": 1.0, "tags": 1}
    empty = tally.mean(["hat"])
    assert empty["tags"] == 0 and math.isnan(empty["pointing"])
    with pytest.raises(ValueError):
        tally.add("dress", True, 1.5)
