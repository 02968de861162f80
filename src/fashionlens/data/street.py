"""Reader for the Clothing Co-Parsing street-photo set (tags per photo, pixel masks for some).

Layout of a dataset folder ``root``::

    root/labels.txt       # one label a line; index = line number from 0; line 0 is "null"
    root/tags.csv         # header "photo,annotation,tags..."; then photo,kind,tag,tag,...
    root/photos/NNNN.jpg  # photo paths in tags.csv are relative to root
    root/masks/NNNN.png   # for "pixel" photos: single-channel, each value an index into labels

``kind`` is ``pixel`` (a mask exists) or ``image`` (tags only). The tag list of a row is
exhaustive: a tag that is not listed is absent from the photo, so every photo is labeled for
every tag. :func:`street_labels` turns the tags into two-valued (``no``/``yes``)
:class:`~fashionlens.data.fashionai.AttributeLabel` rows for the attribute-training code.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fashionlens.data.fashionai import AttributeLabel
from fashionlens.errors import UserError

KINDS = ("pixel", "image")
"""Annotation kinds of a ``tags.csv`` row."""


def read_labels(root: Path) -> list[str]:
    """Lines of ``root/labels.txt`` (stripped; trailing blank lines dropped); index 0 is "null"."""
    path = Path(root) / "labels.txt"
    if not path.is_file():
        raise UserError(f"{path}: label list not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines or lines[0] != "null":
        raise UserError(f"{path}:1: first label must be 'null' (background)")
    seen: dict[str, int] = {}
    for number, name in enumerate(lines, 1):
        if not name:
            raise UserError(f"{path}:{number}: empty label")
        if name in seen:
            raise UserError(f"{path}:{number}: label {name!r} repeats line {seen[name]}")
        seen[name] = number
    return lines


@dataclass(frozen=True)
class StreetPhoto:
    """One row of ``tags.csv``: the photo, its kind, its tags (file order) and its mask."""

    image: Path
    kind: str
    tags: tuple[str, ...]
    mask: Path | None


def read_street(root: Path) -> list[StreetPhoto]:
    """Read and validate ``root/tags.csv``, in file order.

    Fields are stripped and the kind is case-insensitive; blank lines and empty tag fields
    are skipped. An unknown kind or tag (not in ``labels.txt``), a tag listed twice, a photo
    listed twice, a missing photo file, or a ``pixel`` row without ``masks/<stem>.png``
    raises :class:`UserError` naming ``file:line``.
    """
    root = Path(root)
    known = set(read_labels(root))
    path = root / "tags.csv"
    if not path.is_file():
        raise UserError(f"{path}: tag file not found")
    photos: list[StreetPhoto] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        for fields in reader:
            fields = [field.strip() for field in fields]
            where = f"{path}:{reader.line_num}"
            if not any(fields):
                continue
            if reader.line_num == 1 and fields[0].lower() == "photo":
                continue  # header
            if len(fields) < 2 or not fields[0]:
                raise UserError(f"{where}: expected photo,annotation,tags...")
            name, kind = fields[0], fields[1].lower()
            if kind not in KINDS:
                raise UserError(f"{where}: unknown annotation kind {fields[1]!r}; "
                                f"expected one of {KINDS}")
            tags = [tag for tag in fields[2:] if tag]
            for i, tag in enumerate(tags):
                if tag not in known:
                    raise UserError(f"{where}: unknown tag {tag!r} (not in labels.txt)")
                if tag in tags[:i]:
                    raise UserError(f"{where}: tag {tag!r} listed twice")
            if name in seen:
                raise UserError(f"{where}: {name} listed again (first at line {seen[name]})")
            seen[name] = reader.line_num
            image = root / name
            if not image.is_file():
                raise UserError(f"{where}: photo {image} not found")
            mask = None
            if kind == "pixel":
                mask = root / "masks" / f"{Path(name).stem}.png"
                if not mask.is_file():
                    raise UserError(f"{where}: pixel row without mask {mask}")
            photos.append(StreetPhoto(image, kind, tuple(tags), mask))
    return photos


def tag_schema(photos: list[StreetPhoto], tags: list[str] | None = None, min_photos: int = 1,
               exclude: tuple[str, ...] = ("null",), labels: list[str] | None = None,
               ) -> dict[str, list[str]]:
    """``{tag: ["no", "yes"]}`` for each tag; key order fixes the attribute order.

    With ``tags=None``: every tag (not in ``exclude``) present in at least ``min_photos``
    photos, in ``labels`` order (labels.txt order) or, without ``labels``, alphabetical order
    (which is labels.txt order for this set). Given ``tags`` are kept as given (no count
    filter); a tag in ``exclude``, repeated, or (with ``labels``) unknown raises ``ValueError``.
    """
    if tags is None:
        counts: dict[str, int] = {}
        for photo in photos:
            for tag in photo.tags:
                counts[tag] = counts.get(tag, 0) + 1
        order = labels if labels is not None else sorted(counts)
        tags = [t for t in order if t not in exclude and counts.get(t, 0) >= min_photos]
    else:
        for i, tag in enumerate(tags):
            if tag in exclude or tag in tags[:i]:
                raise ValueError(f"tag {tag!r} is excluded or repeated")
            if labels is not None and tag not in labels:
                raise ValueError(f"unknown tag {tag!r}")
    return {tag: ["no", "yes"] for tag in tags}


def street_labels(photos: list[StreetPhoto], schema: dict[str, list[str]]) -> list[AttributeLabel]:
    """One row per photo and schema tag (photo-major): codes ``"ny"`` when the photo has the
    tag, ``"yn"`` otherwise. Every schema entry must be ``["no", "yes"]`` (ValueError)."""
    for tag, values in schema.items():
        if list(values) != ["no", "yes"]:
            raise ValueError(f"schema entry {tag!r} must be ['no', 'yes'], got {values!r}")
    return [AttributeLabel(photo.image, tag, "ny" if tag in photo.tags else "yn")
            for photo in photos for tag in schema]


def read_mask(path: Path, labels: list[str], photo_size: tuple[int, int] | None = None) -> np.ndarray:
    """``(H, W)`` int64 label indices from a single-channel (L, P, I) mask PNG.

    A multi-channel image, a value outside ``[0, len(labels))``, or (with ``photo_size``, the
    (width, height) of the mask's photo) a mask of another size raises :class:`UserError`.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            mode = image.mode
            array = np.asarray(image)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read mask ({error})") from None
    if array.ndim != 2:
        raise UserError(f"{path}: mask must be single-channel, got mode {mode}")
    if photo_size is not None and array.shape != (photo_size[1], photo_size[0]):
        raise UserError(f"{path}: mask of {array.shape[1]} x {array.shape[0]} px for a photo of "
                        f"{photo_size[0]} x {photo_size[1]} px")
    array = array.astype(np.int64)
    bad = (array < 0) | (array >= len(labels))
    if bad.any():
        raise UserError(f"{path}: {int(bad.sum())} pixels hold values outside 0..{len(labels) - 1}"
                        f" (e.g. {int(array[bad][0])})")
    return array


def tag_mask(mask: np.ndarray, labels: list[str], tag: str) -> np.ndarray:
    """Bool ``(H, W)``: the pixels of ``mask`` labeled ``tag`` (ValueError for an unknown tag)."""
    if tag not in labels:
        raise ValueError(f"unknown tag {tag!r}")
    return np.asarray(mask) == labels.index(tag)


def yes_columns(head, tags: list[str] | None = None) -> list[int]:
    """The logit column of each tag's ``yes`` value, for ``tags`` (default: every tag, in schema
    order) of anything with a tag ``schema`` and its column ``slices`` (an attribute set, an
    attribute head, an explainer)."""
    chosen = head.schema if tags is None else tags
    return [head.slices[tag].start + list(head.schema[tag]).index("yes") for tag in chosen]


# The CCP tags of each garment region of the crop stage (fashionlens.data.crops.regions): the
# masks' pixels that a region's box should cover.
GARMENT_TAGS = {
    "upper": ("blazer", "blouse", "bodysuit", "cape", "cardigan", "coat", "hoodie", "jacket", "jumper", "shirt",
              "suit", "sweater", "sweatshirt", "t-shirt", "top", "vest"),
    "lower": ("jeans", "leggings", "pants", "shorts", "skirt"),
    "dress": ("dress", "romper"),
    "shoes": ("boots", "clogs", "flats", "heels", "loafers", "pumps", "sandals", "shoes", "sneakers", "wedges"),
}


def garment_mask(mask: np.ndarray, labels: list[str], region: str) -> np.ndarray:
    """Bool ``(H, W)``: the pixels of ``mask`` labeled with any tag of ``region`` (GARMENT_TAGS)."""
    wanted = [labels.index(t) for t in GARMENT_TAGS[region] if t in labels]
    return np.isin(np.asarray(mask), wanted)
