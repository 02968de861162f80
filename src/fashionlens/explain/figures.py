"""The attribute method's figures (docs/METHODS.md; figures 15-17 of its thesis): per attribute the
photo, its Grad-CAM, the overlay and the box."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image

from fashionlens.data.transforms import Letterbox
from fashionlens.explain.explainer import AttributeResult
from fashionlens.explain.wording import display_name


def photo_cam(result: AttributeResult, photo: Image.Image, size: int) -> np.ndarray:
    """The result's CAM over the photo's own pixels, in [0, 1]."""
    cam = Letterbox(photo.width, photo.height, size).map_to_photo(result.cam)
    return np.clip(cam, 0.0, 1.0)


def explanation_figure(photo: Image.Image, results: Sequence[AttributeResult], size: int, path: Path,
                       title: str = "") -> Path:
    """One PNG: a row per attribute (photo, CAM, overlay, box) captioned with value and confidence."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rgb = np.asarray(photo, dtype=np.float32) / 255.0
    aspect = photo.height / photo.width
    fig = Figure(figsize=(4 * 2.4, max(1, len(results)) * 2.4 * aspect + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(results)), 4, squeeze=False)
    for row, result in zip(axes, results):
        cam = photo_cam(result, photo, size)
        overlay = show_cam_on_image(rgb, cam, use_rgb=True)
        panels = [(np.asarray(photo), "photo"), (cam, "Grad-CAM"), (overlay, "overlay"), (np.asarray(photo), "box")]
        for ax, (image, name) in zip(row, panels):
            ax.imshow(image, cmap="jet" if image.ndim == 2 else None, vmin=0, vmax=1 if image.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name, fontsize=8)
        if result.box is not None:
            x, y, w, h = result.box
            row[3].add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="lime", linewidth=2))
        row[0].set_ylabel(f"{display_name(result.attribute)}\n{result.value} ({result.confidence:.2f})", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path
