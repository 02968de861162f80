"""Training data: identities from metadata columns, a seeded split by identity, a Dataset.

An identity is the values of ``identity_columns`` joined with ``"|"`` (e.g.
``"Tshirts|Blue|Men"``). Rows missing any of the columns, rows whose image is missing, and
identities with fewer than ``min_images`` images are dropped (counted in :class:`Split`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fashionlens.data.catalog import Missing, open_catalog
from fashionlens.data.images import ImageError, open_image
from fashionlens.errors import UserError


@dataclass
class Split:
    """``train`` / ``val``: lists of (image path, label index); ``*_identities``: label -> name."""

    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    train_identities: list[str]
    val_identities: list[str]
    dropped: dict[str, int] = field(default_factory=dict)


def read_identities(catalog: str | Path, columns: Sequence[str], min_images: int = 2
                    ) -> tuple[dict[str, list[Path]], dict[str, int]]:
    """identity -> its image paths (catalog order), and counts of what was dropped."""
    groups: dict[str, list[Path]] = {}
    dropped = {"missing_image": 0, "missing_columns": 0, "small_identity_images": 0}
    for item in open_catalog(Path(catalog)):
        if isinstance(item, Missing):
            dropped["missing_image"] += 1
            continue
        values = [str(item.metadata.get(c, "") or "").strip() for c in columns]
        if not all(values):
            dropped["missing_columns"] += 1
            continue
        groups.setdefault("|".join(values), []).append(Path(item.path))
    if not groups:
        raise UserError(f"{catalog}: no item has all of the identity columns {list(columns)}")
    small = [ident for ident, paths in groups.items() if len(paths) < min_images]
    for ident in small:
        dropped["small_identity_images"] += len(groups.pop(ident))
    dropped["small_identities"] = len(small)
    return groups, dropped


def split_identities(groups: dict[str, list[Path]], val_fraction: float, seed: int,
                     max_val_images: int | None = None) -> tuple[list[str], list[str]]:
    """(train identities, val identities), both sorted; the choice depends only on ``seed``
    and the set of identities. Validation identities are taken until ``max_val_images``."""
    names = sorted(groups)
    n_val = int(round(val_fraction * len(names)))
    if val_fraction > 0 and len(names) >= 4:
        n_val = max(n_val, 2)  # retrieval among val images needs at least two identities
    order = np.random.default_rng(seed).permutation(len(names))
    val: list[str] = []
    images = 0
    for j in order[:n_val]:
        if max_val_images is not None and val and images + len(groups[names[j]]) > max_val_images:
            break
        val.append(names[j])
        images += len(groups[names[j]])
    chosen = set(val)
    return [n for n in names if n not in chosen], sorted(val)


def make_split(catalog: str | Path, columns: Sequence[str], min_images: int, val_fraction: float,
               seed: int, max_val_images: int | None = None) -> Split:
    groups, dropped = read_identities(catalog, columns, min_images)
    train_ids, val_ids = split_identities(groups, val_fraction, seed, max_val_images)

    def samples(names: list[str]) -> list[tuple[Path, int]]:
        return [(path, label) for label, name in enumerate(names) for path in groups[name]]

    return Split(samples(train_ids), samples(val_ids), train_ids, val_ids, dropped)


def split_for(cfg) -> Split:
    """The split of a :class:`~fashionlens.training.config.TrainConfig`'s catalog."""
    return make_split(cfg.catalog, cfg.identity_columns, cfg.min_images_per_identity, cfg.val_fraction,
                      cfg.seed, cfg.max_val_images)


class IdentityDataset(Dataset):
    """``ds[i]`` -> (image tensor, label). An image that cannot be decoded is replaced, with a
    warning, by another image of the same identity (an error only if none of them loads)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable):
        self.samples = list(samples)
        self.labels = [label for _, label in self.samples]
        self.transform = transform
        self._members: dict[int, list[int]] = {}
        for i, label in enumerate(self.labels):
            self._members.setdefault(label, []).append(i)
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        members = self._members[label]
        start = members.index(index)
        for j in members[start:] + members[:start]:
            if j in self.bad:
                continue
            try:
                img = open_image(self.samples[j][0], draft_size=2 * getattr(self.transform, "size", 256))
            except ImageError as exc:
                self.bad.add(j)
                warnings.warn(f"skipping unreadable training image: {exc}", stacklevel=2)
                continue
            return self.transform(img), label
        raise UserError(f"no image of identity {label} can be read (first: {path})")


@dataclass
class MinedIdentities:
    """Pseudo-identities mined on unlabeled target photos (docs/METHODS.md, retrieval 8): identity ``q`` is
    ``positives[q]`` (its query and the query's ranks 1..m), and ``negatives[q]`` (ranks i..j)
    join a batch that draws it as negatives that never act as anchor or positive."""

    positives: list[list[Path]]
    negatives: list[list[Path]]
    # with a source vote: the source identity each group joins (None: left out of training)
    source: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.positives)

    def paths(self) -> list[Path]:
        return [p for group in self.positives + self.negatives for p in group]


def with_mined(source: Sequence[tuple[Path, int]], n_source: int, mined: MinedIdentities,
               source_labels: dict[str, int] | None = None) -> tuple[list[tuple[Path, int]], dict[int, list[int]]]:
    """Training samples of source + mined identities, and each mined identity's negatives.

    Mined identity ``q`` gets label ``n_source + q`` (left out when it has fewer than two photos).
    When the groups were voted onto source identities (``mined.source``), a group's photos get
    its source identity's label from ``source_labels`` instead, without negatives, and groups
    without one are left out. Every negative photo is added once more
    under label -1 (the PKSampler never draws label -1; it only joins batches as an extra of
    the identities that list it), so the returned mapping is label -> sample indices."""
    samples = list(source)
    if mined.source is not None:
        for group, name in zip(mined.positives, mined.source):
            if name is None:
                continue
            if source_labels is None or name not in source_labels:
                raise UserError(f"mined identities: {name!r} is not a source identity of this run")
            samples += [(Path(p), source_labels[name]) for p in group]
        return samples, {}
    usable = [len(group) >= 2 for group in mined.positives]  # a single photo gives no positive pair
    for q, group in enumerate(mined.positives):
        if usable[q]:
            samples += [(Path(p), n_source + q) for p in group]
    pool: dict[Path, int] = {}
    extras: dict[int, list[int]] = {}
    for q, group in enumerate(mined.negatives):
        if not usable[q]:
            continue
        indices = []
        for p in map(Path, group):
            if p not in pool:
                pool[p] = len(samples)
                samples.append((p, -1))
            indices.append(pool[p])
        if indices:
            extras[n_source + q] = indices
    return samples, extras
