"""Gain of trained checkpoints over a base model on labelled buyers' photos, photo by photo.

Each model ranks the whole catalog for every query photo (exact search on the run's cached maps,
as validation does); a photo's top-1 / top-4 hit is 0 or 1, so a model's gain over the base is the
mean of per-photo differences, with its paired standard error. With several checkpoints (e.g. the
same config trained with several seeds) it also reports the gain of their mean and a bootstrap
interval over the photos: how far the photos alone could move the figure, which more seeds do
not shrink.

    # issue 4: the model each seed's run hands over, against round 0 (the issue-3 recipe)
    python benchmarks/paired_gain.py configs/adapt-cpu.yaml --base runs/recipe-cached/best \\
        --queries ../shared/data/consumer/test --goal 0 3 \\
        runs/adapt-photo-ema-D-seed{0,1,3}/round-4/train/best runs/adapt-photo-ema-D-seed2/round-3/train/best
    # issue 3: trained recipes against the untrained default (the recipe's own GAP part)
    python benchmarks/paired_gain.py configs/recipe-cached-cpu.yaml --base runs/recipe-cached/best \\
        --base-key gap.embedding --queries ../shared/data/consumer/test --goal 5 0 runs/recipe-cached/best runs/recipe-seed{1..3}/best
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _common import emit


def _config(path: str):
    """The run config whose model and feature cache evaluate every checkpoint: a train config,
    or an adapt config's ``train`` part."""
    from fashionlens.config import read_yaml_mapping
    from fashionlens.training import load_train_config
    from fashionlens.training.adapt import load_adapt_config

    if "train" in read_yaml_mapping(Path(path)):
        return load_adapt_config(path, [], out="unused").train
    return load_train_config(path, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="train or adapt config: model, feature cache, catalog, label mapping")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--base", required=True, help="checkpoint of the base model")
    parser.add_argument("--base-key", default="embedding", help="the base's output used as its embedding, "
                        "e.g. gap.embedding = the untrained ImageNet pooled feature of a recipe checkpoint")
    parser.add_argument("--queries", help="labelled query folder (default: the config's val_queries)")
    parser.add_argument("--goal", nargs=2, type=float, metavar=("TOP1", "TOP4"),
                        help="gains in points; the bootstrap share of resamples below each is reported")
    parser.add_argument("--bootstrap", type=int, default=10000)
    args = parser.parse_args()

    from fashionlens.training.retrieval_task import checkpoint_embedder
    from fashionlens.training.validation import QueryValidation

    cfg = _config(args.config)
    queries = args.queries or cfg.val_queries
    q = QueryValidation.load(queries, cfg.val_mapping, cfg.catalog, cfg.val_field)

    def hits(checkpoint: str, key: str = "embedding") -> torch.Tensor:
        """(queries, 2) float: top-1 and top-4 hit of each query photo."""
        embed = checkpoint_embedder(cfg, checkpoint, "cpu", q.all_paths(), lambda event: None, key=key)
        h = q.hits(embed, k=4)
        if len(h) != len(q.query_paths):
            raise SystemExit(f"{checkpoint}: {len(q.query_paths) - len(h)} query photos could not be embedded")
        return torch.stack([h[:, 0], h.any(1)], 1).float()

    def summary(diff: torch.Tensor) -> dict:
        n = len(diff)
        return {f"gain_{m}": round(100 * float(diff[:, c].mean()), 3) for c, m in enumerate(("top1", "top4"))} | {
            f"gain_{m}_se": round(100 * float(diff[:, c].std() / n ** 0.5), 3) for c, m in enumerate(("top1", "top4"))}

    base = hits(args.base, args.base_key)
    rows, diffs = [], []
    for ckpt in args.checkpoints:
        h = hits(ckpt)
        diffs.append(h - base)
        rows.append({"model": ckpt, "top1": round(float(h[:, 0].mean()), 6), "top4": round(float(h[:, 1].mean()), 6),
                     **summary(diffs[-1]), "changed_top4": int((diffs[-1][:, 1] != 0).sum())})
        print(rows[-1], file=sys.stderr, flush=True)
    mean = torch.stack(diffs).mean(0)
    gen = torch.Generator().manual_seed(0)
    boot = torch.stack([mean[torch.randint(len(mean), (len(mean),), generator=gen)].mean(0)
                        for _ in range(args.bootstrap)]) * 100
    result = {"benchmark": "paired_gain", "config": args.config, "queries": str(queries), "photos": len(mean),
              "base": {"model": args.base, "key": args.base_key, "top1": round(float(base[:, 0].mean()), 6),
                       "top4": round(float(base[:, 1].mean()), 6)},
              "models": rows, "mean_of_models": summary(mean),
              "bootstrap_90": {m: [round(float(boot[:, c].quantile(0.05)), 2), round(float(boot[:, c].quantile(0.95)), 2)]
                               for c, m in enumerate(("top1", "top4"))}}
    if args.goal:
        result["bootstrap_share_below_goal"] = {m: round(float((boot[:, c] < g).float().mean()), 4)
                                               for c, (m, g) in enumerate(zip(("top1", "top4"), args.goal))}
    emit(result)


if __name__ == "__main__":
    from fashionlens.errors import UserError

    try:
        main()
    except UserError as exc:  # a wrong path or a checkpoint of another model: one line, exit 1
        raise SystemExit(f"error: {exc}") from None
