"""Attribute classifier (thesis B): data split, metrics against brute force, training with
resume, the CLI, explanations (closed-form CAM = the grad-cam library), faithfulness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fashionlens.errors import UserError
from fashionlens.evaluation.attribute_metrics import attribute_metrics, average_precision, mean_over
from fashionlens.explain.explainer import AttributeExplainer
from fashionlens.data.transforms import Letterbox
from fashionlens.explain.wording import find_attribute, phrase
from fashionlens.explain.faithfulness import blank, faithfulness, random_box_like
from fashionlens.training.attribute_data import read_attribute_set, split_part, split_rows
from fashionlens.training.config import AttributeTrainConfig, load_attribute_config
from fashionlens.training.attribute_task import load_attribute_run, read_config_data, train_attributes
from fashionlens.training.run_files import read_rows

from conftest import run_cli_inprocess

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {"colour_labels": ["red", "blue"], "stripe_labels": ["none", "thin", "wide"]}
RGB = {"red": (220, 30, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """48 photos, 64 x 48 px: colour red / blue (every photo labeled); stripes none / thin /
    wide, labeled on two thirds of the photos, with some 'm' codes."""
    root = tmp_path_factory.mktemp("fashionai")
    (root / "Images").mkdir()
    (root / "Annotations").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(48):
        colour = "red" if i % 2 else "blue"
        stripes = i % 3
        arr = np.full((64, 48, 3), RGB[colour], np.uint8) + rng.integers(0, 20, (64, 48, 3)).astype(np.uint8)
        for y in range(0, 64, 16 // max(stripes, 1)):
            if stripes:
                arr[y:y + stripes * 2] = 255
        Image.fromarray(arr).save(root / "Images" / f"{i:03d}.png")
        lines.append(f"Images/{i:03d}.png,colour_labels,{'ny' if colour == 'blue' else 'yn'}")
        if i % 3 != 2:
            codes = ["n", "n", "n"]
            codes[stripes] = "y"
            if i % 5 == 0:
                codes[(stripes + 1) % 3] = "m"
            lines.append(f"Images/{i:03d}.png,stripe_labels,{''.join(codes)}")
    (root / "Annotations" / "label.csv").write_text("\n".join(lines) + "\n")
    (root / "attributes.json").write_text(json.dumps(SCHEMA))
    return root


def tiny(dataset: Path, out: Path, **kw) -> AttributeTrainConfig:
    data = {"data": str(dataset), "model": {"backbone": "lite0", "pretrained": False, "input_size": 64,
                                            "neck": {"type": "gap", "normalize": False}},
            "val_fraction": 0.2, "test_fraction": 0.2, "epochs": 2, "batch_size": 8, "lr": 0.01,
            "out": str(out), "augment": {"crop": 0.0, "rotate": 0.0, "color": 0.0, "erase": 0.0}}
    data.update(kw)
    return AttributeTrainConfig(**data)


def test_read_and_split_stable(dataset):
    data = read_attribute_set(dataset)
    assert data.schema == SCHEMA and len(data.images) == 48
    assert data.mask[:, 0].all() and data.mask[:, 1].sum() == 32
    assert np.isnan(data.targets).sum() == len([i for i in range(48) if i % 3 != 2 and i % 5 == 0])
    parts = split_rows(data, 0, 0.2, 0.2)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(48))
    # an image's part depends on its own path and the seed only: adding images moves none
    assert all(split_part(data.images[i], dataset, 0, 0.2, 0.2) == "test" for i in parts["test"])
    assert read_attribute_set(dataset, attributes=["stripe_labels"]).schema == {"stripe_labels": SCHEMA["stripe_labels"]}
    with pytest.raises(UserError, match="not in the data's schema"):
        read_attribute_set(dataset, attributes=["nope"])
    with pytest.raises(UserError, match="not found"):
        read_attribute_set(dataset / "missing")


def _brute_ap(scores, relevant):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for rank, i in enumerate(order, 1):
        if relevant[i]:
            hits += 1
            total += hits / rank
    return total / sum(relevant)


def test_metrics_against_brute_force():
    rng = np.random.default_rng(1)
    n = 40
    slices = {"a": slice(0, 2), "b": slice(2, 5)}
    logits = torch.from_numpy(rng.normal(size=(n, 5)).astype(np.float32))
    targets = np.zeros((n, 5), np.float32)
    truth_a, truth_b = rng.integers(0, 2, n), rng.integers(0, 3, n)
    targets[np.arange(n), truth_a] = 1
    targets[np.arange(n), 2 + truth_b] = 1
    targets[3, 2 + (truth_b[3] + 1) % 3] = np.nan  # a maybe
    mask = np.ones((n, 2), bool)
    mask[::4, 1] = False
    m = attribute_metrics(logits, torch.from_numpy(targets), torch.from_numpy(mask), slices, "sigmoid", 0.6)
    probs = torch.sigmoid(logits).numpy()
    rows = np.flatnonzero(mask[:, 1])
    acc_b = np.mean([probs[i, 2:5].argmax() == truth_b[i] for i in rows])
    assert m["attributes"]["b"]["accuracy"] == pytest.approx(acc_b)
    picked = [(i, v) for i in rows for v in range(3) if probs[i, 2 + v] >= 0.6 and not np.isnan(targets[i, 2 + v])]
    assert m["attributes"]["b"]["precision@0.6"] == pytest.approx(np.mean([truth_b[i] == v for i, v in picked]))
    aps = []
    for v in range(3):
        keep = [i for i in rows if not np.isnan(targets[i, 2 + v])]
        rel = [truth_b[i] == v for i in keep]
        if any(rel):
            aps.append(_brute_ap([probs[i, 2 + v] for i in keep], rel))
    assert m["attributes"]["b"]["mAP"] == pytest.approx(np.mean(aps))
    assert m["attributes"]["b"]["images"] == len(rows) and m["attributes"]["a"]["images"] == n
    assert mean_over(m, ["a", "b"]) == pytest.approx((m["attributes"]["a"]["accuracy"] + acc_b) / 2)
    assert average_precision(np.array([0.9, 0.1]), np.array([False, False])) is None


def test_train_resume_and_cli(dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    events = []

    def killed_after_epoch_2(event):
        events.append(event)
        if event["event"] == "epoch" and event["epoch"] == 2:
            raise KeyboardInterrupt  # as if killed once epoch 2 is saved

    with pytest.raises(KeyboardInterrupt):
        train_attributes(tiny(dataset, out, epochs=3), progress=killed_after_epoch_2)
    assert [int(r["epoch"]) for r in read_rows(out / "metrics.csv", 99)] == [1, 2]
    model, cfg, extra = load_attribute_run(out / "best")
    assert model.attr_head.schema == SCHEMA and extra["kind"] == "attributes" and cfg.loss == "sigmoid"
    assert {e["event"] for e in events} >= {"start", "step", "epoch"}
    # resume trains epoch 3 only, and equals an uninterrupted 3-epoch run
    events.clear()
    row = train_attributes(tiny(dataset, out, epochs=3), progress=events.append)
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [3]
    assert 0 <= row["val_accuracy"] <= 1 and row["loss"] > 0
    straight = tmp_path / "straight"
    train_attributes(tiny(dataset, straight, epochs=3))
    a, b = read_rows(out / "metrics.csv", 9), read_rows(straight / "metrics.csv", 9)
    assert len(a) == 3 and float(a[2]["loss"]) == pytest.approx(float(b[2]["loss"]), rel=1e-4)
    assert a[2]["val_accuracy"] == b[2]["val_accuracy"]
    with pytest.raises(UserError, match="different model or attribute schema"):
        train_attributes(tiny(dataset, out, epochs=4, model={"backbone": "lite0", "pretrained": False,
                                                             "input_size": 96, "neck": {"type": "gap", "normalize": False}}))
    # it trains in one process: under torchrun every process would train on every batch
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="one process"):
        train_attributes(tiny(dataset, out, epochs=4))
    monkeypatch.delenv("WORLD_SIZE")

    rc, stdout, _ = run_cli_inprocess(monkeypatch, capsys, "evaluate-attributes", out / "best", "--split", "test")
    doc = json.loads(stdout.strip().splitlines()[-1])
    assert rc == 0 and set(doc["attributes"]) == set(SCHEMA) and doc["split"] == "test"
    rc, stdout, _ = run_cli_inprocess(monkeypatch, capsys, "evaluate-attributes", out, "--split", "test")  # run folder
    assert rc == 0 and json.loads(stdout.strip().splitlines()[-1])["attributes"] == doc["attributes"]
    rc, _, err = run_cli_inprocess(monkeypatch, capsys, "evaluate-attributes", tmp_path)
    assert rc == 2 and "not a model checkpoint" in err
    photo = dataset / "Images" / "001.png"
    rc, stdout, err = run_cli_inprocess(monkeypatch, capsys, "explain", photo, tmp_path / "gone.png", "--model",
                                        out / "best", "--out", tmp_path / "ex", "-a", "colour")
    assert rc == 1 and "could not be read" in err
    doc = json.loads((tmp_path / "ex" / "001-explain.json").read_text())
    assert [a["attribute"] for a in doc["attributes"]] == ["colour_labels"]
    assert (tmp_path / "ex" / "001-explain.png").stat().st_size > 1000
    rc, _, err = run_cli_inprocess(monkeypatch, capsys, "explain", photo, "--model", out / "best", "-a", "size")
    assert rc == 2 and "not an attribute" in err


def test_config_refuses_a_normalised_neck(dataset, tmp_path):
    cfg = tiny(dataset, tmp_path / "x", model={"backbone": "lite0", "pretrained": False, "input_size": 64,
                                               "neck": {"type": "gap"}})
    with pytest.raises(UserError, match="normalize: false"):
        train_attributes(cfg)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"data: {dataset}\nepochs: 3\n")
    loaded = load_attribute_config(yaml_file, ["lr=0.5", "model.input_size=96"])
    assert loaded.lr == 0.5 and loaded.model.input_size == 96 and loaded.model.neck["normalize"] is False


@pytest.fixture(scope="module")
def explainer(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train_attributes(tiny(dataset, out, epochs=1))
    model, cfg, _ = load_attribute_run(out / "last")
    return AttributeExplainer(model, cfg.loss)


def test_closed_form_cams_equal_the_grad_cam_library(explainer, dataset):
    photos = [Image.open(dataset / "Images" / f"{i:03d}.png").convert("RGB") for i in (0, 1, 5)]
    fast = explainer.explain(photos)
    explainer.method = "gradcam"
    try:
        slow = explainer.explain(photos)
    finally:
        explainer.method = "auto"
    for row_fast, row_slow in zip(fast, slow):
        for a, b in zip(row_fast, row_slow):
            assert np.allclose(a.cam, b.cam, atol=1e-5)
            assert a.box == b.box and a.value == b.value
            assert a.feature is None or np.allclose(a.feature, b.feature)
            assert a.confidence == pytest.approx(max(a.scores.values()))


def test_letterbox_geometry_and_phrases():
    g = Letterbox(width=200, height=400, size=100)  # scaled to 50 x 100, 25 px padding left and right
    assert g.offset == (25, 0)
    assert g.box_to_photo((25, 0, 50, 100)) == (0, 0, 200, 400)
    assert g.box_to_photo((35, 10, 10, 20)) == (40, 40, 40, 80)
    cam = np.zeros((100, 100), np.float32)
    cam[:, 25:75] = np.linspace(0, 1, 50)[None]
    on_photo = g.map_to_photo(cam)
    assert on_photo.shape == (400, 200) and on_photo[:, -1].mean() > 0.95 and on_photo[:, 0].mean() < 0.05
    assert phrase("collar_labels", "yes", ["no", "yes"]) == "collar"
    assert phrase("collar_labels", "no", ["no", "yes"]) == "no collar"
    assert phrase("neckline_labels", "v-shape", ["v-shape", "round"]) == "v-shape neckline"
    assert phrase("sleevelength_labels", "long sleeves", ["short sleeves", "long sleeves"]) == "long sleeves"
    names = ["sleeve_length_labels", "neckline_labels"]
    assert find_attribute("Sleeve length", names) == "sleeve_length_labels"
    assert find_attribute("neckline_labels", names) == "neckline_labels"
    assert find_attribute("neck", names) is None


def test_blanking_and_faithfulness(explainer, dataset):
    x = torch.randn(3, 10, 10)
    out = blank(x, (2, 3, 4, 5), torch.tensor([1.0, 2.0, 3.0]))
    inside = torch.zeros(10, 10, dtype=torch.bool)
    inside[3:8, 2:6] = True
    assert torch.equal(out[:, ~inside], x[:, ~inside]) and (out[1, inside] == 2.0).all()
    rng = np.random.default_rng(0)
    for _ in range(50):
        bx, by, bw, bh = random_box_like((0, 0, 7, 30), (10, 0, 20, 100), rng)
        assert 10 <= bx and bx + bw <= 30 and 0 <= by and by + bh <= 100 and (bw, bh) == (7, 30)
    data = read_attribute_set(dataset)
    result = faithfulness(explainer, data.images[:6], data.targets[:6], data.mask[:6])
    colour = result["attributes"]["colour_labels"]
    assert colour["pairs"] + colour["no_box"] == 6
    assert result["mean"]["pairs"] + result["mean"]["no_box"] == 6 + int(data.mask[:6, 1].sum())
    assert result["mean"]["pairs"] > 0
    assert 0 < result["mean"]["box_area"] <= 1 and result["mean"]["original"] > 0


def make_street(root: Path) -> dict[str, int]:
    """24 noise photos of 40 x 30 px tagged hair (all), dress (odd), shoes (not a multiple of 3),
    each painted where its mask puts it (hair dark on top, a red dress in the middle, blue shoes at
    the bottom); the first 12 with masks. Returns how many masks show dress and shoes."""
    (root / "photos").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "labels.txt").write_text("null\ndress\nhair\nshoes\n")
    rows, present = [], {"dress": 0, "shoes": 0}
    rng = np.random.default_rng(0)
    for i in range(24):
        tags = ["hair"] + (["dress"] if i % 2 else []) + (["shoes"] if i % 3 else [])
        arr = rng.integers(0, 255, (40, 30, 3)).astype(np.uint8)
        arr[:8] = 20
        if "dress" in tags:
            arr[10:30, 5:25] = (200, 30, 30)
        if "shoes" in tags:
            arr[34:, 10:20] = (30, 30, 200)
        Image.fromarray(arr).save(root / "photos" / f"{i:04d}.png")
        kind = "pixel" if i < 12 else "image"
        if kind == "pixel":
            mask = np.zeros((40, 30), np.uint8)
            mask[:8] = 2
            if "dress" in tags:
                mask[10:30, 5:25] = 1
                present["dress"] += 1
            if "shoes" in tags:
                mask[34:, 10:20] = 3
                present["shoes"] += 1
            Image.fromarray(mask).save(root / "masks" / f"{i:04d}.png")
        rows.append(f"photos/{i:04d}.png,{kind}," + ",".join(tags))
    (root / "tags.csv").write_text("photo,annotation,tags...\n" + "\n".join(rows) + "\n")
    return present


def test_street_tags_train_and_pointing_counts(tmp_path, monkeypatch):
    """A street tag classifier trains on tags.csv; the pointing game tries every (photo, tag)
    present in a mask once, and with a tolerance as large as the photo every try is a hit."""
    from fashionlens.data.street import read_labels, read_street
    from fashionlens.evaluation.pointing import evaluate_pointing

    root = tmp_path / "street"
    present = make_street(root)
    cfg = tiny(root, tmp_path / "run", format="street", min_tag_photos=5, epochs=1, test_fraction=0.0)
    train_attributes(cfg)
    model, cfg, _ = load_attribute_run(tmp_path / "run" / "last")
    assert list(model.attr_head.schema) == ["dress", "hair", "shoes"]
    explainer = AttributeExplainer(model, cfg.loss)
    result = evaluate_pointing(explainer, read_street(root), read_labels(root), tolerances=(0, 100))
    assert result["photos"] == 12
    exact, loose = result["tolerance_0"], result["tolerance_100"]
    assert {tag: exact[tag]["photos"] for tag in present} == present and exact["hair"]["photos"] == 12
    assert all(loose[tag]["pointing"] == 1.0 for tag in loose)
    assert all(0.0 <= exact[tag]["iou"] <= 1.0 for tag in exact)

    # a photo whose mask holds none of the classifier's tags is skipped before it is decoded
    import dataclasses

    import fashionlens.data.images as images_mod

    decoded = []
    real_open = images_mod.open_image
    monkeypatch.setattr(images_mod, "open_image", lambda path, **kw: decoded.append(Path(path)) or real_open(path, **kw))
    street = read_street(root)
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(root / "masks" / "empty.png")
    no_tags = [dataclasses.replace(street[0], mask=root / "masks" / "empty.png")]
    assert evaluate_pointing(explainer, no_tags, read_labels(root))["photos"] == 0 and decoded == []
    assert evaluate_pointing(explainer, street[1:2], read_labels(root))["photos"] == 1 and decoded == [street[1].image]


def test_pointing_loss_trains_on_the_masks_of_training_photos(tmp_path):
    """pointing_loss: the street masks of the training photos enter the loss (logged per epoch,
    falling), and each tag's "yes" CAM learns where its mask is: the shoes' peak in the bottom row
    of the map, the hair's in the top row. It needs masks and cached maps; a mask of the wrong
    size, a set without masks and a resume with other pointing settings are refused."""
    from fashionlens.data.street import read_street
    from fashionlens.data.street import yes_columns

    root = tmp_path / "street"
    make_street(root)
    run = tmp_path / "run"
    model_cfg = {"backbone": "lite0", "pretrained": True, "input_size": 96, "freeze_backbone": True,
                 "neck": {"type": "gap", "normalize": False}}
    cfg = tiny(root, run, format="street", min_tag_photos=5, epochs=6, test_fraction=0.0, val_fraction=0.2,
               lr=0.02, optimizer="adam", feature_cache=str(tmp_path / "cache"), pointing_loss=3.0, model=model_cfg,
               augment={"hflip": 0.5, "rot180": 0.0, "crop": 0.0})
    train_attributes(cfg)
    rows = read_rows(run / "metrics.csv", 99)
    pointing = [float(r["pointing"]) for r in rows]
    assert len(pointing) == 6 and all(p > 0 for p in pointing)
    assert pointing[-1] < pointing[0]
    model, _, _ = load_attribute_run(run / "last")
    data, parts = read_config_data(cfg)
    assert yes_columns(data) == [1, 3, 5]  # dress, hair, shoes: each [no, yes]
    explainer = AttributeExplainer(model, cfg.loss)
    masked = [p for p in read_street(root) if p.mask is not None]
    x = torch.stack([explainer.preprocess(Image.open(p.image).convert("RGB")) for p in masked])
    _, tmap = explainer._forward(x)  # the 3 x 3 map of a 96 px input
    cams = torch.einsum("mc,nchw->nmhw", model.attr_head.weight.detach()[[3, 5]], tmap)  # hair, shoes "yes"
    peak_row = cams.flatten(2).argmax(-1) // cams.shape[-1]
    shoes = [n for n, p in enumerate(masked) if "shoes" in p.tags]
    assert (peak_row[shoes, 1] == 2).float().mean() >= 0.75
    assert (peak_row[:, 0] == 0).float().mean() >= 0.75
    # refused: another pointing setting on resume; no training photo with a mask; a mask of the wrong size
    with pytest.raises(UserError, match="same pointing settings"):
        train_attributes(cfg.model_copy(update={"epochs": 7, "pointing_cells": "share"}))
    for mask in (root / "masks").glob("*.png"):
        Image.open(mask).transpose(Image.Transpose.TRANSPOSE).save(mask)
    with pytest.raises(UserError, match="mask of 40 x 30 px for a photo of 30 x 40"):
        train_attributes(cfg.model_copy(update={"out": str(tmp_path / "run2")}))
    tags = root / "tags.csv"
    tags.write_text(tags.read_text().replace(",pixel,", ",image,"))
    with pytest.raises(UserError, match="has a mask"):
        train_attributes(cfg.model_copy(update={"out": str(tmp_path / "run3")}))
    with pytest.raises(ValueError, match="pointing_loss needs pixel masks"):
        tiny(root, run, format="street", pointing_loss=1.0)  # no feature cache
    with pytest.raises(ValueError, match="pointing_loss needs pixel masks"):
        tiny(root, run, pointing_loss=1.0, feature_cache=str(tmp_path / "cache"), model=model_cfg)  # fashionai


def test_flip_averages_each_photo_with_its_mirror_image(tmp_path):
    """make_embed(flip=True) is the mean of the outputs of the photo and of its mirror image."""
    from torch import nn

    from fashionlens.data.transforms import Preprocess
    from fashionlens.training.model_outputs import make_embed

    class LeftRight(nn.Module):  # outputs the mean of the left and of the right half of channel 0
        def forward(self, x, from_map=False):
            half = x.shape[-1] // 2
            return {"attr_logits": torch.stack([x[:, 0, :, :half].mean((1, 2)), x[:, 0, :, half:].mean((1, 2))], 1)}

    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, :8] = 255  # white left, black right
    Image.fromarray(arr).save(tmp_path / "half.png")
    pre = Preprocess(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    plain = make_embed(LeftRight(), "cpu", None, pre, key="attr_logits", dim=2)([tmp_path / "half.png"])
    both = make_embed(LeftRight(), "cpu", None, pre, key="attr_logits", dim=2, flip=True)([tmp_path / "half.png"])
    assert plain[0, 0] > 0.9 and plain[0, 1] < 0.1
    assert torch.allclose(both[0], plain[0].mean().expand(2), atol=1e-6)
    with pytest.raises(ValueError, match="flip needs images"):
        make_embed(LeftRight(), "cpu", object(), pre, key="attr_logits", dim=2, flip=True)


def test_traced_forward_explains_as_the_eager_model(explainer, dataset):
    """``optimize`` traces and freezes the forward pass; values, boxes and features stay those of
    the eager model (Grad-CAM still runs on the eager one)."""
    import copy

    photos = [Image.open(dataset / "Images" / f"{i:03d}.png").convert("RGB") for i in (0, 2, 7)]
    eager = explainer.explain(photos)
    fast = copy.copy(explainer)
    assert fast.optimize("jit") == "jit" and fast._fast is not None
    traced, calls = fast._fast, []
    fast._fast = lambda x: calls.append(len(x)) or traced(x)  # the explanations go through the trace
    for row_fast, row_eager in zip(fast.explain(photos), eager):
        for a, b in zip(row_fast, row_eager):
            assert a.value == b.value and a.box == b.box
            assert a.confidence == pytest.approx(b.confidence, abs=1e-4)
            assert np.allclose(a.cam, b.cam, atol=1e-3)
    assert calls == [3]
    assert fast.optimize("none") == "none" and fast._fast is None  # back to the eager model
    assert explainer._fast is None  # the copy's trace is its own
