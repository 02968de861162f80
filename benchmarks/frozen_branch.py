"""A frozen untrained branch beside an adapted model, measured without training: the embedding
is the adapted model's (L2-normalised) concatenated with ``w`` x the untrained default's pooled
feature (L2-normalised), for each weight ``w``; validation figures (overall, macro, worst type,
per type) of each. Measurement only: what the issue's "frozen branch" option would give.

    python benchmarks/frozen_branch.py configs/adapt-cpu.yaml runs/arms/base-s0/round-1/train/best \
        [more checkpoints] --weights 0 0.5 1 [--split ../shared/data/consumer/validation]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    parser.add_argument("--split", help="labelled query folder (default: the config's train.val_queries)")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from fashionlens.training.adapt import load_adapt_config
    from fashionlens.training.retrieval_task import checkpoint_embedder
    from fashionlens.training.validation import QueryValidation

    cfg = load_adapt_config(args.config, args.sets)
    t = cfg.train
    q = QueryValidation.load(args.split or t.val_queries, t.val_mapping, t.catalog, t.val_field)
    paths = q.all_paths()
    quiet = lambda event: None  # noqa: E731

    def table(model: Path, key: str) -> dict[str, torch.Tensor]:
        embed = checkpoint_embedder(t, model, t.device, paths, quiet, key=key)
        vecs = torch.cat([embed(paths[i:i + 2048]) for i in range(0, len(paths), 2048)])
        return {str(p): F.normalize(v, dim=0) for p, v in zip(paths, vecs.float())}

    untrained = table(Path(cfg.init), "gap.embedding")
    rows = []
    for model in args.models:
        adapted = table(model, "embedding")
        for w in args.weights:
            look = lambda ps, w=w, a=adapted: torch.stack([torch.cat([a[str(p)], w * untrained[str(p)]])  # noqa: E731
                                                          for p in ps])
            rows.append({"model": str(model), "weight": w, **q.evaluate(look)})
    emit({"benchmark": "frozen_branch", "config": args.config, "split": args.split or t.val_queries, "rows": rows})


if __name__ == "__main__":
    main()
