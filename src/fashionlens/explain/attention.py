"""Attention maps of the local alignment branches (docs/METHODS.md, retrieval 4).

Each branch i of the local alignment neck computes a spatial mask ``M_i = sigmoid(conv1x1_i(T))``
on the backbone feature map T (7x7 for a 224 input). As in the method, a mask is shown by
upsampling it to the image size with nearest-neighbour interpolation (each map cell becomes a
block of pixels) and multiplying the letterboxed input image - the image the model sees - by
it: bright where the branch looks, dark where it does not. One picture per branch. Which outputs
are masks the neck says (:meth:`Neck.attention_outputs <fashionlens.models.necks.base.Neck.attention_outputs>`).

Raw sigmoid masks, above all early in training, often sit around 0.5 everywhere, which only
dims the whole image. ``normalize=True`` first rescales each mask to [0, 1] by its own min and
max (a constant mask becomes all ones): it shows where a branch looks *relative* to the rest of
the image, not how strongly. The default is the method's raw product.

* :func:`attention_masks` - (letterboxed image, ``{output key: (K, h, w) masks}``).
* :func:`masked_images` - one image per branch: image x nearest-upsampled mask, uint8.
* :func:`attention_sheet` - the input and every branch side by side, captioned, in one image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from fashionlens.data.transforms import Preprocess, letterbox
from fashionlens.errors import UserError
from fashionlens.models.necks import Neck


def mask_keys(model: torch.nn.Module) -> list[str]:
    """The model outputs that are attention masks: ``"masks"``, or ``"<sub-neck>.masks"`` for the
    sub-necks of a multi neck (as the model's neck declares them)."""
    neck = getattr(model, "neck", None)
    return neck.attention_outputs() if isinstance(neck, Neck) else []


def source_label(key: str) -> str:
    """``"lan.masks"`` -> ``"lan"`` (the sub-neck's name); ``"masks"`` -> ``""``."""
    return key[: -len(".masks")] if key.endswith(".masks") else ""


def attention_masks(model: torch.nn.Module, image: Image.Image) -> tuple[Image.Image, dict[str, np.ndarray]]:
    """Run ``model`` (a :class:`RetrievalModel` from ``build_model`` / ``load_checkpoint``) on
    ``image``; returns the letterboxed image it saw (S x S, from ``model.data_config``) and its
    masks as ``{output key: float32 (K, h, w) array in [0, 1]}`` (h x w: the feature map).

    The model runs in eval mode (its mode is restored afterwards). A model whose neck has no
    spatial masks (gap, stripes, rings, local_alignment with spatial=False) raises :class:`UserError`.
    """
    cfg = model.data_config
    size = int(cfg["input_size"][-1])
    boxed = letterbox(image.convert("RGB"), size)
    x = Preprocess(size, tuple(cfg["mean"]), tuple(cfg["std"]))(boxed)[None]
    param = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            outputs = model(x.to(param.device if param is not None else "cpu"))
    finally:
        model.train(was_training)
    keys = [key for key in mask_keys(model) if key in outputs]
    if not keys:
        neck = getattr(model, "neck", None)
        kind = neck.describe() if isinstance(neck, Neck) else type(neck or model).__name__
        raise UserError(f"this model has no spatial attention masks (neck type {kind}); attention maps need a "
                        "'local_alignment' neck with spatial attention")
    return boxed, {key: outputs[key][0].detach().float().cpu().numpy() for key in keys}


def normalize_masks(masks: np.ndarray) -> np.ndarray:
    """Each (h, w) mask of a (K, h, w) array rescaled to [0, 1] by its min / max; a constant
    mask becomes all ones."""
    m = np.asarray(masks, dtype=np.float32)
    lo = m.min(axis=(1, 2), keepdims=True)
    span = m.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (m - lo) / np.where(span > 0, span, 1), 1.0).astype(np.float32)


def upsample(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """(K, h, w) -> (K, height, width), nearest neighbour (torch ``interpolate(mode="nearest")``:
    output pixel y takes map row ``floor(y * h / height)``; exact blocks when the size divides)."""
    t = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[None]
    return F.interpolate(t, size=(height, width), mode="nearest")[0].numpy()


def masked_images(image: Image.Image, masks: np.ndarray, normalize: bool = False) -> list[Image.Image]:
    """One RGB image per branch: ``image * nearest-upsampled mask``, rounded to uint8.

    ``masks`` is (K, h, w) with values in [0, 1]; ``normalize`` rescales each mask by its own
    min / max first (see the module notes)."""
    masks = np.asarray(masks, dtype=np.float32)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, h, w), got shape {masks.shape}")
    if normalize:
        masks = normalize_masks(masks)
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    up = upsample(masks, arr.shape[0], arr.shape[1])
    return [Image.fromarray(np.clip(np.rint(arr * m[..., None]), 0, 255).astype(np.uint8)) for m in up]


def branch_labels(masks_by_name: Mapping[str, np.ndarray]) -> list[tuple[str, int, str]]:
    """(output key, branch index, caption) of every branch, in order: "branch 1" ..., or
    "lan branch 1" ... when the masks come from several sub-necks."""
    several = len(masks_by_name) > 1
    out = []
    for key, masks in masks_by_name.items():
        prefix = f"{source_label(key) or key} " if several else ""
        out += [(key, i, f"{prefix}branch {i + 1}") for i in range(len(masks))]
    return out


def file_tag(key: str, several: bool) -> str:
    """The file-name part for the masks of ``key``: "" alone, "<sub-neck>-" among several."""
    return re.sub(r"[^\w.-]", "_", source_label(key) or key) + "-" if several else ""


def attention_sheet(image: Image.Image, masks_by_name: Mapping[str, np.ndarray], normalize: bool = False,
                    gap: int = 4, images: Mapping[str, list[Image.Image]] | None = None) -> Image.Image:
    """One RGB image: the input, then every branch's masked image, side by side on white, each
    captioned below ("input"; "branch i" and the raw mask's range "mask lo-hi"). ``images``:
    the :func:`masked_images` of each key when the caller already has them."""
    image = image.convert("RGB")
    if images is None:
        images = {key: masked_images(image, masks, normalize) for key, masks in masks_by_name.items()}
    tiles = [(image, "input", "")]
    for key, i, caption in branch_labels(masks_by_name):
        m = masks_by_name[key][i]
        tiles.append((images[key][i], caption, f"mask {float(m.min()):.2f}-{float(m.max()):.2f}"))
    font = ImageFont.load_default()
    _, top, _, bottom = font.getbbox("Ag")
    line = bottom - top + 3
    w, h = image.size
    sheet = Image.new("RGB", (gap + len(tiles) * (w + gap), 2 * gap + h + 2 * line + 2), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (tile, caption, detail) in enumerate(tiles):
        x = gap + j * (w + gap)
        sheet.paste(tile, (x, gap))
        draw.text((x, gap + h + 2), caption, fill="black", font=font)
        if detail:
            draw.text((x, gap + h + 2 + line), detail, fill=(90, 90, 90), font=font)
    return sheet
