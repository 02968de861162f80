"""Cross-domain mining rounds 0..R (thesis A, table 3.4): run ``fashionlens adapt CONFIG``
(resumable), then measure every round's model on held-out labelled query photos; JSON out.

    python benchmarks/adapt_rounds.py configs/adapt-cpu.yaml --out runs/adapt \
        --test ../shared/data/consumer/test [--set key=value ...]

Per round: validation at its best epoch (what chose the round's model), pseudo-label precision
of the identities it was trained on (mined with the previous round's model; measurement only),
and ``test`` -> catalog top-1 / top-4 hit rate (the ``train.val_mapping`` decides a hit). The
test photos are used for nothing else.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--test", required=True, help="labelled query folder, e.g. consumer/test")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override, e.g. rounds=4")
    args = parser.parse_args()

    from fashionlens.training.adapt import _embedder, adapt, load_adapt_config
    from fashionlens.training.validation import QueryValidation

    cfg = load_adapt_config(args.config, args.sets, out=args.out)
    t0 = time.time()
    rows = adapt(cfg)
    wall = round(time.time() - t0, 1)
    t = cfg.train
    test = QueryValidation.load(args.test, t.val_mapping, t.catalog, t.val_field)
    table = []
    for row in rows:
        embed = _embedder(cfg, Path(row["model"]), t.device, test.all_paths(), lambda event: None)
        result = test.evaluate(embed)
        table.append({"round": row["round"],
                      "val_top1": row.get("query_top1"), "val_top4": row.get("query_top4"),
                      "test_top1": result["query_top1"], "test_top4": result["query_top4"],
                      "positive_precision": row.get("positive_precision"),
                      "negative_same_label": row.get("negative_same_label"),
                      "assigned_groups": row.get("assigned_groups"),
                      "assignment_precision": row.get("assignment_precision"),
                      "best_epoch": row.get("epoch"), "model": row["model"]})
    emit({"benchmark": "adapt_rounds", "config": args.config, "test": args.test, "wall_seconds": wall,
          "rounds": table, "run": f"fashionlens adapt {args.config} --out {args.out} "
          + " ".join(f"--set '{s}'" for s in args.sets),
          "settings": cfg.model_dump(mode="json")})  # as resolved: config file + --set


if __name__ == "__main__":
    main()
