"""Where the tag classifier points (issue 5): on the street photos of the run's ``test`` part
that have garment masks, per tag the pointing game (the peak of the tag's Grad-CAM lies in the
tag's mask; exact, and within 15 pixels) and the IoU of the CAM box with the mask's box; the
mean over garment tags is the goal's figure. JSON out.

    python benchmarks/street_pointing.py runs/street/best
"""

from __future__ import annotations

import argparse
import math
import time

from _common import emit

GARMENTS = ["blazer", "blouse", "boots", "cardigan", "coat", "dress", "heels", "jacket", "jeans", "jumper",
            "leggings", "pants", "shirt", "shoes", "shorts", "skirt", "sneakers", "sweater", "sweatshirt",
            "t-shirt", "top", "vest"]


def _mean(table: dict, tags: list[str], key: str) -> float | None:
    values = [table[t][key] for t in tags if t in table]
    return round(math.fsum(values) / len(values), 4) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--split", default="test")
    parser.add_argument("--box-threshold", type=float, default=0.5)
    parser.add_argument("--min-photos", type=int, default=5, help="tags on fewer test photos are not averaged")
    args = parser.parse_args()

    from fashionlens.data.street import read_labels, read_street
    from fashionlens.evaluation.pointing import evaluate_pointing
    from fashionlens.explain.explainer import AttributeExplainer
    from fashionlens.training.attribute_task import load_attribute_run, read_config_data

    model, cfg, _ = load_attribute_run(args.model)
    if cfg.format != "street":
        raise SystemExit(f"{args.model}: not a street tag classifier (format {cfg.format})")
    data, parts = read_config_data(cfg)
    chosen = {data.images[i] for i in parts[args.split]}
    photos = [p for p in read_street(data.root) if p.image in chosen]
    explainer = AttributeExplainer(model, cfg.loss, args.box_threshold)
    t0 = time.time()
    result = evaluate_pointing(explainer, photos, read_labels(data.root))
    summary = {}
    for key, table in result.items():
        if key.startswith("tolerance_"):
            tags = [t for t in GARMENTS if t in table and table[t]["photos"] >= args.min_photos]
            summary[key] = {"garment_tags": tags, "pointing": _mean(table, tags, "pointing"),
                            "iou": _mean(table, tags, "iou"), "all_tags_pointing": _mean(table, list(table), "pointing")}
    emit({"benchmark": "street_pointing", "model": args.model, "split": args.split, "photos": result["photos"],
          "box_threshold": args.box_threshold, "seconds": round(time.time() - t0, 1), "summary": summary,
          **{k: v for k, v in result.items() if k != "photos"}})


if __name__ == "__main__":
    main()
