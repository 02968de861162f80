"""The largest connected region of a map, by scipy.ndimage."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_label(cam: np.ndarray, threshold: float) -> tuple[np.ndarray, int] | None:
    """(labels, label of the largest region), or None: the 8-connected regions where ``cam >=
    threshold * cam.max()``; largest = most pixels, ties to the larger sum of ``cam``, then the lowest
    label. None when the map has no positive, finite peak. Serves the CAM boxes
    (:mod:`fashionlens.explain.cam`) and the crop stage's masks (:mod:`fashionlens.data.crops`)."""
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2:
        raise ValueError(f"cam must be 2-D (H, W), got shape {cam.shape}")
    if not 0.0 < threshold <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    peak = cam.max() if cam.size else np.nan
    if not np.isfinite(peak) or peak <= 0:
        return None
    labels, count = ndimage.label(cam >= threshold * peak, structure=np.ones((3, 3), dtype=int))
    # count >= 1: the peak pixel itself is always on because threshold <= 1.
    if count == 1:  # the usual case for smooth maps: no counting needed
        return labels, 1
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    tied = np.flatnonzero(sizes == sizes.max())
    if len(tied) == 1:
        return labels, int(tied[0]) + 1
    sums = np.bincount(labels.ravel(), weights=cam.ravel(), minlength=count + 1)[1:]
    return labels, max(tied.tolist(), key=lambda i: (sums[i], -i)) + 1


def largest_box(cam: np.ndarray, threshold: float) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` (x1, y1 exclusive) in pixels of ``cam`` around :func:`largest_label`'s
    region; None when there is none."""
    found = largest_label(cam, threshold)
    if found is None:
        return None
    labels, label = found
    rows, cols = ndimage.find_objects(labels, max_label=label)[label - 1]
    return cols.start, rows.start, cols.stop, rows.stop
