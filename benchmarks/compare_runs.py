"""Compare the metrics files (metrics.csv, rounds.csv, mined.csv) of two trees of reference runs
(benchmarks/reference_runs.sh): every column both have, the timing and path columns aside.

    python benchmarks/compare_runs.py RUNS_BEFORE RUNS_AFTER
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from _common import emit

SKIP = {"seconds", "images_per_second", "model", "trained_from", "mined_with"}  # timings, and paths of the run folder


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    files = []
    for path in sorted(args.before.rglob("*.csv")):
        other = args.after / path.relative_to(args.before)
        entry = {"file": str(path.relative_to(args.before))}
        if not other.is_file():
            files.append({**entry, "same": False, "missing": True})
            continue
        a, b = rows(path), rows(other)
        columns = [c for c in (a[0] if a else {}) if c in (b[0] if b else {}) and c not in SKIP]
        diffs = [{"row": i, "column": c, "before": ra[c], "after": rb[c]}
                 for i, (ra, rb) in enumerate(zip(a, b)) for c in columns if ra[c] != rb[c]]
        files.append({**entry, "rows": len(a), "columns": len(columns), "same": len(a) == len(b) and not diffs,
                      "only_in_one": sorted(set(a[0] if a else {}) ^ set(b[0] if b else {})), "differences": diffs[:5]})
    emit({"benchmark": "compare_runs", "before": str(args.before), "after": str(args.after),
          "files": len(files), "same": sum(f["same"] for f in files), "runs": files})


if __name__ == "__main__":
    main()
