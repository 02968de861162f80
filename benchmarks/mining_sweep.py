"""Cross-domain mining, first round: a sweep of m, i, j (thesis A, figure 3.13) and other
settings, each variant one ``fashionlens adapt CONFIG --rounds 1 --set ...`` run; JSON out.

Every row reports the round's validation (the run's ``train.val_queries``, e.g. consumer
``validation/`` -> catalog) at its best epoch, round 0's for comparison, and the mining's
pseudo-label precision when ``target_labels`` is on. Runs resume (an interrupted sweep is
continued by running the same command again).

    python benchmarks/mining_sweep.py configs/adapt-frozen-cpu.yaml --runs runs/mining-sweep \
        [--only NAME ...] [--set key=value ...]      # extra overrides for every variant
    python benchmarks/mining_sweep.py configs/adapt-cpu.yaml --runs runs/mining-sweep-tail \
        --only source_m5 source_m10 source_m20 source_m10_share07 --set train.epochs=4

Every variant names its own m (the configs' m differ: 10 in adapt-frozen-cpu.yaml, 20 in
adapt-cpu.yaml since 2026-12-01); the ``source_*`` runs were made with 4 epochs a round.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from _common import chosen, emit, sweep_args

VARIANTS: dict[str, list[str]] = {
    # the thesis' choice
    "m10_i30_j40": ["m=10"],
    # m: how many top ranks become positives
    "m5_i30_j40": ["m=5"],
    "m20_i30_j40": ["m=20"],
    # i..j: where the negatives come from (consumer categories hold ~300 photos each here)
    "m10_i100_j110": ["m=10", "i=100", "j=110"],
    "m10_i300_j310": ["m=10", "i=300", "j=310"],
    "m10_i1000_j1010": ["m=10", "i=1000", "j=1010"],
    # how much of a batch the mined identities take (None: all identities alike, as the thesis)
    "m10_i30_j40_share30": ["m=10", "mined_share=0.3"],
    "m10_i300_j310_share30": ["m=10", "i=300", "j=310", "mined_share=0.3"],
    # assign=source (groups voted onto catalog identities; i..j unused): m and the vote
    "source_m5": ["assign=source", "vote_min_share=0.5", "train.ema=null", "m=5"],
    "source_m10": ["assign=source", "vote_min_share=0.5", "train.ema=null", "m=10"],
    "source_m20": ["assign=source", "vote_min_share=0.5", "train.ema=null", "m=20"],
    "source_m10_share07": ["assign=source", "vote_min_share=0.7", "train.ema=null", "m=10"],
}
# rows not named source_* run the thesis' own mining (assign=new), whatever the base config says


def main() -> None:
    args = sweep_args(__doc__, "runs/mining-sweep")

    from fashionlens.training.adapt import adapt, load_adapt_config
    from fashionlens.training.validation import summary_of

    names = chosen(args.only, VARIANTS, "variants")
    rows = {}
    for name in names:
        sets = (VARIANTS[name] if name.startswith("source_") else ["assign=new", *VARIANTS[name]]) + args.sets
        out = Path(args.runs) / name
        cfg = load_adapt_config(args.config, sets, out=str(out), rounds=1, patience=1)
        t0 = time.time()
        result = adapt(cfg)
        mining = json.loads((out / "round-1" / "mining.json").read_text())
        rows[name] = {
            "round0": summary_of(result[0]),
            "round1": {**summary_of(result[1]), "epoch": result[1].get("epoch")},
            **{k: mining.get(k) for k in ("positive_precision", "negative_same_label")},
            "wall_seconds": round(time.time() - t0, 1),
            "command": f"fashionlens adapt {args.config} --rounds 1 " + " ".join(f"--set '{s}'" for s in sets)
            + f" --out {out}"}
        print(name, rows[name], file=sys.stderr, flush=True)
    emit({"benchmark": "mining_sweep", "config": args.config, "variants": rows})


if __name__ == "__main__":
    main()
