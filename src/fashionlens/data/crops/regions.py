"""A garment's region from a person's landmarks, and which region a catalog item is.

Rows come from the landmarks (upper body: shoulders to hips; lower body: hips to ankles; a dress:
shoulders to knees; shoes: around the ankles and feet; the person: head to feet), with margins in
units of the torso (shoulders' centre to hips' centre). Columns are the landmarks' extent (arms
included for the upper body and the person), widened to the person mask's largest region within
those rows, so that loose sleeves and wide skirts are kept. Landmarks the model places outside the
photo are clamped to it: a photo cut at the knees gives a lower-body box down to its edge.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from fashionlens.data.crops.pose import Person
from fashionlens.data.masks import largest_label
from fashionlens.errors import UserError

REGIONS = ("upper", "lower", "dress", "shoes", "person", "whole")
SHOULDERS, ELBOWS, WRISTS, HIPS, KNEES, ANKLES, FEET = (11, 12), (13, 14), (15, 16), (23, 24), (25, 26), (27, 28), \
    (29, 30, 31, 32)
# region: (landmarks of its columns, rows from, rows to, margin above, below, beside; in torsos)
SPANS = {
    "upper": (SHOULDERS + ELBOWS + WRISTS + HIPS, SHOULDERS, HIPS, 0.2, 0.2, 0.1),
    "lower": (HIPS + KNEES + ANKLES + FEET, HIPS, ANKLES + FEET, 0.25, 0.1, 0.15),
    "dress": (SHOULDERS + ELBOWS + HIPS + KNEES, SHOULDERS, KNEES, 0.2, 0.35, 0.15),
    "shoes": (ANKLES + FEET, ANKLES, FEET, 0.5, 0.3, 0.4),
    "person": (tuple(range(33)), (0,), tuple(range(33)), 0.7, 0.1, 0.2),
}
MIN_SIDE = 8  # pixels: a smaller box is no crop


def region_box(person: Person, region: str, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` (exclusive ends) of ``region`` in a photo of ``size`` (w, h), or None."""
    w, h = size
    pts = person.landmarks
    xs, ys = np.clip(pts[:, 0], 0, w - 1), np.clip(pts[:, 1], 0, h - 1)
    torso = float(np.hypot(*(pts[list(SHOULDERS), :2].mean(0) - pts[list(HIPS), :2].mean(0))))
    torso = max(torso, 0.05 * max(w, h))
    cols, top, bottom, above, below, beside = SPANS[region]
    y0 = ys[list(top)].min() - above * torso
    y1 = ys[list(bottom)].max() + below * torso
    x0 = xs[list(cols)].min() - beside * torso
    x1 = xs[list(cols)].max() + beside * torso
    y0, y1 = int(max(0, np.floor(y0))), int(min(h, np.ceil(y1) + 1))
    if person.mask is not None and y1 > y0:
        found = largest_label(person.mask, 0.5) if float(person.mask.max()) >= 0.5 else None
        if found is not None:
            labels, label = found
            band = (labels[y0:y1] == label).any(0)
            if band.any():
                on = np.flatnonzero(band)
                x0, x1 = min(x0, float(on[0])), max(x1, float(on[-1] + 1))
    x0, x1 = int(max(0, np.floor(x0))), int(min(w, np.ceil(x1) + 1))
    if x1 - x0 < MIN_SIDE or y1 - y0 < MIN_SIDE:
        return None
    return x0, y0, x1, y1


def shown_region(person: Person, size: tuple[int, int], visible: float = 0.5) -> str:
    """What a photo with no metadata shows of its person: the upper body alone, the lower body
    alone, the feet alone, or more (then "person": which of its garments is meant is unknown, so
    all of them stay in the crop)."""
    w, h = size
    pts = person.landmarks

    def seen(idx) -> bool:
        p = pts[list(idx)]
        return bool(((p[:, 2] >= visible) & (p[:, 0] >= 0) & (p[:, 0] < w) & (p[:, 1] >= 0) & (p[:, 1] < h)).any())

    shoulders, hips, knees, feet = seen(SHOULDERS), seen(HIPS), seen(KNEES), seen(ANKLES + FEET)
    if shoulders and hips and not knees:
        return "upper"
    if hips and knees and not shoulders:
        return "lower"
    if feet and not hips and not shoulders:
        return "shoes"
    return "person"


class RegionMap:
    """Catalog metadata -> region, from a YAML file (the built-in ``regions.yaml`` by default)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else Path(__file__).with_name("regions.yaml")
        try:
            spec = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"{self.path}: cannot read the crop regions ({exc})") from None
        self.fields = list(spec.get("fields") or [])
        self.default = spec.get("default", "whole")
        self.tables = {f: dict(spec.get(f) or {}) for f in self.fields}
        bad = sorted(({str(r) for t in self.tables.values() for r in t.values()} | {str(self.default)}) - set(REGIONS))
        if bad:
            raise UserError(f"{self.path}: unknown region(s) {', '.join(bad)}; one of {', '.join(REGIONS)}")

    def region_of(self, metadata: dict | None) -> str:
        for field in self.fields:
            value = (metadata or {}).get(field)
            if value is not None and str(value) in self.tables[field]:
                return self.tables[field][str(value)]
        return self.default


@lru_cache(maxsize=8)
def region_map(path: str | None = None) -> RegionMap:
    return RegionMap(path)
