"""PKSampler: P distinct identities x K images, repeats, exclusions, determinism, DDP, extras."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from fashionlens.data.sampler import PKSampler


def make_labels():
    """Identities 'id00'..'id19' with 1..6 images (ids 0, 7, 14 single), interleaved."""
    sizes = {f"id{c:02d}": (1 if c % 7 == 0 else 2 + c % 5) for c in range(20)}
    labels = []
    for round_ in range(6):
        labels += [c for c, n in sizes.items() if n > round_]
    return labels, sizes


def test_batches_are_p_by_k():
    labels, sizes = make_labels()
    sampler = PKSampler(labels, p=4, k=5, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 17 // 4
    seen = set()
    for batch in batches:
        assert len(batch) == 20
        ids = [labels[i] for i in batch]
        groups = [ids[j * 5:(j + 1) * 5] for j in range(4)]
        assert all(len(set(g)) == 1 for g in groups)  # each block = its drawn identity
        drawn = [g[0] for g in groups]
        assert len(set(drawn)) == 4
        assert not seen & set(drawn)  # one pass: no identity twice per epoch
        seen |= set(drawn)
        for j, ident in enumerate(drawn):
            block = batch[j * 5:(j + 1) * 5]
            if sizes[ident] >= 5:
                assert len(set(block)) == 5
            else:  # fewer than K: every image present, the rest repeats
                assert set(block) == {i for i, c in enumerate(labels) if c == ident}


def test_single_image_identities_excluded():
    labels, sizes = make_labels()
    sampler = PKSampler(labels, p=3, k=2)
    assert sampler.excluded == 3
    assert set(sampler.excluded_ids) == {"id00", "id07", "id14"}
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in sampler:
            assert not {labels[i] for i in batch} & set(sampler.excluded_ids)
    with pytest.raises(ValueError):
        PKSampler(["a", "b", "b", "c"], p=2, k=2)  # one eligible identity < p
    as_tensor = PKSampler(torch.tensor([0, 0, 1, 1, 2]), p=2, k=2)
    assert as_tensor.identities == [0, 1] and as_tensor.excluded == 1


def test_deterministic_per_seed_and_epoch():
    labels, _ = make_labels()
    a = PKSampler(labels, p=4, k=3, seed=5)
    b = PKSampler(labels, p=4, k=3, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    assert list(a) == list(a)  # re-iterating the same epoch repeats it
    b.set_epoch(3)
    assert list(a) != list(b)
    c = PKSampler(labels, p=4, k=3, seed=6)
    c.set_epoch(2)
    assert list(a) != list(c)


def test_more_batches_than_one_pass():
    labels, _ = make_labels()
    sampler = PKSampler(labels, p=4, k=2, batches_per_epoch=10)
    batches = list(sampler)
    assert len(batches) == 10
    for batch in batches:
        assert len({labels[i] for i in batch}) == 4


def test_ranks_disjoint():
    labels = [c for c in range(40) for _ in range(3)]
    per_rank = [list(PKSampler(labels, p=4, k=2, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert all(len(b) == 40 // 4 // 3 for b in per_rank)
    ids = [{labels[i] for batch in b for i in batch} for b in per_rank]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    flat = [tuple(batch) for b in per_rank for batch in b]
    assert len(set(flat)) == len(flat)
    # Same global stream as a single process: rank r gets batches r, r + 3, ...
    single = list(PKSampler(labels, p=4, k=2, seed=0, batches_per_epoch=9))
    assert per_rank[1] == single[1::3]
    with pytest.raises(ValueError):
        PKSampler(labels, rank=3, world_size=3)


def test_extra_negatives_appended_and_flagged():
    labels = [c for c in range(6) for _ in range(4)] + [99] * 30  # 99: the unlabeled target pool
    pool = [i for i, c in enumerate(labels) if c == 99]
    extras = {0: pool[:3], 2: pool[3:20]}  # identity 2 has more than k mined negatives
    sampler = PKSampler(labels, p=6, k=4, extra_negatives={**extras, 99: []})
    sampler_ids = set(sampler.identities)
    assert 99 in sampler_ids  # the pool is an identity here; an empty extra list is ignored
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for batch in sampler:
            regular, tail = batch[:24], batch[24:]
            drawn = {labels[i] for i in regular}
            expected = (3 if 0 in drawn else 0) + (4 if 2 in drawn else 0)
            assert len(tail) == expected
            if 0 in drawn:
                assert set(pool[:3]) <= set(tail)
            if 2 in drawn:
                from_2 = [i for i in tail if i in pool[3:20]]
                assert len(from_2) == len(set(from_2)) == 4
            mask = sampler.anchor_mask(len(batch))
            assert mask.dtype == torch.bool and mask.sum() == 24 and not mask[24:].any()
            assert sampler.is_extra_position(24) and not sampler.is_extra_position(23)
    with pytest.raises(ValueError):
        PKSampler(labels, p=2, k=2, extra_negatives={"nope": [0]})
    with pytest.raises(ValueError):
        PKSampler(labels, p=2, k=2, extra_negatives={0: [len(labels)]})


class _Indices(Dataset):
    def __len__(self):
        return 60

    def __getitem__(self, i):
        return i


def test_works_as_dataloader_batch_sampler():
    labels = [c for c in range(10) for _ in range(6)]
    sampler = PKSampler(labels, p=2, k=3, seed=4, extra_negatives={1: [0, 1]})
    got = [b.tolist() for b in DataLoader(_Indices(), batch_sampler=sampler)]
    assert got == list(sampler)
    assert Counter(len(b) for b in got)[6] >= 1
