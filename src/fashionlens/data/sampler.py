"""P x K batch sampler for batch-all triplet training (docs/METHODS.md, retrieval 5: P = 7 identities x K = 10 images).

Use as a DataLoader ``batch_sampler``::

    sampler = PKSampler(labels, p=7, k=10, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)          # as with DistributedSampler: else every epoch repeats
        for images, labels in loader:
            anchor_mask = sampler.anchor_mask(len(labels))
            ...

Choices
* Identities with a single image are excluded (they give no positive pair); their number is
  ``excluded`` (their ids ``excluded_ids``). Identity order is the order of first appearance
  in ``labels``, so the sampler does not depend on sorting mixed ids.
* An identity with fewer than K images contributes every image once, then draws the rest
  *with replacement* among its images (so K items always; repeats only where needed).
  An identity with K or more images gives K distinct images.
* An epoch is a shuffled pass over the eligible identities cut into groups of P (the
  remainder dropped): the P identities of a batch are always distinct. More batches than one
  pass gives (``batches_per_epoch``) start further shuffled passes.
* ``identity_weights`` (identity -> weight >= 0): instead of shuffled passes, every batch
  draws its P distinct identities with probability proportional to the weight (e.g. to give
  mined target identities a fixed share of each batch beside the source ones).
* Randomness comes from ``numpy.random.default_rng((seed, epoch))``: the same (seed, epoch)
  gives the same batches, on any machine.
* DDP: all ranks build the same global list of ``len(self) * world_size`` batches and rank r
  takes batches r, r + world_size, ...; the ranks' batches are disjoint (within one pass
  over the identities, their identities too).

Mined negatives ("M+N", docs/METHODS.md, retrieval 8)
``extra_negatives`` maps an identity to dataset indices of its mined negatives (ranks i..j of
its query). When that identity is drawn, up to ``k`` of them (all if fewer, else ``k``
distinct ones at random) are appended to the batch. Layout of every yielded batch (a plain
``list[int]``, so it works through a DataLoader with workers): the first ``p * k`` positions
are the P identities' images, identity by identity (K each); the positions after them are
extras. ``anchor_mask(len(batch))`` / ``is_extra_position(i)`` give this; give the extras a
label distinct from every identity (e.g. -1) before the triplet loss. The same dataset index
may be a regular image of one identity and an extra of another, so the flag is a property
of the position in the batch, not of the dataset index. Integer labels below 0 are never
drawn as identities: a dataset keeps its pool of mined negatives under label -1, reachable
only as extras. With ``photo_keys`` (one key per dataset index, e.g. the photo's path), an
extra whose photo is already in the batch is left out.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class PKSampler(Sampler[list[int]]):
    def __init__(
        self,
        labels: Sequence[Hashable],
        p: int = 7,
        k: int = 10,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        extra_negatives: Mapping[Hashable, Sequence[int]] | None = None,
        rank: int = 0,
        world_size: int = 1,
        identity_weights: Mapping[Hashable, float] | None = None,
        photo_keys: Sequence[Hashable] | None = None,
    ):
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be >= 1, got p={p}, k={k}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.p, self.k, self.seed = int(p), int(k), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0

        if hasattr(labels, "tolist"):  # tensor / ndarray: compare values, not 0-d objects
            labels = labels.tolist()
        groups: dict[Hashable, list[int]] = {}
        for i, label in enumerate(labels):
            if isinstance(label, (int, np.integer)) and label < 0:
                continue  # pool of mined negatives: reachable only through extra_negatives
            groups.setdefault(label, []).append(i)
        self.identities: list[Hashable] = [c for c, idx in groups.items() if len(idx) >= 2]
        self.excluded_ids: list[Hashable] = [c for c, idx in groups.items() if len(idx) < 2]
        self.excluded: int = len(self.excluded_ids)
        self._members = [np.asarray(groups[c], dtype=np.int64) for c in self.identities]
        if len(self.identities) < self.p:
            raise ValueError(
                f"{len(self.identities)} identities with >= 2 images ({self.excluded} single-image "
                f"ones excluded): fewer than p={self.p}"
            )

        n_data = len(labels)
        if photo_keys is not None and len(photo_keys) != n_data:
            raise ValueError(f"photo_keys has {len(photo_keys)} entries for {n_data} labels")
        self._photo = list(photo_keys) if photo_keys is not None else None
        self._extras: dict[int, np.ndarray] = {}
        position = {c: j for j, c in enumerate(self.identities)}
        for ident, indices in (extra_negatives or {}).items():
            if ident not in groups:
                raise ValueError(f"extra_negatives: unknown identity {ident!r}")
            arr = np.asarray(list(indices), dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= n_data):
                raise ValueError(f"extra_negatives[{ident!r}]: indices outside 0..{n_data - 1}")
            if ident in position and arr.size:
                self._extras[position[ident]] = arr

        self._weights: np.ndarray | None = None
        if identity_weights is not None:
            w = np.asarray([float(identity_weights.get(c, 0.0)) for c in self.identities])
            if not np.all(np.isfinite(w)) or (w < 0).any() or (w > 0).sum() < self.p:
                raise ValueError(f"identity_weights: need finite weights >= 0, at least p={self.p} of them > 0")
            self._weights = w / w.sum()

        per_pass = len(self.identities) // self.p
        if batches_per_epoch is None:
            batches_per_epoch = max(1, per_pass // self.world_size)
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.batches_per_epoch = int(batches_per_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (call before iterating, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        n_ids = len(self.identities)
        per_pass = n_ids // self.p
        needed = self.batches_per_epoch * self.world_size
        made = 0
        while made < needed:
            if self._weights is not None:  # weighted: P distinct identities per batch, drawn by weight
                batch = self._batch(rng.choice(n_ids, self.p, replace=False, p=self._weights), rng)
                if made % self.world_size == self.rank:
                    yield batch
                made += 1
                continue
            order = rng.permutation(n_ids)
            for b in range(min(per_pass, needed - made)):
                chosen = order[b * self.p:(b + 1) * self.p]
                # Draw for every global batch (all ranks draw the same stream), keep our own.
                batch = self._batch(chosen, rng)
                if made % self.world_size == self.rank:
                    yield batch
                made += 1

    def _batch(self, chosen: np.ndarray, rng: np.random.Generator) -> list[int]:
        regular: list[int] = []
        extra: list[int] = []
        for j in chosen:
            members = self._members[j]
            if len(members) >= self.k:
                picked = rng.choice(members, self.k, replace=False)
            else:
                fill = rng.choice(members, self.k - len(members), replace=True)
                picked = np.concatenate([rng.permutation(members), fill])
            regular.extend(picked.tolist())
            negatives = self._extras.get(int(j))
            if negatives is not None:
                if len(negatives) > self.k:
                    negatives = rng.choice(negatives, self.k, replace=False)
                extra.extend(negatives.tolist())
        if self._photo is not None and extra:
            # a photo already in the batch (a member of a drawn identity, or another identity's
            # extra) is not added again: it would be a negative of its own identity's anchors
            seen = {self._photo[i] for i in regular}
            kept = []
            for i in extra:
                if self._photo[i] not in seen:
                    seen.add(self._photo[i])
                    kept.append(i)
            extra = kept
        return regular + extra

    # Layout helpers -------------------------------------------------------------------

    @property
    def regular_size(self) -> int:
        """Number of regular (P x K) positions at the start of every batch."""
        return self.p * self.k

    def is_extra_position(self, position: int) -> bool:
        """True if position ``position`` of a yielded batch holds a mined negative ("M+N")."""
        return position >= self.regular_size

    def anchor_mask(self, batch_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``(batch_len,)``: True for the P x K regular positions (may be anchor/positive),
        False for the appended mined negatives. Pass it to ``BatchAllTripletLoss``."""
        return torch.arange(batch_len, device=device) < self.regular_size

    def mark_extras(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels with every extra position set to -1, anchor mask) for a yielded batch's labels:
        what ``BatchAllTripletLoss(embeddings, labels, anchor_mask=mask)`` needs so that the
        mined negatives ("M+N") are negatives of every anchor and never anchor or positive."""
        anchors = self.anchor_mask(len(labels), device=labels.device)
        return labels.masked_fill(~anchors, -1), anchors

    def __repr__(self) -> str:
        return (
            f"PKSampler(p={self.p}, k={self.k}, identities={len(self.identities)}, excluded={self.excluded}, "
            f"batches_per_epoch={self.batches_per_epoch}, rank={self.rank}/{self.world_size})"
        )
