"""Reader for FashionAI attribute annotations (Tianchi FashionAI 2018) and look-alikes.

Layout of a dataset folder ``root``::

    root/Annotations/label.csv     # no header: image,attribute,label-string
    root/Images/<...>.jpg          # image paths in the CSV are relative to root
    root/attributes.json           # optional: attribute -> list of value names

A label string has one character per value of the attribute, in schema order:
``y`` the image *is* that value, ``n`` it is not, ``m`` maybe. Exactly one ``y`` per row,
e.g. ``Images/sleeve_length_labels/x.jpg,sleeve_length_labels,nnnnnnnym``.

The official set labels each image for one attribute; other sets in this format (the shared
``data/attributes`` set) label one image for several, which :func:`attribute_table` groups.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashionlens.errors import UserError

FASHIONAI_ATTRIBUTES: dict[str, list[str]] = {
    "coat_length_labels": ["Invisible", "High Waist Length", "Regular Length", "Long Length",
                           "Micro Length", "Knee Length", "Midi Length", "Ankle&Floor Length"],
    "collar_design_labels": ["Invisible", "Shirt Collar", "Peter Pan", "Puritan Collar",
                             "Rib Collar"],
    "lapel_design_labels": ["Invisible", "Notched", "Collarless", "Shawl Collar",
                            "Plus Size Shawl"],
    "neck_design_labels": ["Invisible", "Turtle Neck", "Ruffle Semi-High Collar",
                           "Low Turtle Neck", "Draped Collar"],
    "neckline_design_labels": ["Invisible", "Strapless Neck", "Deep V Neckline", "Straight Neck",
                               "V Neckline", "Square Neckline", "Off Shoulder", "Round Neckline",
                               "Sweat Heart Neck", "One Shoulder Neckline"],
    "pant_length_labels": ["Invisible", "Short Pant", "Mid Length", "3/4 Length", "Cropped Pant",
                           "Full Length"],
    "skirt_length_labels": ["Invisible", "Short Length", "Knee Length", "Midi Length",
                            "Ankle Length", "Floor Length"],
    "sleeve_length_labels": ["Invisible", "Sleeveless", "Cup Sleeves", "Short Sleeves",
                             "Elbow Sleeves", "3/4 Sleeves", "Wrist Length", "Long Sleeves",
                             "Extra Long Sleeves"],
}
"""The eight official FashionAI attributes and their value names, in label-string order."""

MAYBE_POLICIES = ("random", "positive", "negative", "half")
"""How an ``m`` (maybe) becomes a target: a fair coin per draw, or fixed 1.0 / 0.0 / 0.5."""


def load_schema(path: Path | None = None) -> dict[str, list[str]]:
    """Read an ``attributes.json`` (attribute -> list of value names), or the built-in schema.

    With ``path=None`` returns a copy of :data:`FASHIONAI_ATTRIBUTES`. Key order is kept: it
    fixes the column layout of :func:`attribute_table`.
    """
    if path is None:
        return {name: list(values) for name, values in FASHIONAI_ATTRIBUTES.items()}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: attribute schema not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a JSON object of attribute -> list of value names")
    for name, values in data.items():
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, str) for v in values)):
            raise UserError(f"{path}: attribute {name!r} must map to a non-empty list of strings")
    return {str(name): list(values) for name, values in data.items()}


def _resolve_maybe(values: np.ndarray, maybe: np.ndarray, rng: np.random.Generator | None,
                   maybe_policy: str) -> np.ndarray:
    """Write targets for the ``maybe`` positions of ``values`` (in place) and return it."""
    if maybe_policy not in MAYBE_POLICIES:
        raise ValueError(f"unknown maybe_policy {maybe_policy!r}; expected one of {MAYBE_POLICIES}")
    count = int(maybe.sum())
    if count:
        if maybe_policy == "random":
            rng = rng if rng is not None else np.random.default_rng()
            values[maybe] = (rng.random(count) < 0.5).astype(values.dtype)
        else:
            values[maybe] = {"positive": 1.0, "negative": 0.0, "half": 0.5}[maybe_policy]
    return values


@dataclass(frozen=True)
class AttributeLabel:
    """One row of ``label.csv``: an image, one attribute, and its y/n/m code string."""

    image: Path
    attribute: str
    codes: str

    @property
    def positive_index(self) -> int:
        """Index of the single ``y`` (the value the image is)."""
        if self.codes.count("y") != 1:
            raise ValueError(f"{self.codes!r} does not have exactly one 'y'")
        return self.codes.index("y")

    @property
    def maybe_indices(self) -> list[int]:
        """Indices of the ``m`` (maybe) values, in order."""
        return [i for i, code in enumerate(self.codes) if code == "m"]

    def targets(self, rng: np.random.Generator | None = None,
                maybe_policy: str = "random") -> np.ndarray:
        """Float32 vector, one entry per value: y -> 1, n -> 0, m -> per ``maybe_policy``.

        ``"random"`` draws each ``m`` as 1 or 0 with probability 0.5 from ``rng`` (a fresh
        generator when None); ``"positive"``, ``"negative"``, ``"half"`` give 1.0, 0.0, 0.5.
        """
        codes = np.array(list(self.codes))
        values = (codes == "y").astype(np.float32)
        return _resolve_maybe(values, codes == "m", rng, maybe_policy)


def _check_codes(codes: str, values: list[str]) -> str | None:
    """Why ``codes`` is not a valid label string for ``values``, or None when it is."""
    if len(codes) != len(values):
        return f"label string {codes!r} has {len(codes)} characters, expected {len(values)}"
    if set(codes) - set("ynm"):
        return f"label string {codes!r} may only hold 'y', 'n', 'm'"
    if codes.count("y") != 1:
        return f"label string {codes!r} must hold exactly one 'y', found {codes.count('y')}"
    return None


def read_fashionai(root: Path, labels: Path | None = None,
                   schema: dict[str, list[str]] | None = None) -> list[AttributeLabel]:
    """Read and validate ``root/Annotations/label.csv`` (or ``labels``), in file order.

    ``schema`` defaults to ``root/attributes.json`` when present, else the built-in
    :data:`FASHIONAI_ATTRIBUTES`. Image paths become ``root / image``. Blank lines are skipped;
    any other bad row (column count, unknown attribute, wrong length, characters other than
    y/n/m, not exactly one y, the same image and attribute twice) raises :class:`UserError`
    naming ``file:line``.
    """
    root = Path(root)
    path = Path(labels) if labels is not None else root / "Annotations" / "label.csv"
    if schema is None:
        schema_file = root / "attributes.json"
        schema = load_schema(schema_file if schema_file.is_file() else None)
    if not path.is_file():
        raise UserError(f"{path}: FashionAI label file not found")
    rows: list[AttributeLabel] = []
    seen: dict[tuple[str, str], int] = {}
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        for fields in reader:
            where = f"{path}:{reader.line_num}"
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != 3:
                raise UserError(f"{where}: expected 3 columns (image,attribute,labels), "
                                f"got {len(fields)}")
            image, attribute, codes = (f.strip() for f in fields)
            if not image:
                raise UserError(f"{where}: empty image path")
            if attribute not in schema:
                raise UserError(f"{where}: unknown attribute {attribute!r}")
            problem = _check_codes(codes, schema[attribute])
            if problem:
                raise UserError(f"{where}: {problem} ({attribute})")
            key = (image, attribute)
            if key in seen:
                raise UserError(f"{where}: {image} labeled again for {attribute} "
                                f"(first at line {seen[key]})")
            seen[key] = reader.line_num
            rows.append(AttributeLabel(root / image, attribute, codes))
    return rows


def attribute_slices(schema: dict[str, list[str]]) -> dict[str, slice]:
    """Columns of each attribute in :func:`attribute_table` targets (schema order)."""
    slices: dict[str, slice] = {}
    start = 0
    for name, values in schema.items():
        slices[name] = slice(start, start + len(values))
        start += len(values)
    return slices


def attribute_table(labels: list[AttributeLabel], schema: dict[str, list[str]],
                    ) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Group rows by image into dense arrays.

    Returns ``(images, targets, mask)``:

    - ``images``: unique image paths in order of first appearance;
    - ``targets``: float32 ``[n_images, total_values]``. Columns are the attributes in schema
      order with their values concatenated (see :func:`attribute_slices`); y -> 1, n -> 0,
      m -> NaN (resolve per epoch with :func:`resolve_maybe`). Attributes not labeled for an
      image are 0 there and must be ignored through ``mask``;
    - ``mask``: bool ``[n_images, n_attributes]``, True where the attribute is labeled.
    """
    slices = attribute_slices(schema)
    column = {name: i for i, name in enumerate(schema)}
    row_of: dict[Path, int] = {}
    for label in labels:
        row_of.setdefault(label.image, len(row_of))
    total = sum(len(values) for values in schema.values())
    targets = np.zeros((len(row_of), total), dtype=np.float32)
    mask = np.zeros((len(row_of), len(schema)), dtype=bool)
    for label in labels:
        if label.attribute not in schema:
            raise UserError(f"{label.image}: attribute {label.attribute!r} not in the schema")
        problem = _check_codes(label.codes, schema[label.attribute])
        if problem:
            raise UserError(f"{label.image}: {problem} ({label.attribute})")
        row, col = row_of[label.image], column[label.attribute]
        if mask[row, col]:
            raise UserError(f"{label.image}: labeled twice for {label.attribute}")
        mask[row, col] = True
        codes = np.array(list(label.codes))
        block = np.where(codes == "y", 1.0, 0.0).astype(np.float32)
        block[codes == "m"] = np.nan
        targets[row, slices[label.attribute]] = block
    return list(row_of), targets, mask


def resolve_maybe(targets: np.ndarray, rng: np.random.Generator | None = None,
                  maybe_policy: str = "random") -> np.ndarray:
    """Copy of ``targets`` with each NaN (an ``m``) replaced per ``maybe_policy``.

    Call once per epoch with ``"random"`` to redraw the maybes; see
    :meth:`AttributeLabel.targets` for the policies.
    """
    values = np.array(targets, dtype=np.float32, copy=True)
    return _resolve_maybe(values, np.isnan(values), rng, maybe_policy)
