"""Retrieval necks (fashionlens.models.necks): shapes, exact pooling values, invariances."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fashionlens.models.necks import (
    NECKS,
    GAPNeck,
    LocalAlignmentNeck,
    MultiNeck,
    RingNeck,
    StripeNeck,
    build_neck,
    ring_index,
)

C = 64


def _map(h: int = 7, w: int = 7, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, C, h, w, generator=torch.Generator().manual_seed(seed))


def _unit(x: torch.Tensor) -> None:
    assert torch.allclose(x.norm(dim=1), torch.ones(x.shape[0]), atol=1e-5)


@pytest.mark.parametrize("hw", [(7, 7), (8, 4)])
def test_gap_neck(hw):
    t = _map(*hw)
    emb = GAPNeck(C)(t)["embedding"]
    assert emb.shape == (2, C)
    _unit(emb)
    assert torch.allclose(emb, F.normalize(t.mean(dim=(2, 3)), dim=1))


def test_wrong_channels_raise():
    with pytest.raises(ValueError, match="feature map"):
        GAPNeck(C)(torch.randn(2, C + 1, 7, 7))


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("d", [128, 256, 512])
def test_lan_shapes(k, d):
    out = LocalAlignmentNeck(C, branches=k, dim=d)(_map())
    assert out["embedding"].shape == (2, k * d)
    assert out["branch_features"].shape == (2, k, d)
    assert out["masks"].shape == (2, k, 7, 7)
    assert out["masks"].min() >= 0 and out["masks"].max() <= 1
    _unit(out["embedding"])


def test_lan_non_square_and_init():
    neck = LocalAlignmentNeck(C, branches=4, dim=32)
    masks = neck(_map(8, 4))["masks"]
    assert masks.shape == (2, 4, 8, 4)
    # masks start near 0.5 but differ from branch to branch
    assert (masks - 0.5).abs().max() < 0.25
    assert not torch.allclose(masks[:, 0], masks[:, 1])


@pytest.mark.parametrize("spatial,channel", [(False, True), (True, False), (False, False)])
def test_lan_ablations(spatial, channel):
    neck = LocalAlignmentNeck(C, branches=2, dim=16, spatial=spatial, channel=channel)
    out = neck(_map())
    assert out["embedding"].shape == (2, 32)
    _unit(out["embedding"])
    # without spatial attention there is no mask: the key is absent
    assert ("masks" in out) == spatial
    assert (neck.se is None) == (not channel)


def test_lan_without_attention_is_gap_then_linear():
    t = _map()
    neck = LocalAlignmentNeck(C, branches=1, dim=24, spatial=False, channel=False)
    out = neck(t)
    lin = neck.reduce[0]
    expected = t.mean(dim=(2, 3)) @ lin.weight.T + lin.bias
    assert torch.allclose(out["branch_features"][:, 0], expected, atol=1e-6)
    assert torch.allclose(out["embedding"], F.normalize(expected, dim=1), atol=1e-6)


def test_lan_matches_unfused_computation():
    """The pooled/fused forward equals the literal per-branch recipe of the thesis."""
    t = _map()
    neck = LocalAlignmentNeck(C, branches=3, dim=8)
    out = neck(t)
    for i in range(3):
        m = torch.sigmoid(F.conv2d(t, neck.spatial.weight[i : i + 1], neck.spatial.bias[i : i + 1]))
        ti = t * m
        ci = neck.se[i](ti.mean(dim=(2, 3)))
        ti = ti * ci[:, :, None, None]
        ref = neck.reduce[i](ti.mean(dim=(2, 3)))
        assert torch.allclose(out["branch_features"][:, i], ref, atol=1e-5)
        assert torch.allclose(out["masks"][:, i], m[:, 0])


@pytest.mark.parametrize("hw", [(7, 7), (8, 4)])
def test_stripe_shapes(hw):
    neck = StripeNeck(C, parts=(2, 3), directions=("h", "v"), dim=16, num_classes=5)
    out = neck(_map(*hw))
    assert neck.num_stripes == 10
    assert out["stripes"].shape == (2, 10, 16)
    assert out["embedding"].shape == (2, 160)
    _unit(out["embedding"])
    assert len(out["stripe_logits"]) == 10
    assert all(lg.shape == (2, 5) for lg in out["stripe_logits"])


def test_stripe_options():
    out = StripeNeck(C, parts=(1, 2), directions=("h",), dim=8)(_map())
    assert "stripe_logits" not in out
    assert out["stripes"].shape == (2, 3, 8)
    # a part count of 1 is taken once even with two directions
    shared = StripeNeck(C, parts=(1, 2), dim=8, share_reduction=True)
    assert shared.num_stripes == 5 and len(shared.reductions) == 1
    assert shared(_map())["stripes"].shape == (2, 5, 8)


def test_stripe_pool_exact_values():
    t = torch.zeros(2, C, 8, 6)
    t[:, :, :4] = 1.0  # top half ones, bottom half zeros
    pooled = StripeNeck(C, parts=(2,), directions=("h",)).pool(t)
    assert pooled.shape == (2, 2, C)
    assert torch.equal(pooled[:, 0], torch.ones(2, C))
    assert torch.equal(pooled[:, 1], torch.zeros(2, C))
    # vertical stripes on the same map all see half ones
    pooled_v = StripeNeck(C, parts=(2,), directions=("v",)).pool(t)
    assert torch.allclose(pooled_v, torch.full((2, 2, C), 0.5))


def test_ring_index_partition():
    idx = ring_index(7, 7, 3)
    expected = torch.tensor([2, 1, 0, 0, 0, 1, 2])  # centre 3x3 block, then 5x5, border
    assert torch.equal(idx[3], expected) and torch.equal(idx[:, 3], expected)
    for h, w, r in [(7, 7, 2), (7, 7, 3), (8, 8, 3), (8, 4, 2)]:
        weights = RingNeck(C, rings=r).ring_weights(h, w)
        cover = (weights > 0).sum(dim=0)
        assert torch.equal(cover, torch.ones(h, w, dtype=cover.dtype))  # exactly one ring
        assert torch.allclose(weights.sum(dim=(1, 2)), torch.ones(r))
    with pytest.raises(ValueError, match="empty"):
        ring_index(7, 7, 7)


def test_ring_masked_mean_brute_force():
    t = _map(7, 7)
    neck = RingNeck(C, rings=3)
    rings = neck(t)["rings"]
    idx = ring_index(7, 7, 3)
    for r in range(3):
        total, count = torch.zeros(2, C), 0
        for i in range(7):
            for j in range(7):
                if idx[i, j] == r:
                    total += t[:, :, i, j]
                    count += 1
        assert torch.allclose(rings[:, r], total / count, atol=1e-6)
    assert (7, 7) in neck._weights  # cached


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("r", [2, 3])
def test_ring_rotation_invariance(size, r):
    t = _map(size, size, seed=size + r)
    neck = RingNeck(C, rings=r)
    ref = neck(t)["rings"]
    assert ref.shape == (2, r, C)
    for k in (1, 2):
        rotated = neck(torch.rot90(t, k, dims=(2, 3)))["rings"]
        assert torch.allclose(rotated, ref, atol=1e-6)


def test_ring_dim_and_non_square():
    out = RingNeck(C, rings=2, dim=16)(_map(8, 4))
    assert out["rings"].shape == (2, 2, 16)
    assert out["embedding"].shape == (2, 32)
    _unit(out["embedding"])


def test_multi_neck():
    neck = MultiNeck({"gap": GAPNeck(C), "rings": RingNeck(C, rings=2)}, weights={"rings": 0.5})
    out = neck(_map())
    assert out["embedding"].shape == (2, C + 2 * C)
    _unit(out["embedding"])
    assert out["rings.rings"].shape == (2, 2, C)
    expected = F.normalize(torch.cat([out["gap.embedding"], 0.5 * out["rings.embedding"]], 1), dim=1)
    assert torch.allclose(out["embedding"], expected, atol=1e-6)
    with pytest.raises(ValueError):
        MultiNeck({"gap": GAPNeck(C)}, weights={"nope": 1.0})


def test_build_neck():
    assert isinstance(build_neck({"type": "gap"}, C), GAPNeck)
    lan = build_neck({"type": "lan", "branches": 2, "dim": 32, "in_channels": C})
    assert isinstance(lan, LocalAlignmentNeck) and lan.out_dim == 64
    stripes = build_neck({"type": "stripes", "parts": [2], "dim": 8}, C)
    assert isinstance(stripes, StripeNeck) and stripes.out_dim == 32
    assert isinstance(build_neck({"type": "rings", "rings": 2}, C), RingNeck)
    multi = build_neck(
        {"type": "multi", "necks": {"g": {"type": "gap"}, "l": {"type": "lan", "dim": 8}},
         "weights": {"g": 2.0}},
        C,
    )
    assert isinstance(multi, MultiNeck) and multi(_map())["embedding"].shape == (2, C + 32)
    with pytest.raises(ValueError) as err:
        build_neck({"type": "bogus"}, C)
    assert all(name in str(err.value) for name in NECKS.names())
    with pytest.raises(ValueError, match="in_channels"):
        build_neck({"type": "gap"})


def test_lan_trains():
    torch.manual_seed(0)
    neck = LocalAlignmentNeck(C, branches=2, dim=8)
    t, target = _map(), F.normalize(torch.randn(2, 16), dim=1)
    opt = torch.optim.SGD(neck.parameters(), lr=0.5)

    def loss_fn():
        return (neck(t)["embedding"] - target).pow(2).sum()

    before = loss_fn()
    opt.zero_grad()
    before.backward()
    assert neck.spatial.weight.grad.abs().sum() > 0  # gradients reach the attention convs
    assert neck.se[0][0].weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert loss_fn() < before.item()
