"""Box quality and cost of the crop stage on the street photos' garment masks (issue 28).

For each of the 788 masked street photos (CCP, long side 400 px) and each garment region it shows
(upper, lower, dress, shoes: the mask's tags of that region cover >= 1% of the photo), the
``garment`` crop's box for that region (BlazePose landmarks + person mask) is compared with the
box around that region's mask pixels: box IoU, the share of the mask's pixels inside the box
(coverage: what a crop must not cut off) and the box's share of the photo. Per region and the
macro mean over regions; photos where no person was found count as misses (IoU 0, coverage 1,
the whole photo). Then the cost: ms a photo of the pose stage (detector + landmarks + person
mask) and of the saliency model, on one thread, over the first ``--timed`` photos.

    taskset -c 0 python benchmarks/crop_boxes.py > benchmarks/results/crop_boxes.json
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from _common import SHARED, emit, machine, percentile
from PIL import Image

from fashionlens.data.crops import build_cropper
from fashionlens.data.crops.regions import region_box
from fashionlens.data.street import GARMENT_TAGS, garment_mask, read_labels, read_mask
from fashionlens.evaluation.pointing import box_iou, mask_box


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED / "street")
    parser.add_argument("--limit", type=int, default=0, help="photos (0 = every masked one)")
    parser.add_argument("--timed", type=int, default=100, help="photos timed for the cost")
    args = parser.parse_args()
    labels = read_labels(args.data)
    with open(args.data / "tags.csv", newline="") as fh:
        photos = [row[0] for row in csv.reader(fh) if len(row) > 1 and row[1] == "pixel"]
    photos = photos[:args.limit] if args.limit else photos
    garment = build_cropper("garment")
    rows = {region: [] for region in GARMENT_TAGS}
    found = 0
    for n, name in enumerate(photos, 1):
        img = Image.open(args.data / name).convert("RGB")
        mask = read_mask(args.data / "masks" / f"{Path(name).stem}.png", labels)
        person = garment.pose.find(img)  # once a photo: what garment.box(img, region) finds for each region
        found += person is not None
        for region in GARMENT_TAGS:
            truth = garment_mask(mask, labels, region)
            if truth.mean() < 0.01:
                continue
            cut = region_box(person, region, img.size) if person is not None else None
            x0, y0, x1, y1 = cut or (0, 0, img.width, img.height)  # no person, no box: the whole photo
            inside = truth[y0:y1, x0:x1].sum() / truth.sum()
            # against the box of every piece of the mask (two shoes, a jacket and its sleeve)
            iou = box_iou((x0, y0, x1 - x0, y1 - y0), mask_box(truth)) if cut else 0.0
            rows[region].append({"iou": iou, "coverage": float(inside),
                                 "share": (x1 - x0) * (y1 - y0) / (img.width * img.height)})
        if n % 100 == 0:
            print(f"{n}/{len(photos)} photos", file=sys.stderr, flush=True)
    per = {region: {"photos": len(r), "box_iou": round(float(np.mean([x["iou"] for x in r])), 3),
                    "box_iou_median": round(float(np.median([x["iou"] for x in r])), 3),
                    "coverage_mean": round(float(np.mean([x["coverage"] for x in r])), 3),
                    "coverage_p10": round(float(np.percentile([x["coverage"] for x in r], 10)), 3),
                    "box_share_of_photo": round(float(np.mean([x["share"] for x in r])), 3)}
           for region, r in rows.items() if r}
    macro = {k: round(float(np.mean([p[k] for p in per.values()])), 3) for k in ("box_iou", "coverage_mean")}

    auto = build_cropper("auto")
    pose_ms, saliency_ms = [], []
    for name in photos[:args.timed]:
        img = Image.open(args.data / name).convert("RGB")
        t = time.perf_counter()
        auto.pose.find(img)
        pose_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        auto.saliency.mask(img)
        saliency_ms.append((time.perf_counter() - t) * 1000)
    emit({"benchmark": "crop_boxes", "photos": len(photos), "person_found": found, "per_region": per,
          "macro": macro,
          "cost_ms_one_thread": {"pose_p50": round(percentile(pose_ms[1:], 50), 1),
                                 "saliency_p50": round(percentile(saliency_ms[1:], 50), 1),
                                 "timed_photos": len(pose_ms)},
          "segmentation_head_pixel_iou": "benchmarks/results/garment_crop.json street_iou (pixel IoU at 14 x 14, "
                                         "held-out photos; not the same measure as box IoU)",
          "machine": machine(), "command": " ".join(["crop_boxes.py", *sys.argv[1:]])})


if __name__ == "__main__":
    main()
