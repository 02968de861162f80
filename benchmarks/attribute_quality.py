"""Attribute classifiers on the held-out part of their split (issue 5): train each config
(resumable: a finished run is only evaluated), then per-attribute accuracy, precision at 0.6
and mAP on ``test``; JSON out, with the goal's figure - the mean accuracy over sleevelength,
neckline, category and collar - and each run's difference to the first (the linear probe).

    python benchmarks/attribute_quality.py configs/attributes-probe-cpu.yaml configs/attributes-cpu.yaml \
        [--set key=value ...]

The test images are used for nothing else: ``best/`` is picked on ``val``.
"""

from __future__ import annotations

import argparse
import time

from _common import emit

GOAL = ["sleevelength_labels", "neckline_labels", "category_labels", "collar_labels"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override for every config")
    parser.add_argument("--split", default="test")
    parser.add_argument("--flip", action="store_true", help="also evaluate with mirror-image averaging")
    args = parser.parse_args()

    from fashionlens.evaluation.attribute_metrics import mean_over
    from fashionlens.training.attribute_task import (
        evaluate_rows,
        load_attribute_run,
        read_config_data,
        train_attributes,
    )
    from fashionlens.training.config import load_attribute_config

    runs = []
    for path in args.configs:
        cfg = load_attribute_config(path, args.sets)
        t0 = time.time()
        last = train_attributes(cfg)
        model, _, extra = load_attribute_run(f"{cfg.out}/best")
        data, parts = read_config_data(cfg)
        metrics = evaluate_rows(model, data, parts[args.split], cfg.loss, cfg.threshold, "cpu")
        runs.append({"config": path, "out": cfg.out, "best_epoch": extra["epoch"], "epochs": cfg.epochs,
                     "train_seconds_this_call": round(time.time() - t0, 1),
                     "seconds_per_epoch": last.get("seconds"), "images": extra["split"],
                     "val_accuracy": extra["metrics"]["val_accuracy"],
                     "goal_accuracy": mean_over(metrics, GOAL), "goal_map": mean_over(metrics, GOAL, "mAP"),
                     args.split: metrics})
        if args.flip:
            flipped = evaluate_rows(model, data, parts[args.split], cfg.loss, cfg.threshold, "cpu", flip=True)
            val = evaluate_rows(model, data, parts["val"], cfg.loss, cfg.threshold, "cpu", flip=True)
            plain = evaluate_rows(model, data, parts["val"], cfg.loss, cfg.threshold, "cpu")
            runs[-1].update({"flip_val_accuracy": val["mean"]["accuracy"], "plain_val_accuracy": plain["mean"]["accuracy"],
                             "flip_val_goal_accuracy": mean_over(val, GOAL), "plain_val_goal_accuracy": mean_over(plain, GOAL), "flip_goal_accuracy": mean_over(flipped, GOAL),
                             "flip_goal_map": mean_over(flipped, GOAL, "mAP"), f"flip_{args.split}": flipped})
    base = runs[0]["goal_accuracy"]
    for run in runs:
        run["goal_accuracy_minus_first"] = (round(run["goal_accuracy"] - base, 4)
                                            if None not in (base, run["goal_accuracy"]) else None)
    emit({"benchmark": "attribute_quality", "split": args.split, "goal_attributes": GOAL, "runs": runs})


if __name__ == "__main__":
    main()
