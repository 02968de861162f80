"""Cross-domain mining rounds 0..R (thesis A, table 3.4): run ``fashionlens adapt CONFIG``
(resumable), then measure every round's model on held-out labelled query photos; JSON out.

    python benchmarks/adapt_rounds.py configs/adapt-cpu.yaml --out runs/adapt \
        [--test ../shared/data/consumer/test] [--hold-out-types shirt,shoes,t-shirt] [--set key=value ...]

Per round: validation at its best epoch (what chose the round's model: overall, macro over the
garment types, the worst type and every type's top-1 / top-4), pseudo-label precision of the
identities it was trained on (mined with the previous round's model; measurement only) and, with
``--test``, the same figures of ``test`` -> catalog (the ``train.val_mapping`` decides a hit; the
test photos are used for nothing else). The first row, ``round: "untrained"``, is the untrained
default (the ImageNet backbone's pooled feature, the ``gap`` neck of the init model before any
stage it trains) measured the same way: what "gain" is counted against.

``--hold-out-types``: leave-types-out. The target becomes the photos of the other garment
types only (a folder of links under OUT, the sub-folder names being the labels), so the
adaptation never sees a photo of the held-out types; the JSON then reports the held-out types'
figures beside all of them ("helps on types it never saw", measured).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import emit


def leave_types_out(target: Path, held_out: list[str], folder: Path) -> Path:
    """A target folder of links to the photos of every type of ``target`` but ``held_out``."""
    types = sorted(p.name for p in target.iterdir() if p.is_dir())
    missing = sorted(set(held_out) - set(types))
    if missing:
        raise SystemExit(f"--hold-out-types: {missing} are not sub-folders of {target}")
    for name in types:
        if name in held_out:
            continue
        (folder / name).mkdir(parents=True, exist_ok=True)
        for photo in sorted((target / name).iterdir()):
            link = folder / name / photo.name
            if not link.exists():
                link.symlink_to(photo.resolve())
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--test", help="labelled query folder, e.g. consumer/test (none: validation only)")
    parser.add_argument("--hold-out-types", default="", help="comma-separated garment types left out of the target")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override, e.g. rounds=4")
    args = parser.parse_args()

    from fashionlens.training.adapt import adapt, load_adapt_config
    from fashionlens.training.retrieval_task import checkpoint_embedder
    from fashionlens.training.validation import QueryValidation, type_drops

    held_out = [t for t in args.hold_out_types.split(",") if t]
    sets = list(args.sets)
    if held_out:
        base = load_adapt_config(args.config, args.sets, out=args.out)
        target = leave_types_out(Path(base.target), held_out, Path(args.out) / "target-types-kept")
        sets.append(f"target={target}")
    cfg = load_adapt_config(args.config, sets, out=args.out)
    t0 = time.time()
    rows = adapt(cfg)
    wall = round(time.time() - t0, 1)
    t = cfg.train
    val = QueryValidation.load(t.val_queries, t.val_mapping, t.catalog, t.val_field)
    test = QueryValidation.load(args.test, t.val_mapping, t.catalog, t.val_field) if args.test else None
    quiet = lambda event: None  # noqa: E731

    def measure(model: Path, key: str = "embedding") -> dict:
        paths = val.all_paths() + (test.query_paths if test else [])
        embed = checkpoint_embedder(t, model, t.device, paths, quiet, key=key)
        out = {"validation": val.evaluate(embed)}
        if test is not None:
            out["test"] = test.evaluate(embed)
        return out

    untrained = {"round": "untrained", **measure(Path(cfg.init), key="gap.embedding")}
    table = [untrained]
    for row in rows:
        figures = measure(Path(row["model"]))
        table.append({"round": row["round"], **figures,
                      "validation_drop_vs_untrained": type_drops(figures["validation"], untrained["validation"]),
                      **({"test_drop_vs_untrained": type_drops(figures["test"], untrained["test"])} if test else {}),
                      "eligible": row.get("eligible", True),
                      **{k: row.get(k) for k in ("positive_precision", "assigned_groups", "assignment_precision",
                                                 "labelled_photos", "largest_identity_share")},
                      "best_epoch": row.get("epoch"), "model": row["model"]})
    emit({"benchmark": "adapt_rounds", "config": args.config, "test": args.test, "held_out_types": held_out,
          "select": t.best_metric, "wall_seconds": wall, "rounds": table,
          "run": f"fashionlens adapt {args.config} --out {args.out} " + " ".join(f"--set '{s}'" for s in sets),
          "settings": cfg.model_dump(mode="json")})  # as resolved: config file + --set


if __name__ == "__main__":
    main()
