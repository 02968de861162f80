"""Thesis A's first step, the garment crop, on buyers' photos -> catalog (issue 3).

Thesis A crops each photo to its garment (a Faster R-CNN box) before the letterbox. No detector
with offline weights exists here, so this trains one on the shared street photos' garment masks:
a small segmentation head (1x1 conv + BatchNorm + ReLU + 3x3 conv, 8 groups: background, skin and
hair, upper garment, lower garment, dress, shoes, accessories, legwear) on the frozen Lite0's maps
at strides 8, 16 and 32, brought to 14 x 14 at 224 px. Each catalog photo is then cut to the
largest connected region (scipy.ndimage) of the groups its ``subCategory`` names (Topwear: upper
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
from scipy import ndimage

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

    from fashionlens.data.street import read_labels, read_street
    from fashionlens.data.transforms import Preprocess
    from fashionlens.models.backbones import create_offline
    from fashionlens.models.embedder import build_embedder
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
        mask = lut[_letterbox_mask(Image.open(photo.mask))]
        for flip in (False, True):
            x.append(pre(img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img))
            m = mask[:, ::-1] if flip else mask
            onehot = torch.from_numpy(np.eye(len(NAMES), dtype=np.float32)[m.copy()]).permute(2, 0, 1)
            y.append(F.avg_pool2d(onehot[None], CELL)[0])  # each cell's share of each group
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


def _letterbox_mask(mask: Image.Image) -> np.ndarray:
    """The mask placed as :func:`letterbox` places its photo (nearest neighbour, padding = 0)."""
    w, h = mask.size
    scale = SIZE / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("L", (SIZE, SIZE), 0)
    canvas.paste(mask.resize((nw, nh), Image.NEAREST), ((SIZE - nw) // 2, (SIZE - nh) // 2))
    return np.asarray(canvas)


def _box(cells: np.ndarray, groups: list[int] | None, size: tuple[int, int], margin: int = 1, min_cells: int = 3):
    """The photo's box around the largest connected region of ``groups`` in the map of argmax
    groups (None: no such region of ``min_cells``, or no groups for the item's subCategory)."""
    if not groups:
        return None
    region = np.isin(cells, groups)
    lab, count = ndimage.label(region)
    if not count:
        return None
    sizes = ndimage.sum(region, lab, range(1, count + 1))
    if sizes.max() < min_cells:
        return None
    ys, xs = np.nonzero(lab == int(np.argmax(sizes)) + 1)
    n = cells.shape[0]
    y0, y1 = max(ys.min() - margin, 0), min(ys.max() + 1 + margin, n)
    x0, x1 = max(xs.min() - margin, 0), min(xs.max() + 1 + margin, n)
    w, h = size
    scale = max(w, h) / SIZE  # letterbox cells back to the photo's pixels
    ox, oy = (SIZE - w / scale) / 2, (SIZE - h / scale) / 2
    box = (int(round(max(0, (x0 * CELL - ox) * scale))), int(round(max(0, (y0 * CELL - oy) * scale))),
           int(round(min(w, (x1 * CELL - ox) * scale))), int(round(min(h, (y1 * CELL - oy) * scale))))
    return box if box[2] > box[0] and box[3] > box[1] else None  # a region inside the padding


def _per_label(q, look: dict) -> dict:
    e = lambda paths: F.normalize(torch.stack([look[p] for p in paths]), dim=1)  # noqa: E731
    top1 = (e(q.query_paths) @ e(q.gallery_paths).T).argmax(1).tolist()
    hits = defaultdict(list)
    for path, ok, j in zip(q.query_paths, q.query_ok, top1):
        hits[path.parent.name].append(q.gallery_values[j] in ok)
    return {label: round(sum(v) / len(v), 3) for label, v in sorted(hits.items())}


if __name__ == "__main__":
    main()
