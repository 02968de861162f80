"""Attention maps (fashionlens.explain.attention) and ``fashionlens attention``, on tiny real
checkpoints: resnet18 (random weights) at 96 px, so the feature map is 3 x 3."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from fashionlens.data.transforms import Preprocess, letterbox
from fashionlens.errors import UserError
from conftest import run_cli_inprocess
from fashionlens.explain.attention import attention_masks, attention_sheet, masked_images, normalize_masks
from fashionlens.models.builder import ModelConfig, build_model
from fashionlens.models.checkpoints import save_checkpoint

SIZE, CELLS = 96, 3  # resnet18: stride 32
LAN = {"type": "lan", "branches": 2, "dim": 8}


def _checkpoint(folder, neck):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", pretrained=False, input_size=SIZE, neck=neck)
    model, _ = build_model(cfg)
    for m in model.neck.modules():  # spread the masks out: at init they all sit near 0.5
        if hasattr(m, "spatial") and m.spatial is not None:
            torch.nn.init.normal_(m.spatial.weight, std=0.5)
    return save_checkpoint(folder, model.eval(), cfg), model.eval()


@pytest.fixture(scope="module")
def lan(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("lan") / "ckpt", LAN)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 120 x 80 colour gradient (not square, so the letterbox pads it)."""
    yy, xx = np.mgrid[:80, :120]
    arr = np.stack([xx * 2, yy * 3, (xx + yy) % 256], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("photos") / "shirt.png"
    Image.fromarray(arr).save(path)
    return path


def _run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    return run_cli_inprocess(monkeypatch, capsys, "attention", *args)


def test_masks_are_the_models(lan, photo):
    _, model = lan
    image = Image.open(photo).convert("RGB")
    boxed, masks = attention_masks(model, image)
    assert boxed.size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(boxed), np.asarray(letterbox(image, SIZE)))
    assert list(masks) == ["masks"]
    m = masks["masks"]
    assert m.shape == (2, CELLS, CELLS) and m.dtype == np.float32
    assert (m >= 0).all() and (m <= 1).all() and m.std() > 0.01
    cfg = model.data_config
    x = Preprocess(SIZE, cfg["mean"], cfg["std"])(image)[None]
    with torch.no_grad():
        assert model.feature_map(x).shape[-2:] == (CELLS, CELLS)
        np.testing.assert_allclose(m, model(x)["masks"][0].numpy(), atol=1e-6)


def test_masked_image_is_image_times_nearest_upsampled_mask(lan, photo):
    boxed, masks = attention_masks(lan[1], Image.open(photo))
    arr = np.asarray(boxed, dtype=np.float64)
    block = np.ones((SIZE // CELLS, SIZE // CELLS))
    for normalize in (False, True):
        m = masks["masks"].astype(np.float64)
        if normalize:
            m = (m - m.min(axis=(1, 2), keepdims=True)) / np.ptp(m, axis=(1, 2), keepdims=True)
        images = masked_images(boxed, masks["masks"], normalize=normalize)
        assert len(images) == 2
        for img, mask in zip(images, m):
            expected = arr * np.kron(mask, block)[..., None]
            got = np.asarray(img)
            assert img.mode == "RGB" and got.dtype == np.uint8 and got.shape == arr.shape
            assert np.abs(got - expected).max() <= 1


def test_normalize_masks_edge_cases():
    m = np.array([[[0.4, 0.6], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]], np.float32)
    n = normalize_masks(m)
    np.testing.assert_allclose(n[0], [[0, 1], [0.5, 0.5]], atol=1e-6)
    assert (n[1] == 1).all()  # a constant mask shows the image unchanged
    with pytest.raises(ValueError):
        masked_images(Image.new("RGB", (8, 8)), m[0])


def test_sheet_layout(lan, photo):
    boxed, masks = attention_masks(lan[1], Image.open(photo))
    sheet = attention_sheet(boxed, masks)
    assert sheet.mode == "RGB" and sheet.width == 4 + 3 * (SIZE + 4) and sheet.height > SIZE + 8
    tiles = [np.asarray(sheet.crop((4 + j * (SIZE + 4), 4, 4 + j * (SIZE + 4) + SIZE, 4 + SIZE)))
             for j in range(3)]
    assert np.array_equal(tiles[0], np.asarray(boxed))
    for tile, img in zip(tiles[1:], masked_images(boxed, masks["masks"])):
        assert np.array_equal(tile, np.asarray(img))
    caption = np.asarray(sheet.crop((4, 4 + SIZE, 4 + SIZE, sheet.height)))
    assert (caption < 128).any()  # some text was drawn


def test_cli_writes_the_pictures(lan, photo, tmp_path, monkeypatch, capsys):
    jpg = tmp_path / "other" / "shirt.jpg"  # same stem as `photo`: must not overwrite it
    jpg.parent.mkdir()
    Image.open(photo).save(jpg, quality=95)
    out = tmp_path / "out"
    rc, stdout, _ = _run_cli(monkeypatch, capsys, photo, jpg, "--model", lan[0], "--out", out, "--normalize")
    assert rc == 0
    names = ["shirt-attention.png", "shirt-branch1.png", "shirt-branch2.png",
             "shirt-2-attention.png", "shirt-2-branch1.png", "shirt-2-branch2.png"]
    assert stdout.split() == [str(out / n) for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        img = Image.open(out / name)
        if "branch" in name:
            assert img.size == (SIZE, SIZE)
        else:
            assert img.width == 4 + 3 * (SIZE + 4)
    boxed, masks = attention_masks(lan[1], Image.open(photo))
    expected = masked_images(boxed, masks["masks"], normalize=True)[1]
    assert np.array_equal(np.asarray(Image.open(out / "shirt-branch2.png")), np.asarray(expected))


def test_cli_bad_photo_is_reported_and_others_processed(lan, photo, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    out = tmp_path / "out"
    rc, stdout, stderr = _run_cli(monkeypatch, capsys, bad, photo, tmp_path / "missing.jpg",
                                  "--model", lan[0], "--out", out)
    assert rc == 1
    assert "bad.jpg: not an image file" in stderr and "missing.jpg: no such file" in stderr
    assert "2 of 3 photo(s) could not be read" in stderr
    assert (out / "shirt-attention.png").is_file() and (out / "shirt-branch2.png").is_file()
    assert stdout.split() == [str(out / n) for n in ("shirt-attention.png", "shirt-branch1.png", "shirt-branch2.png")]


def test_cli_model_errors(lan, photo, tmp_path, monkeypatch, capsys):
    gap, _ = _checkpoint(tmp_path / "gap", {"type": "gap"})
    rc, _, stderr = _run_cli(monkeypatch, capsys, photo, "--model", gap, "--out", tmp_path / "o")
    assert rc == 2 and stderr.startswith("error: this model has no spatial attention masks (neck type gap)")
    assert not list((tmp_path / "o").iterdir())
    for model in (tmp_path / "nowhere", "lite0"):
        rc, _, stderr = _run_cli(monkeypatch, capsys, photo, "--model", model, "--out", tmp_path / "o")
        assert rc == 2 and "not a model checkpoint" in stderr
    (tmp_path / "file").write_text("")
    rc, _, stderr = _run_cli(monkeypatch, capsys, photo, "--model", lan[0], "--out", tmp_path / "file")
    assert rc == 2 and "not a folder" in stderr


def test_no_spatial_masks_error():
    model, _ = build_model(ModelConfig(backbone="resnet18", pretrained=False, input_size=64,
                                       neck={**LAN, "spatial": False}))
    with pytest.raises(UserError, match=r"neck type local_alignment with spatial=False"):
        attention_masks(model, Image.new("RGB", (50, 40)))


def test_multi_neck(photo, tmp_path, monkeypatch, capsys):
    one, _ = _checkpoint(tmp_path / "one", {"type": "multi", "necks": {"g": {"type": "gap"}, "lan": LAN}})
    rc, stdout, _ = _run_cli(monkeypatch, capsys, photo, "--model", one, "--out", tmp_path / "o1")
    assert rc == 0
    assert [p.rsplit("/", 1)[-1] for p in stdout.split()] == [
        "shirt-attention.png", "shirt-branch1.png", "shirt-branch2.png"]

    neck = {"type": "multi", "necks": {"a": LAN, "g": {"type": "gap"}, "b": {**LAN, "branches": 1}}}
    two, model = _checkpoint(tmp_path / "two", neck)
    boxed, masks = attention_masks(model, Image.open(photo))
    assert list(masks) == ["a.masks", "b.masks"]
    assert masks["a.masks"].shape == (2, CELLS, CELLS) and masks["b.masks"].shape == (1, CELLS, CELLS)
    assert attention_sheet(boxed, masks).width == 4 + 4 * (SIZE + 4)
    rc, stdout, _ = _run_cli(monkeypatch, capsys, photo, "--model", two, "--out", tmp_path / "o2")
    assert rc == 0
    assert [p.rsplit("/", 1)[-1] for p in stdout.split()] == [
        "shirt-attention.png", "shirt-a-branch1.png", "shirt-a-branch2.png", "shirt-b-branch1.png"]
