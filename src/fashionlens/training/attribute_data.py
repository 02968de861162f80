"""Labeled attribute sets for the attribute classifier (docs/METHODS.md, attributes): reading, and a stable split.

Two formats give the same :class:`AttributeSet`:

* ``fashionai``: ``root/Annotations/label.csv`` rows ``image, attribute, y/n/m string`` and
  the value names of ``root/attributes.json`` (or the eight official FashionAI attributes);
  :func:`fashionlens.data.fashionai.read_fashionai`.
* ``street``: Clothing Co-Parsing style tags (``root/tags.csv``, ``root/labels.txt``), every tag
  a two-valued attribute ``no`` / ``yes`` (:mod:`fashionlens.data.street`).

The split is by image and stable: an image's part follows from a hash of ``seed`` and its path
relative to the root, so it does not change when images are added, nor with where the data
lives. ``test`` comes first (``u < test_fraction``), then ``val``; the rest trains.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashionlens.data.fashionai import attribute_slices, attribute_table, load_schema, read_fashionai
from fashionlens.errors import UserError

PARTS = ("train", "val", "test")


@dataclass
class AttributeSet:
    """``images`` with dense ``targets`` (N, total values; NaN = maybe) and ``mask`` (N, attributes)."""

    root: Path
    schema: dict[str, list[str]]
    images: list[Path]
    targets: np.ndarray
    mask: np.ndarray
    masks: list[Path | None] | None = None  # street: each image's pixel mask (labels.txt indices), if any

    @property
    def slices(self) -> dict[str, slice]:
        return attribute_slices(self.schema)

    def subset(self, rows: np.ndarray) -> AttributeSet:
        return AttributeSet(self.root, self.schema, [self.images[i] for i in rows], self.targets[rows], self.mask[rows],
                            None if self.masks is None else [self.masks[i] for i in rows])


def read_attribute_set(root: str | Path, fmt: str = "fashionai", labels: str | Path | None = None,
                       schema: str | Path | None = None, attributes: list[str] | None = None,
                       min_tag_photos: int = 1) -> AttributeSet:
    """The labeled images of ``root`` (see the module docstring), restricted to ``attributes``
    (schema order kept) when given; images labeled for none of them are left out."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: attribute data folder not found")
    if fmt == "fashionai":
        full = load_schema(Path(schema)) if schema else None
        rows = read_fashionai(root, Path(labels) if labels else None, full)
        if full is None:
            schema_file = root / "attributes.json"
            full = load_schema(schema_file if schema_file.is_file() else None)
    elif fmt == "street":
        from fashionlens.data.street import read_street, street_labels, tag_schema

        photos = read_street(root)
        full = tag_schema(photos, min_photos=min_tag_photos)
        rows = street_labels(photos, full)
        mask_of = {photo.image: photo.mask for photo in photos}
    else:
        raise UserError(f"unknown attribute data format {fmt!r}: use fashionai or street")
    if attributes:
        unknown = [a for a in attributes if a not in full]
        if unknown:
            raise UserError(f"attributes {unknown} are not in the data's schema ({', '.join(full)})")
        full = {name: values for name, values in full.items() if name in attributes}
        rows = [row for row in rows if row.attribute in full]
    if not rows:
        raise UserError(f"{root}: no labeled image")
    images, targets, mask = attribute_table(rows, full)
    masks = [mask_of.get(image) for image in images] if fmt == "street" else None
    return AttributeSet(root, full, images, targets, mask, masks)


def split_part(path: Path, root: Path, seed: int, val_fraction: float, test_fraction: float) -> str:
    """``train``, ``val`` or ``test`` for one image (see the module docstring)."""
    try:
        name = Path(path).relative_to(root).as_posix()
    except ValueError:
        name = Path(path).as_posix()
    digest = hashlib.sha1(f"{seed}:{name}".encode()).hexdigest()
    u = int(digest[:13], 16) / 16 ** 13
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def split_rows(data: AttributeSet, seed: int, val_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """Row indices of each part of ``data``."""
    if val_fraction + test_fraction >= 1:
        raise UserError("val_fraction + test_fraction must be below 1")
    parts = np.array([split_part(p, data.root, seed, val_fraction, test_fraction) for p in data.images])
    return {part: np.flatnonzero(parts == part) for part in PARTS}
