"""Class activation maps and RoI features (fashionlens.explain.cam): region boxes on synthetic
maps, roi_features against a loop reference of torchvision's kernel, and the closed-form
GAP + linear CAMs against the grad-cam library on a tiny real model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fashionlens.explain.cam import (
    grad_cams, largest_region_box, linear_gap_cams, pooled_vector, region_mask, roi_features,
)

# ---------------------------------------------------------------- largest_region_box


def test_bigger_region_wins_over_the_one_holding_the_peak():
    cam = np.zeros((10, 10))
    cam[2:5, 1:5] = 0.6  # 12 pixels
    cam[7:9, 7:9] = 1.0  # 4 pixels, the peak
    assert largest_region_box(cam) == (1, 2, 4, 3)
    mask = region_mask(cam)
    assert mask.dtype == bool and mask.sum() == 12 and mask[2:5, 1:5].all()


def test_box_holds_python_ints():
    cam = np.zeros((6, 6), dtype=np.float32)
    cam[1:3, 2:5] = 1
    box = largest_region_box(cam)
    assert box == (2, 1, 3, 2) and all(type(v) is int for v in box)


def test_diagonal_neighbours_are_joined():
    cam = np.zeros((12, 12))
    cam[1:3, 1:3] = 1.0  # 4 pixels
    cam[3:5, 3:5] = 1.0  # 4 pixels, touching the first one only at a corner
    cam[8, 2:8] = 1.0  # 6 pixels in a row: the largest with 4-connectivity
    assert largest_region_box(cam) == (1, 1, 4, 4)


def test_threshold_is_relative_to_the_peak():
    cam = np.zeros((9, 9))
    cam[1:8, 1:8] = 0.4  # a wide halo ...
    cam[3:5, 4:6] = 2.0  # ... around a strong core
    assert largest_region_box(cam, 0.5) == (4, 3, 2, 2)
    assert largest_region_box(cam, 0.2) == (1, 1, 7, 7)
    assert largest_region_box(cam * 10, 0.5) == (4, 3, 2, 2)  # scale-free
    assert largest_region_box(cam, 1.0) == (4, 3, 2, 2)


def test_size_tie_goes_to_larger_sum_then_first_label():
    cam = np.zeros((8, 8))
    cam[1, 1:4] = 0.6
    cam[5, 4:7] = 1.0  # same size, larger sum
    assert largest_region_box(cam) == (4, 5, 3, 1)
    cam[5, 4:7] = 0.6  # same size and sum: the first in row-major order
    assert largest_region_box(cam) == (1, 1, 3, 1)


@pytest.mark.parametrize("cam", [np.zeros((5, 5)), -np.ones((5, 5)), np.full((3, 3), np.nan),
                                 np.zeros((0, 4))])
def test_no_positive_peak_gives_none(cam):
    assert largest_region_box(cam) is None and region_mask(cam) is None


def test_single_pixel_and_full_map():
    cam = np.zeros((7, 5))
    cam[6, 3] = 0.2
    assert largest_region_box(cam) == (3, 6, 1, 1)
    assert largest_region_box(np.ones((5, 7))) == (0, 0, 7, 5)


@pytest.mark.parametrize("cam, threshold", [(np.ones(5), 0.5), (np.ones((2, 3, 3)), 0.5),
                                            (np.ones((3, 3)), 0.0), (np.ones((3, 3)), 1.5),
                                            (np.ones((3, 3)), float("nan"))])
def test_bad_input_raises(cam, threshold):
    with pytest.raises(ValueError):
        largest_region_box(cam, threshold)


# ---------------------------------------------------------------- roi_features


def _c_round(v: float) -> int:
    """C's round(): halves away from zero (the values here are >= 0)."""
    return int(math.floor(v + 0.5))


def _roi_pool_reference(fmap, boxes, index, scale, size):
    """torchvision's roi_pool kernel as Python loops (float32 arithmetic like the kernel)."""
    _, c, height, width = fmap.shape
    f32 = np.float32
    out = torch.zeros(len(boxes), c, size, size)
    for k, (x, y, w, h) in enumerate(boxes.tolist()):
        x1, y1 = _c_round(f32(x) * f32(scale)), _c_round(f32(y) * f32(scale))
        x2 = _c_round(f32(f32(x) + f32(w)) * f32(scale))
        y2 = _c_round(f32(f32(y) + f32(h)) * f32(scale))
        bin_w = f32(max(x2 - x1 + 1, 1)) / f32(size)
        bin_h = f32(max(y2 - y1 + 1, 1)) / f32(size)
        for ph in range(size):
            hs = min(max(math.floor(f32(ph) * bin_h) + y1, 0), height)
            he = min(max(math.ceil(f32(ph + 1) * bin_h) + y1, 0), height)
            for pw in range(size):
                ws = min(max(math.floor(f32(pw) * bin_w) + x1, 0), width)
                we = min(max(math.ceil(f32(pw + 1) * bin_w) + x1, 0), width)
                if he > hs and we > ws:
                    out[k, :, ph, pw] = fmap[int(index[k]), :, hs:he, ws:we].amax(dim=(1, 2))
    return out


BOXES_224 = [[0, 0, 224, 224],  # the whole image: the end cell 7 is clipped
             [200, 180, 24, 44],  # at the bottom-right border
             [64, 96, 10, 10],  # one cell: x 2.0..2.31 -> cell 2, y 3.0..3.31 -> cell 3
             [16, 48, 32, 40],  # halves: 0.5 -> 1, 1.5 -> 2 (C round, not Python's)
             [33.3, 70.9, 120.2, 61.7]]
BOXES_64x96 = [[0, 0, 96, 64], [90, 60, 6, 4], [4, 12, 8, 8], [4, 12, 60, 30], [40.6, 3.2, 33.1, 50.5]]


@pytest.mark.parametrize("image_size, cells, boxes", [((224, 224), (7, 7), BOXES_224),
                                                      ((64, 96), (8, 12), BOXES_64x96)])
@pytest.mark.parametrize("output_size", [1, 2, 3, 7])
def test_roi_features_match_the_kernel_reference(image_size, cells, boxes, output_size):
    gen = torch.Generator().manual_seed(3)
    fmap = torch.randn(2, 4, *cells, generator=gen)
    boxes = torch.tensor(boxes, dtype=torch.float32)
    index = torch.tensor([0, 1, 0, 1, 1])
    got = roi_features(fmap, boxes, index, image_size, output_size)
    want = _roi_pool_reference(fmap, boxes, index, cells[0] / image_size[0], output_size)
    assert got.shape == (5, 4, output_size, output_size)
    assert torch.equal(got, want)


def test_roi_features_one_bin_is_the_max_over_the_rounded_slice():
    gen = torch.Generator().manual_seed(5)
    fmap = torch.randn(1, 6, 7, 7, generator=gen)
    boxes = torch.tensor([[0.0, 0.0, 224.0, 224.0], [64.0, 96.0, 10.0, 10.0], [40.0, 100.0, 90.0, 30.0]])
    got = roi_features(fmap, boxes, None, (224, 224), output_size=1)[:, :, 0, 0]
    for k, (x, y, w, h) in enumerate(boxes.tolist()):
        x1, y1, x2, y2 = (_c_round(v / 32) for v in (x, y, x + w, y + h))
        want = fmap[0, :, y1:y2 + 1, x1:x2 + 1].amax(dim=(1, 2))
        assert torch.equal(got[k], want)
    assert torch.equal(got[0], fmap[0].amax(dim=(1, 2)))
    assert torch.equal(got[1], fmap[0, :, 3, 2])  # a one-cell box takes exactly that cell


def test_roi_features_bad_input():
    fmap = torch.zeros(2, 3, 7, 7)
    box = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    with pytest.raises(ValueError):
        roi_features(fmap, box, None, (224, 256))  # 7/224 != 7/256
    with pytest.raises(ValueError):
        roi_features(fmap, box, torch.tensor([2]), (224, 224))  # only images 0 and 1
    with pytest.raises(ValueError):
        roi_features(fmap, box[0], None, (224, 224))


def test_pooled_vector_shape_and_norm():
    roi = torch.randn(4, 16, 3, 3, generator=torch.Generator().manual_seed(1))
    vec = pooled_vector(roi)
    assert vec.shape == (4, 16)
    assert torch.allclose(vec.norm(dim=1), torch.ones(4), atol=1e-6)
    mean = roi.mean(dim=(2, 3))
    assert torch.allclose(vec, mean / mean.norm(dim=1, keepdim=True), atol=1e-6)


# ---------------------------------------------------------------- Grad-CAM


def _tiny_model(stride: int = 1, size: tuple[int, int] = (16, 16)):
    """Conv -> ReLU (the target layer) -> GAP -> Linear(8, 5); stride 2 makes the feature map
    smaller than the input, so the maps are resized (bilinear) as well as min-max scaled."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=stride), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    model = nn.Sequential(backbone, head)
    images = torch.randn(2, 3, *size)
    return model, backbone, head[2], images


@pytest.mark.parametrize("stride, size", [(1, (16, 16)), (2, (16, 24))])
def test_linear_gap_cams_equal_grad_cams(stride, size):
    model, backbone, linear, images = _tiny_model(stride, size)
    columns = [0, 2, 4, 1]
    with torch.no_grad():
        closed = linear_gap_cams(backbone(images), linear.weight, columns, size)
    assert closed.shape == (2, 4, *size) and closed.dtype == np.float32
    for j, col in enumerate(columns):
        lib = grad_cams(model, backbone[1], images, [col, col])
        assert lib.shape == (2, *size)
        assert np.allclose(closed[:, j], lib, atol=1e-5)
    mixed = grad_cams(model, backbone[1], images, [3, 1])  # a different column per image
    both = linear_gap_cams(backbone(images), linear.weight, torch.tensor([3, 1]), size)
    assert np.allclose(mixed, np.stack([both[0, 0], both[1, 1]]), atol=1e-5)
    # not vacuous: real maps in [0, 1] that differ between attributes
    assert closed.min() >= 0 and closed.max() <= 1 and closed.max(axis=(2, 3)).min() > 0.99
    assert np.abs(closed[:, 0] - closed[:, 1]).max() > 0.1


def test_linear_gap_cams_at_feature_resolution():
    _, backbone, linear, images = _tiny_model()
    fmap = backbone(images)[:, :, ::4, ::2]  # (2, 8, 4, 8): not square
    cams = linear_gap_cams(fmap, linear.weight, [1, 3], None)
    assert cams.shape == (2, 2, 4, 8)
    raw = torch.relu(torch.einsum("k,nkij->nij", linear.weight[1], fmap)).detach().numpy()
    expected = (raw - raw.min(axis=(1, 2), keepdims=True)) / raw.max(axis=(1, 2), keepdims=True)
    assert np.allclose(cams[:, 0], expected, atol=1e-5)
    assert linear_gap_cams(fmap, linear.weight, [1], (12, 20)).shape == (2, 1, 12, 20)


def test_grad_cams_with_frozen_model_restores_state():
    model, backbone, linear, images = _tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    head_bias = linear.bias
    head_bias.requires_grad_(True)  # a mix of frozen and trainable parameters
    head_bias.grad = torch.full_like(head_bias, 7.0)
    backbone.eval()  # a mix of modes too
    with torch.no_grad():  # grad_cams turns gradients back on for itself
        lib = grad_cams(model, backbone[1], images, [4, 0])
        closed = linear_gap_cams(backbone(images), linear.weight, [4, 0], (16, 16))
    assert np.allclose(lib, np.stack([closed[0, 0], closed[1, 1]]), atol=1e-5)
    assert [p.requires_grad for p in model.parameters()] == [False, False, False, True]
    assert all(p.grad is None for p in model.parameters() if p is not head_bias)
    assert torch.equal(head_bias.grad, torch.full_like(head_bias, 7.0))
    assert model.training and model[1].training and not backbone.training and not backbone[0].training


def test_grad_cams_needs_one_column_per_image():
    model, backbone, _, images = _tiny_model()
    with pytest.raises(ValueError):
        grad_cams(model, backbone[1], images, [0])
