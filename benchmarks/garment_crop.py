"""Thesis A's first step, the garment crop, on buyers' photos -> catalog (issue 3).

Thesis A crops each photo to its garment (a Faster R-CNN box) before the letterbox. No detector
with offline weights exists here, so this trains one on the shared street photos' garment masks:
a small segmentation head (1x1 conv + BatchNorm + ReLU + 3x3 conv, 8 groups: background, skin and
hair, upper garment, lower garment, dress, shoes, accessories, legwear) on the frozen Lite0's maps
at strides 8, 16 and 32, brought to 14 x 14 at 224 px. Each catalog photo is then cut to the
largest 8-connected region (``explain.cam.region_mask``) of the groups its ``subCategory`` names (Topwear: upper
or dress; Bottomwear: lower; Dress: dress, upper or lower; shoes: shoes), one map cell of margin,
and embedded again. Buyers' photos stay whole (the garment fills them).

Rows: consumer ``validation/`` -> the whole catalog, the untrained default and a trained
checkpoint, the catalog whole / cropped (apparel) / cropped (Topwear only) / each cropped item's
whole and cropped embeddings averaged, with per-label top-1.
``test/`` is never touched.

    python benchmarks/garment_crop.py --checkpoint runs/recipe-cached/best > benchmarks/results/garment_crop.json

~22 min here (two cores): five backbone passes over the catalog.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from _common import SHARED, emit
from PIL import Image

# CCP's 59 tags in coarse groups (index 0, "null", and anything unlisted: background)
GROUPS = {
    "person": "skin hair",
    "upper": "blazer blouse bodysuit bra cape cardigan coat hoodie jacket jumper shirt suit sweater sweatshirt "
             "t-shirt top vest",
    "lower": "jeans leggings pants shorts skirt",
    "dress": "dress romper swimwear",
    "shoes": "boots clogs flats heels loafers pumps sandals shoes sneakers wedges",
    "accessory": "accessories bag belt bracelet earrings glasses gloves hat necklace purse ring scarf sunglasses "
                 "tie wallet watch",
    "legwear": "intimate panties socks stockings tights",
}
NAMES = ["background", *GROUPS]
CROP_GROUPS = {"Topwear": ("upper", "dress"), "Bottomwear": ("lower",), "Dress": ("dress", "upper", "lower"),
               "Shoes": ("shoes",), "Flip Flops": ("shoes",), "Sandal": ("shoes",)}
SIZE, CELL = 224, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED))
    parser.add_argument("--checkpoint", default="runs/recipe-cached/best", help="a trained model, besides the default")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the segmentation head")
    args = parser.parse_args()

    from fashionlens.data.street import read_labels, read_mask, read_street
    from fashionlens.data.transforms import Preprocess
    from fashionlens.models.backbones import create_offline
    from fashionlens.models.embedder import build_embedder
    from fashionlens.training.attribute_masks import cell_shares
    from fashionlens.training.validation import QueryValidation

    torch.manual_seed(0)
    data = Path(args.data)
    labels = read_labels(data / "street")
    lut = np.zeros(len(labels), np.int64)
    for g, words in enumerate(GROUPS.values(), 1):
        for word in words.split():
            lut[labels.index(word)] = g
    backbone = create_offline("lite0").eval()
    data_cfg = timm.data.resolve_data_config({}, model=backbone)
    pre = Preprocess(SIZE, tuple(data_cfg["mean"]), tuple(data_cfg["std"]))

    @torch.no_grad()
    def maps(x: torch.Tensor) -> torch.Tensor:
        a, b, c = backbone.forward_intermediates(x, indices=[2, 3, 4], intermediates_only=True)
        c = F.interpolate(c, size=b.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([F.avg_pool2d(a, 2), b, c], 1)

    # -- the segmentation head on the street photos' masks (each photo and its mirror image) --
    photos = [p for p in read_street(data / "street") if p.kind == "pixel"]
    x, y = [], []
    for photo in photos:
        img = Image.open(photo.image).convert("RGB")
        grouped = lut[read_mask(photo.mask, labels)]
        for flip in (False, True):
            x.append(pre(img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img))
            m = np.ascontiguousarray(grouped[:, ::-1] if flip else grouped)
            garments = cell_shares(m, range(1, len(NAMES)), SIZE, (SIZE // CELL,) * 2)  # each cell's share
            y.append(torch.from_numpy(np.concatenate([1 - garments.sum(0, keepdims=True), garments])))  # + background
    feats = torch.cat([maps(torch.stack(x[i:i + 32])) for i in range(0, len(x), 32)])
    shares = torch.stack(y)
    n = len(photos)
    held = set(np.random.default_rng(0).permutation(n)[: n // 8].tolist())
    train = [i for i in range(2 * n) if i // 2 not in held]
    val = [i for i in range(2 * n) if i // 2 in held and i % 2 == 0]
    head = nn.Sequential(nn.Conv2d(feats.shape[1], 128, 1), nn.BatchNorm2d(128), nn.ReLU(),
                         nn.Conv2d(128, len(NAMES), 3, padding=1))
    opt = torch.optim.AdamW(head.parameters(), 1e-3, weight_decay=1e-4)
    for _ in range(args.epochs):
        head.train()
        order = torch.randperm(len(train))
        for s in range(0, len(train), 32):
            b = [train[i] for i in order[s:s + 32]]
            loss = -(shares[b] * F.log_softmax(head(feats[b]), 1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        pred, truth = head(feats[val]).argmax(1), shares[val].argmax(1)
    iou = {name: round(((pred == g) & (truth == g)).sum().item() / max(((pred == g) | (truth == g)).sum().item(), 1), 3)
           for g, name in enumerate(NAMES)}
    print("held-out street photos, IoU per group:", iou, file=sys.stderr, flush=True)

    # -- the catalog, whole and cropped, through each model --
    rows = {r["id"]: r for r in csv.DictReader(open(data / "catalog" / "styles.csv", encoding="utf-8"))}
    wanted = {sub: [NAMES.index(g) for g in groups] for sub, groups in CROP_GROUPS.items()}

    @torch.no_grad()
    def crop_boxes(imgs: list[Image.Image], subs: list[str]) -> list[tuple[int, int, int, int] | None]:
        prob = head(maps(torch.stack([pre(i) for i in imgs]))).softmax(1)
        return [_box(p.argmax(0).numpy(), wanted.get(sub), img.size) for img, p, sub in zip(imgs, prob, subs)]

    q = QueryValidation.load(data / "consumer" / "validation", data / "consumer" / "catalog_types.csv",
                             data / "catalog", "articleType")
    models = {"untrained default": build_embedder("lite0"), f"checkpoint {args.checkpoint}": build_embedder(args.checkpoint)}
    whole = {name: {} for name in models}
    cropped = {name: {} for name in models}
    subs = {p: rows[p.stem]["subCategory"] for p in q.gallery_paths}
    n_cropped = 0
    for s in range(0, len(q.gallery_paths), 64):
        paths = q.gallery_paths[s:s + 64]
        imgs = [Image.open(p).convert("RGB") for p in paths]
        boxes = crop_boxes(imgs, [subs[p] for p in paths])
        crops = [img.crop(b) if b else img for img, b in zip(imgs, boxes)]
        n_cropped += sum(b is not None for b in boxes)
        for name, embedder in models.items():
            whole[name].update(zip(paths, map(torch.from_numpy, embedder.embed_images(imgs))))
            cropped[name].update(zip(paths, map(torch.from_numpy, embedder.embed_images(crops))))
        print(f"{s + len(paths)} / {len(q.gallery_paths)} catalog photos, {n_cropped} cropped", file=sys.stderr, flush=True)
    query_imgs = [Image.open(p).convert("RGB") for p in q.query_paths]
    queries = {name: dict(zip(q.query_paths, map(torch.from_numpy, e.embed_images(query_imgs)))) for name, e in models.items()}

    results = []
    for name in models:
        for variant, crop_subs, mean in (("whole", (), False), ("cropped: apparel and shoes", tuple(CROP_GROUPS), False),
                                         ("cropped: Topwear only", ("Topwear",), False),
                                         ("whole + cropped averaged: apparel and shoes", tuple(CROP_GROUPS), True),
                                         ("whole + cropped averaged: Topwear only", ("Topwear",), True)):
            look = {p: (F.normalize(cropped[name][p] + whole[name][p], dim=0) if mean else cropped[name][p])
                    if subs[p] in crop_subs else whole[name][p] for p in q.gallery_paths}
            look.update(queries[name])
            row = q.evaluate(lambda paths: torch.stack([look[p] for p in paths]))
            results.append({"model": name, "catalog": variant, **row, "per_label_top1": _per_label(q, look)})
            print(results[-1], file=sys.stderr, flush=True)
    emit({"benchmark": "garment_crop", "queries": "consumer/validation", "street_iou": iou,
          "catalog_photos_cropped": n_cropped, "rows": results})


def _box(cells: np.ndarray, groups: list[int] | None, size: tuple[int, int], margin: int = 1, min_cells: int = 3):
    """The photo's crop box (left, top, right, bottom) around the largest connected region of
    ``groups`` in the map of argmax groups, ``margin`` cells wider (None: no such region of
    ``min_cells``, or no groups for the item's subCategory)."""
    from fashionlens.data.transforms import Letterbox
    from fashionlens.explain.cam import region_mask

    region = region_mask(np.isin(cells, groups).astype(np.float32), 1.0) if groups else None
    if region is None or region.sum() < min_cells:
        return None
    ys, xs = np.nonzero(region)
    n = cells.shape[0]
    x0, y0 = max(xs.min() - margin, 0), max(ys.min() - margin, 0)
    x1, y1 = min(xs.max() + 1 + margin, n), min(ys.max() + 1 + margin, n)
    x, y, w, h = Letterbox(*size, SIZE).box_to_photo((x0 * CELL, y0 * CELL, (x1 - x0) * CELL, (y1 - y0) * CELL))
    return x, y, x + w, y + h


def _per_label(q, look: dict) -> dict:
    e = lambda paths: F.normalize(torch.stack([look[p] for p in paths]), dim=1)  # noqa: E731
    top1 = (e(q.query_paths) @ e(q.gallery_paths).T).argmax(1).tolist()
    hits = defaultdict(list)
    for path, ok, j in zip(q.query_paths, q.query_ok, top1):
        hits[path.parent.name].append(q.gallery_values[j] in ok)
    return {label: round(sum(v) / len(v), 3) for label, v in sorted(hits.items())}


if __name__ == "__main__":
    main()
