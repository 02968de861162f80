"""Faithfulness of the attribute boxes (docs/METHODS.md, attributes 6): hide the box, see the loss rise.

For each labeled (image, attribute) pair: the Grad-CAM of the labeled value (or of the
predicted one), the box of its largest region, and the attribute's loss on three inputs: the
photo, the photo with the box blanked, and - the control - the photo with a box of the same
size blanked at a random place inside the photo. A box that holds what the model looks at
raises the loss much more than a random box of the same size. Blanking fills with black (pixel
value 0, as the letterbox padding and the retrieval method's erasing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fashionlens.data.images import ImageError, open_image
from fashionlens.data.transforms import Letterbox
from fashionlens.explain.cam import largest_region_box
from fashionlens.explain.explainer import AttributeExplainer
from fashionlens.losses.classification import pair_losses


def blank(x: torch.Tensor, box: Sequence[int], fill: torch.Tensor) -> torch.Tensor:
    """A copy of image tensor ``x`` (3, S, S) with the [x, y, w, h] box set to ``fill`` (3,)."""
    out = x.clone()
    bx, by, bw, bh = (int(v) for v in box)
    out[:, by:by + bh, bx:bx + bw] = fill.to(out.dtype).view(-1, 1, 1)
    return out


def random_box_like(box: Sequence[int], area: tuple[int, int, int, int], rng: np.random.Generator) -> tuple:
    """A box of ``box``'s size at a uniform position inside ``area`` [x, y, w, h] (clipped to it)."""
    ax, ay, aw, ah = area
    w, h = min(box[2], aw), min(box[3], ah)
    return int(ax + rng.integers(0, aw - w + 1)), int(ay + rng.integers(0, ah - h + 1)), w, h


def faithfulness(explainer: AttributeExplainer, images: Sequence, targets: np.ndarray, mask: np.ndarray,
                 cam_of: str = "label", seed: int = 0, progress=None) -> dict:
    """Mean losses per attribute over the labeled pairs of ``images`` (paths; ``targets`` and
    ``mask`` as :func:`fashionlens.data.fashionai.attribute_table` gives them): ``original``,
    ``blanked`` (the CAM box hidden), ``random`` (a same-size box hidden), ``box_area`` (share
    of the input), ``pairs``, and ``no_box`` (pairs whose CAM has no positive value, left out);
    and the same over all pairs in ``mean``. Unreadable images are skipped."""
    rng = np.random.default_rng(seed)
    names, slices = list(explainer.schema), list(explainer.slices.values())
    mean, std = explainer.model.data_config["mean"], explainer.model.data_config["std"]
    fill = torch.tensor([(0.0 - m) / s for m, s in zip(mean, std)], device=explainer.device)
    sums = {name: np.zeros(4) for name in names}  # original, blanked, random, box area
    counts, no_box = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    skipped = 0
    for n, path in enumerate(images):
        if progress:
            progress(n, len(images))
        try:
            image = open_image(path, draft_size=explainer.size)
        except ImageError:
            skipped += 1
            continue
        x = explainer.preprocess(image).to(explainer.device)[None]
        logits, tmap = explainer._forward(x)
        labeled = [a for a in range(len(names)) if mask[n, a]]
        if cam_of == "label":
            columns = [slices[a].start + int(np.nanargmax(targets[n, slices[a]])) for a in labeled]
        else:
            columns = [slices[a].start + int(logits[0, slices[a]].argmax()) for a in labeled]
        if not labeled:
            continue
        cams = explainer.cams(x, tmap, [columns])[0]
        geometry = Letterbox(image.width, image.height, explainer.size)
        left, top = geometry.offset
        area = (left, top, explainer.size - 2 * left, explainer.size - 2 * top)
        batch, kept = [], []
        for j, a in enumerate(labeled):
            box = largest_region_box(cams[j], explainer.box_threshold)
            if box is None:  # a map with no positive value: nothing to hide
                no_box[names[a]] += 1
                continue
            batch += [blank(x[0], box, fill), blank(x[0], random_box_like(box, area, rng), fill)]
            kept.append((a, box[2] * box[3] / explainer.size ** 2))
        if not kept:
            continue
        with torch.no_grad():
            hidden = explainer.model(torch.stack(batch))["attr_logits"].float()
        t = torch.from_numpy(targets[n:n + 1]).to(logits.device)
        for j, (a, area_share) in enumerate(kept):
            s = slices[a]
            losses = [float(pair_losses(z[None, s], t[:, s], explainer.mode)[0])
                      for z in (logits[0], hidden[2 * j], hidden[2 * j + 1])]
            sums[names[a]] += np.array([*losses, area_share])
            counts[names[a]] += 1
    keys = ("original", "blanked", "random", "box_area")
    per = {name: {**dict(zip(keys, (sums[name] / counts[name]).round(4).tolist())), "pairs": counts[name],
                  "no_box": no_box[name]} for name in names if counts[name] or no_box[name]}
    total = sum(counts.values())
    overall = {k: round(float(sum(sums[nm][i] for nm in names) / total), 4) if total else None
               for i, k in enumerate(keys)}
    return {"attributes": per, "mean": {**overall, "pairs": total, "no_box": sum(no_box.values())},
            "skipped": skipped, "cam_of": cam_of}
