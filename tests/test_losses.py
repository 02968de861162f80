"""Losses against brute force: batch-all triplet, identity, attribute, weighted sum."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fashionlens.losses import (
    AttributeLoss,
    BatchAllTripletLoss,
    CosineDistance,
    EuclideanDistance,
    IdentityLoss,
    MeanAllValid,
    MeanNonZero,
    WeightedSum,
)


def _dist(kind, x, y):
    if kind == "euclidean":
        return float(torch.linalg.norm(x - y))
    return 1.0 - float(F.cosine_similarity(x, y, dim=0))


def brute_force(emb, labels, margin, kind, reducer, anchor_mask=None):
    """Explicit loops over every (a, p, n)."""
    n = len(labels)
    allowed = [True] * n if anchor_mask is None else [bool(m) for m in anchor_mask]
    losses = []
    for a in range(n):
        for p in range(n):
            for q in range(n):
                if a == p or labels[a] != labels[p] or labels[q] == labels[a]:
                    continue
                if not (allowed[a] and allowed[p]):
                    continue
                losses.append(max(_dist(kind, emb[a], emb[p]) - _dist(kind, emb[a], emb[q]) + margin, 0.0))
    if reducer == "all":
        value = sum(losses) / len(losses) if losses else 0.0
    else:
        pos = [v for v in losses if v > 0]
        value = sum(pos) / len(pos) if pos else 0.0
    return value, len(losses), sum(v > 0 for v in losses)


DISTANCES = {"euclidean": EuclideanDistance, "cosine": CosineDistance}
REDUCERS = {"all": MeanAllValid, "nonzero": MeanNonZero}


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize("reducer", ["all", "nonzero"])
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_batch_all_matches_brute_force(kind, reducer, margin):
    g = torch.Generator().manual_seed(len(kind) * 10 + len(reducer) + int(margin * 10))
    emb = torch.randn(12, 5, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, 4, (12,), generator=g)
    loss_fn = BatchAllTripletLoss(margin, distance=DISTANCES[kind](), reducer=REDUCERS[reducer]())
    got = loss_fn(emb, labels)
    want, n_valid, n_pos = brute_force(emb, labels.tolist(), margin, kind, reducer)
    assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert loss_fn.last_stats["valid_triplets"] == n_valid
    assert loss_fn.last_stats["positive_triplets"] == n_pos
    assert loss_fn.last_stats["positive_fraction"] == pytest.approx(n_pos / n_valid)


def test_thesis_defaults_float32_close_to_brute_force():
    loss_fn = BatchAllTripletLoss()
    assert loss_fn.margin == 0.2
    assert isinstance(loss_fn.distance, EuclideanDistance) and isinstance(loss_fn.reducer, MeanAllValid)
    emb = F.normalize(torch.randn(16, 32, generator=torch.Generator().manual_seed(3)), dim=1)
    labels = torch.arange(16) // 4
    want, _, _ = brute_force(emb.double(), labels.tolist(), 0.2, "euclidean", "all")
    assert float(loss_fn(emb, labels)) == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("reducer", ["all", "nonzero"])
def test_anchor_mask_negatives_only(reducer):
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(14, 4, generator=g, dtype=torch.float64)
    # Two identities x 4, one x 3, then an "M+N" group of 3 mined negatives (label -1).
    labels = [0] * 4 + [1] * 4 + [2] * 3 + [-1] * 3
    mask = torch.tensor([True] * 11 + [False] * 3)
    loss_fn = BatchAllTripletLoss(0.5, reducer=REDUCERS[reducer]())
    got = loss_fn(emb, torch.tensor(labels), anchor_mask=mask)
    want, n_valid, _ = brute_force(emb, labels, 0.5, "euclidean", reducer, anchor_mask=mask.tolist())
    assert float(got) == pytest.approx(want, rel=1e-9)
    assert loss_fn.last_stats["valid_triplets"] == n_valid
    # Without the mask the M+N group would add (a, p) pairs of its own.
    _, n_unmasked, _ = brute_force(emb, labels, 0.5, "euclidean", reducer)
    assert n_unmasked > n_valid
    # Masking a real identity also removes it as anchor/positive, not as negative.
    mask2 = mask.clone()
    mask2[:4] = False
    got2 = loss_fn(emb, torch.tensor(labels), anchor_mask=mask2)
    want2, _, _ = brute_force(emb, labels, 0.5, "euclidean", reducer, anchor_mask=mask2.tolist())
    assert float(got2) == pytest.approx(want2, rel=1e-9)


@pytest.mark.parametrize("reducer", [MeanAllValid, MeanNonZero])
@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [5, 5, 5, 5]])
def test_no_valid_triplet_is_zero_with_gradient(reducer, labels):
    emb = torch.randn(4, 3, requires_grad=True)
    loss_fn = BatchAllTripletLoss(reducer=reducer())
    loss = loss_fn(emb, torch.tensor(labels))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert emb.grad is not None and torch.equal(emb.grad, torch.zeros_like(emb))
    assert loss_fn.last_stats == {"valid_triplets": 0, "positive_triplets": 0, "positive_fraction": 0.0}
    # Every sample negative-only: no anchor at all.
    loss = loss_fn(emb, torch.tensor([0, 0, 1, 1]), anchor_mask=torch.zeros(4, dtype=torch.bool))
    assert float(loss.detach()) == 0.0


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
def test_identical_embeddings_no_nan(kind):
    emb = torch.ones(8, 6, requires_grad=True)
    loss_fn = BatchAllTripletLoss(0.2, distance=DISTANCES[kind]())
    loss = loss_fn(emb, torch.arange(8) // 2)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.2, abs=1e-5)  # d(a,p) = d(a,n), every triplet = margin
    assert torch.isfinite(emb.grad).all()
    assert loss_fn.last_stats["positive_fraction"] == 1.0


def test_euclidean_distance_clamped_at_zero():
    a = torch.zeros(3, 4, requires_grad=True)
    d = EuclideanDistance()(a, a)
    d.sum().backward()
    assert torch.allclose(d, torch.full((3, 3), 1e-6))
    assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize("reducer", [MeanAllValid, MeanNonZero])
def test_gradcheck(kind, reducer):
    g = torch.Generator().manual_seed(11)
    emb = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss_fn = BatchAllTripletLoss(1.0, distance=DISTANCES[kind](), reducer=reducer())
    assert torch.autograd.gradcheck(lambda e: loss_fn(e, labels), (emb,))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_identity_loss_matches_cross_entropy(smoothing):
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(8, 5, generator=g) for _ in range(3)]
    labels = torch.randint(0, 5, (8,), generator=g)
    loss_fn = IdentityLoss(label_smoothing=smoothing)
    single = loss_fn(logits[0], labels)
    assert torch.allclose(single, F.cross_entropy(logits[0], labels, label_smoothing=smoothing))
    want = sum(F.cross_entropy(x, labels, label_smoothing=smoothing) for x in logits) / 3
    assert torch.allclose(loss_fn(logits, labels), want)


def test_identity_loss_ignore_index():
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, -100, 2, -100])
    got = IdentityLoss()(logits, labels)
    assert torch.allclose(got, F.cross_entropy(logits[[0, 2]], labels[[0, 2]]))
    none = IdentityLoss()(logits, torch.full((4,), -100))
    none.backward()
    assert float(none.detach()) == 0.0 and torch.isfinite(logits.grad).all()


SLICES = [slice(0, 3), slice(3, 7), slice(7, 9)]


def _attr_data(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 9, generator=g, dtype=torch.float64)
    targets = torch.zeros(n, 9, dtype=torch.float64)
    mask = torch.zeros(n, 3, dtype=torch.bool)
    for i in range(n):
        for a, sl in enumerate(SLICES):
            if (i + a) % 2 == 0:  # labeled: exactly one y
                mask[i, a] = True
                width = sl.stop - sl.start
                targets[i, sl.start + (i * 7 + a) % width] = 1.0
            else:
                targets[i, sl] = torch.randn(sl.stop - sl.start, generator=g, dtype=torch.float64) * 5
    return logits, targets, mask


def _brute_attr(logits, targets, mask, mode):
    total, count = 0.0, 0
    for i in range(logits.shape[0]):
        for a, sl in enumerate(SLICES):
            if not mask[i, a]:
                continue
            x, t = logits[i, sl], targets[i, sl]
            if mode == "sigmoid":
                vals = [-(y * math.log(1 / (1 + math.exp(-v))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-v))))
                        for v, y in zip(x.tolist(), t.tolist())]
                total += sum(vals) / len(vals)
            else:
                c = int(t.argmax())
                total += -float(torch.log_softmax(x, 0)[c])
            count += 1
    return total / count


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_attribute_loss_brute_force_and_masking(mode):
    logits, targets, mask = _attr_data()
    loss_fn = AttributeLoss(mode)
    got = loss_fn(logits, targets, mask, SLICES)
    assert float(got) == pytest.approx(_brute_attr(logits, targets, mask, mode), rel=1e-9)
    # Garbage (also NaN) in the unlabeled attributes changes nothing, gradients stay finite.
    garbage = targets.clone()
    garbage[~mask.repeat_interleave(torch.tensor([3, 4, 2]), dim=1)] = float("nan")
    x = logits.clone().requires_grad_(True)
    got2 = AttributeLoss(mode, slices=SLICES)(x, garbage, mask)
    got2.backward()
    assert float(got2.detach()) == pytest.approx(float(got), rel=1e-12)
    assert torch.isfinite(x.grad).all()
    # An unlabeled image adds nothing and is not counted.
    extra_logits = torch.cat([logits, torch.randn(1, 9, dtype=torch.float64)])
    extra_targets = torch.cat([targets, torch.full((1, 9), float("nan"), dtype=torch.float64)])
    extra_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)])
    assert float(loss_fn(extra_logits, extra_targets, extra_mask, SLICES)) == pytest.approx(float(got), rel=1e-12)


def test_attribute_loss_nan_value_is_masked_and_empty_is_zero():
    logits = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.zeros(2, 9, dtype=torch.float64)
    targets[:, 0] = 1.0
    mask = torch.tensor([[True, False, False], [True, False, False]])
    loss_fn = AttributeLoss("sigmoid")
    nan_t = targets.clone()
    nan_t[0, 2] = float("nan")
    want = (F.binary_cross_entropy_with_logits(logits[0, :2], targets[0, :2])
            + F.binary_cross_entropy_with_logits(logits[1, :3], targets[1, :3])) / 2
    assert torch.allclose(loss_fn(logits, nan_t, mask, SLICES), want)
    empty = loss_fn(logits, targets, torch.zeros(2, 3, dtype=torch.bool), SLICES)
    empty.backward()
    assert float(empty.detach()) == 0.0 and torch.isfinite(logits.grad).all()


def test_weighted_sum():
    combine = WeightedSum({"triplet": 1.0, "identity": 0.5, "attribute": 0.0})
    t = torch.tensor(2.0, requires_grad=True)
    i = torch.tensor(4.0, requires_grad=True)
    total, values = combine({"triplet": t, "identity": i, "attribute": torch.tensor(float("nan"))})
    assert float(total.detach()) == 4.0
    assert values == {"triplet": 2.0, "identity": 4.0, "total": 4.0}
    total.backward()
    assert float(t.grad) == 1.0 and float(i.grad) == 0.5
    total2, _ = combine({"triplet": t, "identity": i})  # zero-weight term may be absent
    assert float(total2.detach()) == 4.0
    with pytest.raises(KeyError):
        combine({"triplet": t, "identity": i, "tripelt": t})
    with pytest.raises(KeyError):
        combine({"triplet": t})
    with pytest.raises(ValueError):
        WeightedSum({"triplet": -1.0})
