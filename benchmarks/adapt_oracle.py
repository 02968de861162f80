"""How much could cross-domain pseudo-labels give at best? One adaptation round (the training
of ``fashionlens adapt CONFIG``'s rounds, from its ``init``) with target photos labelled in
several ways, each run's best epoch on the config's validation queries; JSON out.

Arms (each target photo joins one *source* identity, as ``assign=source`` groups do; vote_k and
m come from the config: 20 and 10 in the runs of 2026-12-01, hence ``--set m=10`` below since the
config's m became 20; the thresholds are fixed per arm, not the config's):

- ``oracle``: every target photo joins a source identity that its true label allows (the
  label mapping of ``train.val_mapping``; among the allowed ones, the one most frequent among
  its ``vote_k`` nearest source photos under the init model, else the allowed identity of its
  nearest source photo). **This uses the target's labels to train**: it is an upper bound of
  what any label-free pseudo-labelling of this form can reach, never a method.
- ``photo_vote``: label-free; every target photo alone joins the source identity that at least
  half of its ``vote_k`` nearest source photos hold (others are left out); the mining groups'
  vote without the groups (``assign=photo`` with m = 0).
- ``oracle_filter_vote``: the ``photo_vote`` assignments with the wrong ones removed (labels
  used): how much is lost to the vote's errors as opposed to its coverage.
- ``neighbour_vote_0.3`` / ``_0.5``: label-free, ``assign=photo``: the vote pools the ``vote_k``
  nearest source photos of the photo and of its ``m`` nearest target photos; the photo is kept
  when its identity holds at least 0.3 / 0.5 of the votes.
- ``m0_0.3``, ``m5_0.3``, ``m20_0.3``: the same at 0.3 with m = 0, 5, 20 (a sweep of m).

Every arm reports its precision (share of assigned photos whose label allows the identity) and
coverage. Runs resume; ``--only`` picks arms.

    python benchmarks/adapt_oracle.py configs/adapt-cpu.yaml --runs runs/adapt-oracle --set train.ema=null \
        --set m=10 --set train.epochs=4
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from _common import chosen, emit, sweep_args

BASE = ("oracle", "photo_vote", "oracle_filter_vote", "neighbour_vote_0.3", "neighbour_vote_0.5")
SWEEP = {"m0_0.3": (0, 0.3), "m5_0.3": (5, 0.3), "m20_0.3": (20, 0.3)}  # assign=photo: (m, vote_min_share)
ARMS = BASE + tuple(SWEEP)


def _best(metrics_csv: Path, metric: str) -> tuple[dict, list[float], float]:
    """The best epoch's validation, the metric per epoch, and the training's seconds."""
    from fashionlens.training.validation import summary_of

    with open(metrics_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(metric) not in (None, "")]
    best = max(rows, key=lambda r: float(r[metric]))
    return (summary_of(best) | {"epoch": int(best["epoch"])},
            [float(r[metric]) for r in rows], round(sum(float(r["seconds"]) for r in rows), 1))


def main() -> None:
    args = sweep_args(__doc__, "runs/adapt-oracle")

    from fashionlens.evaluation.protocols import read_label_mapping
    from fashionlens.training.adapt import _embedder, evaluate_checkpoint, load_adapt_config
    from fashionlens.training.identities import MinedIdentities, split_for
    from fashionlens.training.mining import SourceVote, TargetPhotos, vote_photos
    from fashionlens.training.retrieval_task import train
    from fashionlens.training.validation import summary_of

    names = chosen(args.only, ARMS, "arms")
    cfg = load_adapt_config(args.config, args.sets)
    t = cfg.train
    if not t.val_mapping or t.identity_columns != [t.val_field]:
        sys.exit("the oracle needs train.val_mapping and identities of train.val_field alone")
    allowed = read_label_mapping(Path(t.val_mapping))
    target = TargetPhotos.read(cfg.target)
    split = split_for(t)
    source_paths = [p for p, _ in split.train]
    source_ids = np.array([split.train_identities[label] for _, label in split.train])
    runs = Path(args.runs)

    def quiet(event: dict) -> None:
        pass

    runs.mkdir(parents=True, exist_ok=True)

    assignments_path = runs / "assignments.json"
    assignments = json.loads(assignments_path.read_text()) if assignments_path.is_file() else {}
    missing = [name for name in names if name not in assignments]
    if missing:
        embed = _embedder(cfg, Path(cfg.init), t.device, target.paths + source_paths, quiet)
        votes_by_m: dict[int, list] = {}

        def voted(m: int) -> list[tuple[str, float] | None]:
            """(top identity, its share) of every target photo, as ``assign=photo`` votes with m."""
            if m not in votes_by_m:
                found = vote_photos(target.paths, embed, runs / ".work",
                                    SourceVote(source_paths, list(source_ids), cfg.vote_k, 0.0), m,
                                    index_type=cfg.index_type, flat_max=cfg.flat_max, seed=cfg.seed)
                votes_by_m[m] = [None] * len(target.paths)
                for row, name, share in zip(found.queries, found.assigned, found.assigned_share):
                    votes_by_m[m][row] = (name, share)
            return votes_by_m[m]

        threshold = lambda votes, thr: [v[0] if v and v[1] >= thr else None for v in votes]  # noqa: E731
        if any(name in BASE for name in missing):
            alone, pooled = voted(0), voted(cfg.group_size)
            tv = torch.nn.functional.normalize(embed(target.paths).float(), dim=1)
            sv = torch.nn.functional.normalize(embed(source_paths).float(), dim=1)
            ok_s = ~torch.isnan(sv).any(1)
            sv, s_ids = sv[ok_s], source_ids[ok_s.numpy()]
            order = (tv.nan_to_num(0) @ sv.T).argsort(dim=1, descending=True).numpy()  # a benchmark: 3k x 10k fits
            oracle = []
            for row, label in enumerate(target.labels):
                if alone[row] is None:  # unreadable
                    oracle.append(None)
                    continue
                ok = [n for n in s_ids[order[row, :cfg.vote_k]].tolist() if n in allowed.get(label, ())]
                if ok:
                    oracle.append(Counter(ok).most_common(1)[0][0])
                else:  # the allowed identity of the nearest source photo that has one
                    hits = np.flatnonzero(np.isin(s_ids[order[row]], list(allowed.get(label, ()))))
                    oracle.append(str(s_ids[order[row, hits[0]]]) if len(hits) else None)
            vote = threshold(alone, 0.5)
            assignments.update({"paths": [str(p) for p in target.paths], "labels": target.labels,
                                "photo_vote": vote, "oracle": oracle,
                                "oracle_filter_vote": [v if v in allowed.get(lab, ()) else None
                                                       for v, lab in zip(vote, target.labels)],
                                **{f"neighbour_vote_{thr}": threshold(pooled, thr) for thr in (0.3, 0.5)}})
        assignments.setdefault("paths", [str(p) for p in target.paths])
        assignments.setdefault("labels", target.labels)
        for name in missing:
            if name in SWEEP:
                m, thr = SWEEP[name]
                assignments[name] = threshold(voted(m), thr)
        assignments_path.write_text(json.dumps(assignments))

    metric = t.best_metric
    round0_path = runs / "round0.json"
    if not round0_path.is_file():
        round0_path.write_text(json.dumps(evaluate_checkpoint(cfg, Path(cfg.init), t.device, quiet)))
    round0 = json.loads(round0_path.read_text())
    rows = {}
    for name in names:
        labelled = assignments[name]
        pairs = [(p, s, lab) for p, s, lab in zip(assignments["paths"], labelled, assignments["labels"]) if s]
        precision = sum(s in allowed.get(lab, ()) for _, s, lab in pairs) / max(1, len(pairs))
        out = runs / name
        if not (out / "done").is_file():
            mined = MinedIdentities([[Path(p)] for p, _, _ in pairs], [[] for _ in pairs], [s for _, s, _ in pairs])
            train(t.model_copy(update={"out": str(out)}), init=Path(cfg.init), mined=mined)
            (out / "done").write_text("")
        best, curve, seconds = _best(out / "metrics.csv", metric)
        rows[name] = {"photos": len(pairs), "coverage": len(pairs) / len(labelled), "precision": round(precision, 4),
                      "identities": dict(Counter(s for _, s, _ in pairs).most_common()),
                      "best": best, f"{metric}_per_epoch": curve, "train_seconds": seconds}
        print(name, {k: v for k, v in rows[name].items() if k != "identities"}, file=sys.stderr, flush=True)
    emit({"benchmark": "adapt_oracle", "config": args.config, "sets": args.sets,
          "round0": summary_of(round0), "arms": rows})


if __name__ == "__main__":
    main()
