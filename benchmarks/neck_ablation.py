"""Ablations of thesis A's heads on our data: one training run per variant, JSON out.

Each variant is the base config plus ``--set`` overrides, trained with ``fashionlens train``'s
own code (so a row's command is ``fashionlens train BASE --set ... --out RUNS/NAME``). Runs
resume, so an interrupted sweep is continued by running the same command again. The row
reports the epoch with the best cross-domain validation (``query_top1``: consumer
``validation/`` -> catalog) and, at that epoch, the held-out catalog identities' hit rate.

    python benchmarks/neck_ablation.py configs/necks-cached-cpu.yaml --runs runs/ablation \
        [--only NAME ...] [--set key=value ...]      # extra overrides for every variant

The untrained baseline (global average pooling of the same frozen maps, nothing trained) is
row ``gap_untrained``.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

from _common import emit, sweep_args

GAP_LAN = "model.neck={type: multi, necks: {gap: {type: gap}, lan: {type: lan, branches: 4, dim: 256}}}"
GAP_HALF_LAN = ("model.neck={type: multi, necks: {gap: {type: gap}, lan: {type: lan, branches: 4, dim: 256}}, "
                "weights: {lan: 0.5}}")


def lan(k: int = 4, d: int = 256, spatial: bool = True, channel: bool = True) -> str:
    return (f"model.neck={{type: lan, branches: {k}, dim: {d}, spatial: {str(spatial).lower()}, "
            f"channel: {str(channel).lower()}}}")


VARIANTS: dict[str, list[str]] = {
    # losses (K=4, d=256)
    "loss_triplet": [lan()],
    "loss_id": [lan(), "triplet=0", "identity=1"],
    "loss_triplet_id": [lan(), "identity=1"],
    "loss_triplet_nonzero": [lan(), "reducer=nonzero"],
    # attention (K=1)
    "att_none_k1": [lan(1, 256, False, False)],
    "att_spatial_k1": [lan(1, 256, True, False)],
    "att_channel_k1": [lan(1, 256, False, True)],
    "att_both_k1": [lan(1, 256, True, True)],
    # branches (d=256)
    "k2": [lan(2)],
    "k8": [lan(8)],
    # branch dimension (K=4)
    "d128": [lan(4, 128)],
    "d512": [lan(4, 512)],
    # stripes and rings beside the local alignment branches
    "lan_stripes": ["model.neck={type: multi, necks: {lan: {type: lan, branches: 4, dim: 256}, "
                    "stripes: {type: stripes, parts: [2, 3], dim: 128}}}", "identity=1"],
    "lan_rings": ["model.neck={type: multi, necks: {lan: {type: lan, branches: 4, dim: 256}, "
                  "rings: {type: rings, rings: 3, dim: 128}}}"],
    "lan_stripes_rings": ["model.neck={type: multi, necks: {lan: {type: lan, branches: 4, dim: 256}, "
                          "stripes: {type: stripes, parts: [2, 3], dim: 128}, rings: {type: rings, rings: 3, dim: 128}}}",
                          "identity=1"],
    # the ImageNet pooled feature kept beside the learned branches
    "gap_plus_lan": [GAP_LAN],
    # identities: articleType alone (what the consumer -> catalog measure asks for)
    "ident_type": [lan(), "identity_columns=[articleType]", "val_fraction=0"],
    # the recipe of configs/train-cpu.yaml on cached maps: GAP + 0.5 x LAN, articleType, triplet + ID
    "recipe_gap_half_lan_type": [GAP_HALF_LAN, "identity_columns=[articleType]", "val_fraction=0", "identity=1"],
    "recipe_crop": [GAP_HALF_LAN, "identity_columns=[articleType]", "val_fraction=0", "identity=1",
                    "augment={crop: 0.5}"],
}


def best_row(metrics: Path) -> dict:
    from fashionlens.training.validation import summary_of

    with open(metrics, newline="") as fh:
        rows = list(csv.DictReader(fh))
    key = "query_top1" if rows and rows[0].get("query_top1") else "val_top1"
    best = max(rows, key=lambda r: float(r[key] or "-inf"))
    num = lambda v: None if v in (None, "") else float(v)  # noqa: E731
    return {"best_epoch": int(best["epoch"]), "epochs": len(rows),
            **{k: num(best[k]) for k in ("val_top1", "val_top4")}, **summary_of(best),
            "last_query_top1": num(rows[-1]["query_top1"]),
            "images_per_second": num(rows[-1]["images_per_second"]),
            "train_seconds": round(sum(float(r["seconds"]) for r in rows), 1)}


def untrained_gap(cfg) -> dict:
    """GAP of the frozen, cached maps: the embedded default's embedding, nothing trained; on the
    consumer queries and on the held-out catalog identities of the same split as the runs."""
    from fashionlens.models.builder import build_model
    from fashionlens.training.identities import make_split
    from fashionlens.training.feature_cache import FeatureCache
    from fashionlens.training.model_outputs import make_embed
    from fashionlens.training.validation import QueryValidation, identity_hit_rate

    q = QueryValidation.load(cfg.val_queries, cfg.val_mapping, cfg.catalog, cfg.val_field)
    split = make_split(cfg.catalog, cfg.identity_columns, cfg.min_images_per_identity, cfg.val_fraction,
                       cfg.seed, cfg.max_val_images)
    model, data_cfg = build_model(cfg.model.model_copy(update={"neck": {"type": "gap"}, "num_identities": None}))
    cache = FeatureCache.for_model(cfg.feature_cache, cfg.model, int(data_cfg["input_size"][-1]))
    cache.ensure(q.all_paths() + [p for p, _ in split.val])
    gap = make_embed(model, "cpu", cache, None)  # NaN rows for images the cache could not read
    held_out = [p for p, _ in split.val]
    ident = identity_hit_rate(gap(held_out), [lab for _, lab in split.val]) if held_out else {}
    return {**q.evaluate(gap), **ident}


def main() -> None:
    args = sweep_args(__doc__, "runs/ablation")

    from fashionlens.training import load_train_config, train

    names = args.only or ["gap_untrained", *VARIANTS]
    unknown = [n for n in names if n != "gap_untrained" and n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: gap_untrained, {', '.join(VARIANTS)}")
    rows = {}
    for name in names:
        if name == "gap_untrained":
            rows[name] = {**untrained_gap(load_train_config(args.config, args.sets)), "command": "(no training)"}
            print(name, rows[name], file=sys.stderr, flush=True)
            continue
        sets = VARIANTS[name] + args.sets
        out = Path(args.runs) / name
        cfg = load_train_config(args.config, sets, out=str(out))
        t0 = time.time()
        train(cfg)
        rows[name] = {**best_row(out / "metrics.csv"), "wall_seconds": round(time.time() - t0, 1),
                      "command": f"fashionlens train {args.config} " + " ".join(f"--set '{s}'" for s in sets)
                      + f" --out {out}"}
        print(name, rows[name], file=sys.stderr, flush=True)
    emit({"benchmark": "neck_ablation", "config": args.config, "variants": rows})


if __name__ == "__main__":
    main()
