"""Issue 3's recipe trained with several seeds, alone and as one ensemble, on buyers' photos.

Each checkpoint is the recipe (frozen Lite0, GAP + 0.5 x local alignment branches); all share the
same GAP part, so the ensemble keeps one GAP and every seed's branches at weight 0.5 / sqrt(S):
its cosine similarity is cos_gap + 0.25 x the seeds' mean branch cosine, the single recipe's
balance. Consumer ``validation/`` -> catalog from the feature cache, or ``--queries`` (another
labelled folder, e.g. ``test/`` once a choice has been made on validation).

    for s in 1 2 3 4; do fashionlens train configs/recipe-cached-cpu.yaml --set ema=null --set seed=$s --out runs/recipe-seed$s; done
    python benchmarks/seed_ensemble.py configs/recipe-cached-cpu.yaml runs/recipe-cached/best runs/recipe-seed{1..4}/best
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from _common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the recipe's cached-training config (catalog, val_queries, feature_cache)")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--gap", default="gap", help="name of the shared GAP neck")
    parser.add_argument("--lan", default="lan", help="name of the per-seed branches' neck")
    parser.add_argument("--lan-weight", type=float, default=0.5)
    parser.add_argument("--queries", help="labelled query folder instead of the config's val_queries")
    args = parser.parse_args()

    from fashionlens.models.checkpoints import load_checkpoint
    from fashionlens.training import load_train_config
    from fashionlens.training.feature_cache import FeatureCache
    from fashionlens.training.model_outputs import make_embed
    from fashionlens.training.validation import QueryValidation

    cfg = load_train_config(args.config, [])
    queries = args.queries or cfg.val_queries
    q = QueryValidation.load(queries, cfg.val_mapping, cfg.catalog, cfg.val_field)
    cache = FeatureCache.for_model(cfg.feature_cache, cfg.model, cfg.model.input_size)
    cache.ensure(q.all_paths())
    paths = q.all_paths()
    row_of = {p: i for i, p in enumerate(paths)}
    gap, branches, rows = None, [], []
    for ckpt in args.checkpoints:
        model, _, _ = load_checkpoint(ckpt)
        dims = {name: neck.out_dim for name, neck in model.neck.necks.items()}
        parts = [F.normalize(make_embed(model, "cpu", cache, None, key=f"{name}.embedding", dim=dims[name])(paths), dim=1)
                 for name in (args.gap, args.lan)]
        if gap is None:
            gap = parts[0]
        elif not torch.allclose(gap, parts[0], atol=1e-4):
            raise SystemExit(f"{ckpt}: its GAP embedding differs from the first checkpoint's (another backbone?)")
        branches.append(parts[1])
        single = torch.cat([gap, args.lan_weight * parts[1]], 1)
        rows.append({"model": ckpt, **q.evaluate(lambda ps, e=single: e[[row_of[p] for p in ps]])})
        print(rows[-1], file=sys.stderr, flush=True)
    scale = args.lan_weight / len(branches) ** 0.5
    ensemble = torch.cat([gap, *(scale * b for b in branches)], 1)
    rows.append({"model": f"ensemble of {len(branches)}", **q.evaluate(lambda ps: ensemble[[row_of[p] for p in ps]])})
    emit({"benchmark": "seed_ensemble", "queries": str(queries), "rows": rows,
          **{f"mean_of_single_{m}": round(sum(r[f"query_{m}"] for r in rows[:-1]) / len(branches), 6)
             for m in ("top1", "top4")}})


if __name__ == "__main__":
    main()
