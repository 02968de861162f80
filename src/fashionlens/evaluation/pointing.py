"""Localization metrics for class-activation maps (CAMs) against pixel masks.

- the *pointing game*: does the CAM's maximum fall on the object? The usual protocol accepts a
  peak within 15 pixels of the object at full image resolution (``tolerance=15``), i.e. inside
  the mask dilated by a Euclidean disk of that radius;
- box IoU between the bounding box of a thresholded CAM and that of the mask.

Boxes are ``(x, y, w, h)`` in pixels with inclusive extents: ``(0, 0, 2, 2)`` covers the four
pixels with x, y in {0, 1}. :class:`PointingTally` accumulates both per tag.
"""

from __future__ import annotations

import math

import numpy as np

Box = tuple[int, int, int, int]


def mask_box(mask: np.ndarray) -> Box | None:
    """Bounding box ``(x, y, w, h)`` of the True pixels of a 2-D mask; None when there are none."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    x0, y0 = int(xs.min()), int(ys.min())
    return x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x, y, w, h)`` boxes as pixel sets; 0 when disjoint."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    if min(aw, ah, bw, bh) < 0:
        raise ValueError(f"negative box size in {a} or {b}")
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def cam_peak(cam: np.ndarray) -> tuple[int, int]:
    """``(x, y)`` of the maximum of a 2-D map; the first in row-major order on ties.

    An empty map or one holding NaN raises ``ValueError``.
    """
    cam = np.asarray(cam)
    if cam.ndim != 2 or cam.size == 0:
        raise ValueError(f"cam must be a non-empty 2-D array, got shape {cam.shape}")
    if np.isnan(cam).any():
        raise ValueError("cam holds NaN")
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return int(x), int(y)


def pointing_hit(cam: np.ndarray, mask: np.ndarray, tolerance: int = 0) -> bool:
    """Whether the peak of ``cam`` lies in ``mask`` or within ``tolerance`` pixels of it.

    The distance is Euclidean between pixel centres, so this equals testing the peak against
    ``scipy.ndimage.distance_transform_edt(~mask) <= tolerance`` (the mask dilated by a disk
    of radius ``tolerance``); only the peak's distance is computed here, exactly. The usual
    pointing game uses ``tolerance=15`` at full resolution (scale it with the map). An empty
    mask is a miss. ``cam`` and ``mask`` must have the same shape (``ValueError``).
    """
    cam, mask = np.asarray(cam), np.asarray(mask, dtype=bool)
    if cam.shape != mask.shape:
        raise ValueError(f"cam shape {cam.shape} differs from mask shape {mask.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    x, y = cam_peak(cam)
    if mask[y, x]:
        return True
    if tolerance == 0:
        return False
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return False
    nearest = int(((xs - x) ** 2 + (ys - y) ** 2).min())
    return nearest <= tolerance * tolerance


class PointingTally:
    """Per-tag pointing hits, trials and IoU sum; :meth:`per_tag` and :meth:`mean` report them.

    Shares are exact ratios of integer counts; the IoU mean is the sum over trials / trials.
    """

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.trials: dict[str, int] = {}
        self.iou_sum: dict[str, float] = {}

    def add(self, tag: str, hit: bool, iou: float = 0.0) -> None:
        """Record one photo for ``tag``: pointing ``hit`` and box ``iou`` (in [0, 1])."""
        if not 0.0 <= iou <= 1.0:
            raise ValueError(f"iou must be in [0, 1], got {iou}")
        self.trials[tag] = self.trials.get(tag, 0) + 1
        self.hits[tag] = self.hits.get(tag, 0) + bool(hit)
        self.iou_sum[tag] = self.iou_sum.get(tag, 0.0) + float(iou)

    def per_tag(self) -> dict[str, dict[str, float]]:
        """``{tag: {"pointing": hits/trials, "iou": mean IoU, "photos": trials}}``, first-seen
        order."""
        return {tag: {"pointing": self.hits[tag] / n, "iou": self.iou_sum[tag] / n, "photos": n}
                for tag, n in self.trials.items()}

    def mean(self, tags: list[str] | None = None) -> dict[str, float]:
        """Unweighted mean over ``tags`` (default: all) of the per-tag pointing share and IoU.

        Tags without trials are left out; ``"tags"`` is the number averaged (NaN means if 0).
        """
        table = self.per_tag()
        chosen = [t for t in (table if tags is None else tags) if t in table]
        if not chosen:
            return {"pointing": math.nan, "iou": math.nan, "tags": 0}
        return {"pointing": math.fsum(table[t]["pointing"] for t in chosen) / len(chosen),
                "iou": math.fsum(table[t]["iou"] for t in chosen) / len(chosen),
                "tags": len(chosen)}


def evaluate_pointing(explainer, photos, labels: list[str], tolerances: tuple[int, ...] = (0, 15),
                      progress=None) -> dict:
    """The pointing game and CAM-box IoU of a tag classifier on street ``photos`` with masks.

    ``explainer``: an :class:`~fashionlens.explain.explainer.AttributeExplainer` whose
    attributes are tags (``{tag: ["no", "yes"]}``, :func:`fashionlens.data.street.tag_schema`).
    For every photo and every schema tag present in its mask: the Grad-CAM of the tag's ``yes``
    (whatever the prediction: the pointing game asks where the model sees the tag), mapped to
    the photo's pixels; a hit when its peak lies in the tag's mask (or within each tolerance in
    pixels); IoU of the box of the CAM's largest region with the box around the tag's mask.
    Returns ``{"tolerance_<t>": PointingTally.per_tag(), ...}`` plus ``"photos"``.
    """
    from fashionlens.data.images import image_size, open_image
    from fashionlens.data.street import read_mask, tag_mask, yes_columns
    from fashionlens.data.transforms import Letterbox
    from fashionlens.explain.cam import largest_region_box

    tallies = {t: PointingTally() for t in tolerances}
    used = 0
    for n, photo in enumerate(photos):
        if progress:
            progress(n, len(photos))
        if photo.mask is None:
            continue
        mask = read_mask(photo.mask, labels, image_size(photo.image))  # the header: no decoding yet
        present = [tag for tag in explainer.schema if tag_mask(mask, labels, tag).any()]
        if not present:
            continue
        image = open_image(photo.image)
        used += 1
        x = explainer.preprocess(image).to(explainer.device)[None]
        _, tmap = explainer._forward(x)
        columns = yes_columns(explainer, present)
        cams = explainer.cams(x, tmap, [columns])[0]
        geometry = Letterbox(image.width, image.height, explainer.size)
        for tag, cam in zip(present, cams):
            where = tag_mask(mask, labels, tag)
            box = largest_region_box(cam, explainer.box_threshold)
            iou = box_iou(geometry.box_to_photo(box), mask_box(where)) if box is not None else 0.0
            on_photo = geometry.map_to_photo(cam)
            for t, tally in tallies.items():
                tally.add(tag, pointing_hit(on_photo, where, t), iou)
    return {**{f"tolerance_{t}": tally.per_tag() for t, tally in tallies.items()}, "photos": used}
