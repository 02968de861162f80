"""Consumer photos -> catalog top-k hit rate through `fashionlens evaluate consumer`.

    python benchmarks/retrieval_quality.py INDEX_DIR [--split test] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import SHARED, emit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("index")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="fl-eval-"))
    exe = Path(sys.executable).parent / "fashionlens"
    proc = subprocess.run([str(exe), "evaluate", "consumer", str(SHARED / "consumer" / args.split),
                           "--index", args.index, "--mapping", str(SHARED / "consumer" / "catalog_types.csv"),
                           "--out", str(out)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    summary = json.loads((out / "metrics.json").read_text())
    overall = summary["overall"]
    emit({"benchmark": "retrieval_quality", "queries": f"consumer/{args.split}", "index": args.index,
          "model": summary["index"]["embedder"]["model"], "n_queries": overall["n_queries"],
          "hit_rate": overall["hit_rate"], "recall": overall["recall"], "map": overall["map"],
          "macro_hit_rate": {k: v for k, v in summary["macro"].get("hit_rate", {}).items()},
          "worst_category_top4": min(((g["hit_rate"]["4"], c) for c, g in summary["per_category"].items()
                                      if g.get("n_queries")), default=(None, None))[::-1],
          "per_category_top1": {c: g["hit_rate"]["1"] for c, g in summary["per_category"].items()},
          "per_category_top4": {c: g["hit_rate"]["4"] for c, g in summary["per_category"].items()},
          "report": str(out / "report.html")})


if __name__ == "__main__":
    main()
