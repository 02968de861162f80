"""Training augmentations (thesis A): shapes, exact flips, erasing geometry, identity at p = 0."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch
from PIL import Image

from fashionlens.data.augment import AugmentConfig, RandomSideErasing, TrainPreprocess, build_train_augment

OFF = {"hflip": 0, "rot180": 0, "rotate": 0, "color": 0, "erase": 0}


def _img(dtype=torch.float32, h=48, w=64):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, h, w, generator=g) * 0.9 + 0.05  # no exact zeros
    return (x * 255).to(torch.uint8) if dtype == torch.uint8 else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_shape_and_dtype_preserved(dtype):
    aug = build_train_augment({"hflip": 1, "rot180": 1, "rotate": 1, "color": 1, "erase": 1})
    x = _img(dtype)
    for seed in range(5):
        torch.manual_seed(seed)
        y = aug(x)
        assert y.shape == x.shape and y.dtype == dtype
    torch.manual_seed(0)
    default = build_train_augment(None)(x)
    assert default.shape == x.shape and default.dtype == dtype


def test_all_zero_is_identity():
    aug = build_train_augment(OFF)
    x = _img()
    for seed in range(3):
        torch.manual_seed(seed)
        assert torch.equal(aug(x), x)


def test_flip_p1_is_torch_flip():
    x = _img()
    assert torch.equal(build_train_augment({**OFF, "hflip": 1})(x), torch.flip(x, dims=(-1,)))


def test_rot180_p1_is_rot180():
    x = _img()
    assert torch.equal(build_train_augment({**OFF, "rot180": 1})(x), torch.rot90(x, 2, dims=(-2, -1)))


def test_small_rotation_keeps_centre():
    x = torch.zeros(3, 41, 41)
    x[:, 15:26, 15:26] = 1.0
    torch.manual_seed(0)
    y = build_train_augment({**OFF, "rotate": 1, "rotate_degrees": 10})(x)
    assert torch.allclose(y[:, 18:23, 18:23], torch.ones(3, 5, 5))
    assert not torch.equal(y, x)


def test_color_changes_values_within_range():
    x = _img()
    torch.manual_seed(1)
    y = build_train_augment({**OFF, "color": 1})(x)
    assert not torch.equal(y, x) and y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("h,w", [(48, 64), (227, 227), (100, 37)])
def test_erasing_rectangle_sides_and_fill(h, w):
    aug = build_train_augment({**OFF, "erase": 1})
    x = _img(h=h, w=w)
    for seed in range(40):
        torch.manual_seed(seed)
        y = aug(x)
        zero = (y == 0).all(0)
        assert torch.equal(y[:, ~zero], x[:, ~zero])  # nothing else changed
        rows = zero.any(1).nonzero().flatten()
        cols = zero.any(0).nonzero().flatten()
        eh, ew = len(rows), len(cols)
        assert int(zero.sum()) == eh * ew  # a filled rectangle
        assert rows[-1] - rows[0] + 1 == eh and cols[-1] - cols[0] + 1 == ew
        assert math.ceil(h / 16) <= eh <= max(1, h // 8)
        assert math.ceil(w / 16) <= ew <= max(1, w // 8)


def test_erasing_probability():
    erase = RandomSideErasing(p=0.5)
    x = _img()
    torch.manual_seed(0)
    hits = sum(bool((erase(x) == 0).any()) for _ in range(200))
    assert 70 < hits < 130
    assert torch.equal(RandomSideErasing(p=0.0)(x), x)


def test_config_validation_and_defaults():
    cfg = AugmentConfig()
    assert (cfg.hflip, cfg.rot180, cfg.rotate, cfg.color, cfg.erase) == (0.5, 0.1, 0.3, 0.5, 0.5)
    assert cfg.rotate_degrees == 10 and cfg.brightness == cfg.contrast == 0.2
    assert (cfg.erase_min, cfg.erase_max) == (1 / 16, 1 / 8)
    with pytest.raises(ValueError):
        AugmentConfig(hflip=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(flip=0.5)


def test_train_preprocess_matches_eval_layout():
    from fashionlens.data.transforms import Preprocess

    img = Image.new("RGB", (30, 20), (200, 100, 50))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train = TrainPreprocess(32, mean, std, augment=OFF)(img)
    evaluation = Preprocess(32, mean, std)(img)
    assert train.shape == evaluation.shape == (3, 32, 32)
    assert torch.allclose(train, evaluation, atol=1e-5)


def test_crop_box_bounds_and_area():
    from fashionlens.data.augment import crop_box

    torch.manual_seed(0)
    areas = []
    for _ in range(500):
        left, top, right, bottom = crop_box(120, 80, 0.35)
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 80
        areas.append((right - left) * (bottom - top) / (120 * 80))
    # the aspect clip can only shrink a box a little below the drawn area
    assert min(areas) > 0.25 and max(areas) <= 1.0 and np.mean(areas) > 0.55


def test_train_preprocess_crop_zooms_in():
    """A photo whose left half is red and right half blue: a crop changes the colour balance,
    no crop keeps it exactly (the other augmentations off)."""
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    img = Image.fromarray(arr)
    off = {**OFF, "crop": 0.0}
    base = TrainPreprocess(32, (0.0,) * 3, (1.0,) * 3, off)(img)
    assert float(base[0].mean()) == pytest.approx(float(base[2].mean()), abs=1e-3)
    torch.manual_seed(1)
    pre = TrainPreprocess(32, (0.0,) * 3, (1.0,) * 3, {**OFF, "crop": 1.0, "crop_min": 0.1})
    balance = [float(x[0].sum() - x[2].sum()) for x in (pre(img) for _ in range(20))]
    assert max(abs(b) for b in balance) > 10


def _shop_photo() -> Image.Image:
    """A white 60 x 60 'shop photo': a dark garment outline (a ring) enclosing a white patch, and
    a red square touching nothing."""
    arr = np.full((60, 60, 3), 255, np.uint8)
    arr[15:45, 15:45] = (20, 20, 120)  # the garment
    arr[22:38, 22:38] = 255  # a white print inside it: enclosed, not background
    arr[2:6, 50:56] = (200, 0, 0)
    return Image.fromarray(arr)


def test_plain_background_is_the_light_region_touching_the_border():
    from fashionlens.data.augment import plain_background

    mask = plain_background(_shop_photo())
    expected = np.ones((60, 60), bool)
    expected[15:45, 15:45] = False
    expected[2:6, 50:56] = False
    assert np.array_equal(mask, expected)
    # a diagonal gap (8-connected) lets the background in
    arr = np.asarray(_shop_photo()).copy()
    arr[21, 21] = 255
    arr[20, 20] = 255
    arr[19:21, 15:20] = 255
    arr[15:19, 19] = 255
    assert plain_background(Image.fromarray(arr))[30, 30]


def test_replace_background_changes_only_the_background():
    from fashionlens.data.augment import plain_background, replace_background

    img = _shop_photo()
    before = np.asarray(img)
    torch.manual_seed(0)
    after = np.asarray(replace_background(img))
    mask = plain_background(img)
    assert np.array_equal(after[~mask], before[~mask])  # garment, its white print, the red square
    assert (after[mask] != 255).any(axis=1).mean() > 0.9  # the background is no longer white
    # textures differ from draw to draw, and stay inside uint8 with the photo's shape
    again = np.asarray(replace_background(img))
    assert again.shape == after.shape and not np.array_equal(again[mask], after[mask])


def test_replace_background_leaves_photos_without_one():
    from fashionlens.data.augment import replace_background

    torch.manual_seed(0)
    busy = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 200).astype(np.uint8))
    assert np.array_equal(np.asarray(replace_background(busy)), np.asarray(busy))  # no light border region
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    assert np.array_equal(np.asarray(replace_background(white)), np.asarray(white))  # over max_share
    # a garment filling the frame, a white rim of one pixel: 396 of 10,000 pixels, under min_share
    arr = np.full((100, 100, 3), 255, np.uint8)
    arr[1:-1, 1:-1] = (30, 60, 90)
    rim = Image.fromarray(arr)
    assert np.array_equal(np.asarray(replace_background(rim)), arr)
    assert not np.array_equal(np.asarray(replace_background(rim, min_share=0.03)), arr)


def test_random_texture_shape_range_and_variety():
    from fashionlens.data.augment import random_texture

    torch.manual_seed(0)
    textures = [random_texture(30, 50) for _ in range(20)]
    assert all(t.shape == (30, 50, 3) and t.dtype == np.uint8 for t in textures)
    means = np.array([t.mean() for t in textures])
    assert means.std() > 10  # brightness varies between draws
    assert all(t.std() > 0 for t in textures)
    # clipped, not wrapped around: neighbouring pixels never jump from dark to bright
    many = [random_texture(40, 40) for _ in range(200)]
    assert max(int(np.abs(np.diff(t.astype(int), axis=1)).max()) for t in many) < 160
    assert max(int(t.max()) for t in many) == 255  # bright draws reach the clip


def test_train_preprocess_background_probability():
    """With p 1 a shop photo's background changes in every draw (other augmentations off); with
    p 0 never; the garment's pixels are the same either way."""
    img = _shop_photo()
    plain = TrainPreprocess(60, (0.0,) * 3, (1.0,) * 3, OFF)(img)
    torch.manual_seed(0)
    pre = TrainPreprocess(60, (0.0,) * 3, (1.0,) * 3, {**OFF, "background": 1.0})
    for _ in range(5):
        out = pre(img)
        assert not torch.allclose(out[:, 0:10, 0:10], plain[:, 0:10, 0:10])
        assert torch.equal(out[:, 16:20, 16:20], plain[:, 16:20, 16:20])
    assert AugmentConfig().background == 0.0
