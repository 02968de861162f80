"""Buyers' photos -> catalog with and without the garment crop (issue 28), and the pre-registered
rule of docs/experiments/crop.md applied to the figures.

Settings: whole photos (catalog index without a crop, queries uncut); the crop on the catalog side
only (an index made with ``--crop auto``, queries uncut); both sides; the query side only. Each is
``fashionlens evaluate consumer`` (its metrics.json in ``OUT/eval-CATALOG-qQUERY``; a setting
whose metrics.json exists is read, not rerun, unless ``--force``). Printed: top-1 and top-4
overall, macro over types and per type, the gains over whole photos, and the rule's verdict.

    fashionlens index ../shared/data/catalog --out runs/crop/whole
    fashionlens index ../shared/data/catalog --out runs/crop/auto --crop auto
    python benchmarks/crop_retrieval.py --indexes runs/crop --queries ../shared/data/consumer/validation
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import SHARED, emit, machine

SETTINGS = {"whole": ("whole", "none"), "catalog_crop": ("auto", "none"), "both_crop": ("auto", "auto"),
            "query_crop": ("whole", "auto")}
RISE, MACRO_DROP = 0.015, 0.005  # the rule: top-1 +1.5 points, macro top-1 not down by more than 0.5


def figures(metrics: dict) -> dict:
    top = lambda group, k: round(metrics[group]["hit_rate"][str(k)], 4)  # noqa: E731
    return {"top1": top("overall", 1), "top4": top("overall", 4), "macro_top1": top("macro", 1),
            "macro_top4": top("macro", 4),
            "per_type_top1": {c: round(v["hit_rate"]["1"], 4) for c, v in metrics["per_category"].items()},
            "per_type_top4": {c: round(v["hit_rate"]["4"], 4) for c, v in metrics["per_category"].items()},
            "crop": metrics.get("crop")}


def adopted(new: dict, base: dict) -> bool:
    return new["top1"] - base["top1"] >= RISE and new["macro_top1"] - base["macro_top1"] >= -MACRO_DROP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--indexes", type=Path, default=Path("runs/crop"), help="holding whole/ and auto/")
    parser.add_argument("--queries", type=Path, default=SHARED / "consumer" / "validation")
    parser.add_argument("--mapping", type=Path, default=SHARED / "consumer" / "catalog_types.csv")
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), help="settings to run (default: all)")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    from fashionlens.data.catalog import iter_image_folder
    from fashionlens.evaluation.protocols import EvaluateConfig, consumer_relevance, evaluate_index, read_label_mapping

    items = list(iter_image_folder(args.queries))
    relevance = consumer_relevance(read_label_mapping(args.mapping), "articleType")
    rows = {}
    for name in args.only or SETTINGS:
        catalog, query = SETTINGS[name]
        out = args.indexes / f"eval-{catalog}-q{query}"
        if args.force or not (out / "metrics.json").is_file():
            print(f"{name}: evaluating ({out})", file=sys.stderr, flush=True)
            evaluate_index(args.indexes / catalog, items, relevance, out, EvaluateConfig(crop=query),
                           f"{args.queries.name} -> catalog ({name})")
        rows[name] = figures(json.loads((out / "metrics.json").read_text()))
    base = rows.get("whole")
    verdict = {}
    if base and "catalog_crop" in rows:
        catalog_side = adopted(rows["catalog_crop"], base)
        verdict["catalog_side_auto"] = catalog_side
        if "both_crop" in rows:
            verdict["query_side_auto"] = adopted(rows["both_crop"], rows["catalog_crop"] if catalog_side else base)
    for name, row in rows.items():
        if base and name != "whole":
            row["gain_over_whole_points"] = {k: round(100 * (row[k] - base[k]), 1)
                                             for k in ("top1", "top4", "macro_top1", "macro_top4")}
    emit({"benchmark": "crop_retrieval", "queries": str(args.queries), "model": "the indexes' own (see their "
          "metrics.json)", "rule": f"adopt when top-1 rises >= {RISE * 100:.1f} points and macro top-1 does not "
          f"fall by more than {MACRO_DROP * 100:.1f} (docs/experiments/crop.md)", "settings": rows,
          "verdict": verdict, "machine": machine(), "command": " ".join(["crop_retrieval.py", *sys.argv[1:]])})


if __name__ == "__main__":
    main()
