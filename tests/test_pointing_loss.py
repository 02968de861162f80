"""The pointing loss against a brute-force loop, the mask -> cell shares geometry, and the masked
map dataset's joint augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fashionlens.losses.pointing import PointingLoss
from fashionlens.training.attribute_masks import MaskedMapDataset, cell_shares
from fashionlens.training.feature_cache import MapAugment


def brute_force(feature_map, weight, targets, min_share=0.0, by_share=False):
    """Cell by cell: -log of the softmax mass of the CAM on the mask (each cell weighted by its
    share with ``by_share``), mean over non-empty pairs."""
    n, c, h, w = feature_map.shape
    losses = []
    for i in range(n):
        for m in range(weight.shape[0]):
            cams = [sum(float(weight[m, k]) * float(feature_map[i, k, y, x]) for k in range(c))
                    for y in range(h) for x in range(w)]
            shares = [float(targets[i, m, y, x]) for y in range(h) for x in range(w)]
            on = [v > min_share for v in shares]
            if not any(on):
                continue
            z = max(cams)
            total = sum(math.exp(v - z) for v in cams)
            inside = sum(math.exp(v - z) * (share if by_share else 1.0) for v, o, share in zip(cams, on, shares) if o)
            losses.append(-math.log(inside / total))
    return sum(losses) / len(losses)


def test_pointing_loss_matches_a_triple_loop():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 4, 3, generator=g)
    weight = torch.randn(2, 5, generator=g)
    targets = (torch.rand(3, 2, 4, 3, generator=g) > 0.6).float() * torch.rand(3, 2, 4, 3, generator=g)
    targets[1, 0] = 0  # an empty mask: no loss for that pair
    for min_share in (0.0, 0.3):
        for cells in ("touched", "share"):
            got = PointingLoss(min_share, cells)(t, weight, targets)
            want = brute_force(t, weight, targets, min_share, cells == "share")
            assert got.item() == pytest.approx(want, rel=1e-5)


def test_pointing_loss_properties():
    t = torch.zeros(1, 1, 2, 2)
    t[0, 0, 1, 0] = 5.0  # the map peaks on cell (1, 0)
    weight = torch.ones(1, 1, requires_grad=True)
    on_peak, off_peak = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    on_peak[0, 0, 1, 0] = 1
    off_peak[0, 0, 0, 1] = 1
    loss = PointingLoss()
    assert loss(t, weight, on_peak) < loss(t, weight, off_peak)
    # a constant added to every cell (the head's bias, or the image-level logit) changes nothing
    assert loss(t + 3.0, weight, on_peak).item() == pytest.approx(loss(t, weight, on_peak).item(), rel=1e-5)
    # targets at twice the map's resolution are average-pooled to it
    fine = on_peak.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert loss(t, weight, fine).item() == pytest.approx(loss(t, weight, on_peak).item())
    # no mask at all: 0, still in the graph
    empty = loss(t, weight, torch.zeros(1, 1, 2, 2))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    with pytest.raises(ValueError, match="shapes do not fit"):
        loss(t, torch.ones(1, 2), on_peak)


def test_cell_shares_follow_the_letterbox():
    """A 40 x 30 (h x w) mask letterboxed to 8 px: scale 0.2, the photo 6 x 8 px at columns 1..6.
    Label 1 on the top half of the photo -> input rows 0..3, columns 1..6; 2 x 2 px cells."""
    mask = np.zeros((40, 30), np.uint8)
    mask[:20] = 1
    shares = cell_shares(mask, [1, 0, -1], 8, (4, 4))
    expected = np.zeros((4, 4), np.float32)
    expected[:2] = [0.5, 1.0, 1.0, 0.5]  # the edge cells are half padding
    np.testing.assert_allclose(shares[0], expected)
    # label 0 (background) fills the photo's bottom half, never the padding; a negative id is empty
    np.testing.assert_allclose(shares[1][2:], [[0.5, 1.0, 1.0, 0.5]] * 2)
    assert shares[1][:2].sum() == 0 and shares[2].sum() == 0


class _Cache:
    """A feature cache stand-in: one map per path."""

    def __init__(self, maps):
        self.maps = maps

    def locate(self, path):
        return path if path in self.maps else None

    def load(self, location):
        return self.maps[location].clone()


def test_masked_dataset_flips_map_and_shares_together():
    left = torch.zeros(2, 3, 4)
    left[:, :, 0] = 1.0  # the map lights up on its left column
    shares = torch.zeros(1, 3, 4)
    shares[0, :, 0] = 1.0  # and the mask is there too
    ds = MaskedMapDataset([("a", 0), ("b", 1)], _Cache({"a": left, "b": left}), {0: shares}, 1,
                          MapAugment(hflip=1.0, rot180=0.0))
    t, label, s, has = ds[0]
    assert label == 0 and has and t.shape == (2, 3, 4) and s.shape == (1, 3, 4)
    assert torch.equal(t[0, :, -1], torch.ones(3)) and torch.equal(s[0, :, -1], torch.ones(3))
    assert s[0, :, :-1].sum() == 0
    t, label, s, has = ds[1]  # no mask: zeros, has False
    assert label == 1 and not has and s.sum() == 0


def test_masked_dataset_draws_one_augmentation_for_map_and_shares():
    """Flip, 180 degree turn and crop: one random draw for map and shares together."""
    pattern = torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(0))
    ds = MaskedMapDataset([("a", 0)], _Cache({"a": torch.cat([pattern, 2 * pattern])}), {0: pattern.clone()}, 1,
                          MapAugment(hflip=0.5, rot180=0.5, crop=1.0, crop_min=0.3))
    changed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        t, _, s, has = ds[0]
        assert has and torch.allclose(t[0], s[0]) and torch.allclose(t[1], 2 * s[0])
        changed += not torch.allclose(s[0], pattern[0])
    assert changed >= 15  # the crop (probability 1) moves nearly every draw
