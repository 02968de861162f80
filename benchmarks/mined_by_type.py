"""Where the pseudo-labels of a mining round go, garment type by garment type (measurement only:
the target photos' folder labels are read here, never by the mining): for each type, its photos,
the share given a source identity, the share given a correct one (an articleType the label
mapping allows) and the share given to each of the catalog's two largest articleTypes. JSON out.

    python benchmarks/mined_by_type.py runs/adapt/round-1/mined.csv [more mined.csv ...] \
        [--mapping ../shared/data/consumer/catalog_types.csv]
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter, defaultdict
from pathlib import Path

from _common import SHARED, emit

LARGEST = ("Tshirts", "Shirts")  # the shared catalog's two largest articleTypes (1,647 and 1,361 of 9,583)


def by_type(mined_csv: Path, mapping: dict[str, frozenset[str]]) -> dict:
    photos: dict[str, int] = Counter()
    labelled: dict[str, int] = Counter()
    correct: dict[str, int] = Counter()
    to_largest: dict[str, Counter] = defaultdict(Counter)
    with open(mined_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["role"] != "query":
                continue
            label, name = row["label"], row.get("source_identity") or ""
            photos[label] += 1
            if name:
                labelled[label] += 1
                correct[label] += name.split("|")[0] in mapping.get(label, ())
                if name in LARGEST:
                    to_largest[label][name] += 1
    r = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
    types = {t: {"photos": photos[t], "labelled": r(labelled[t], photos[t]), "correct": r(correct[t], photos[t]),
                 **{f"to_{n}": r(to_largest[t][n], photos[t]) for n in LARGEST}} for t in sorted(photos)}
    macro = [v["correct"] for v in types.values()]
    return {"types": types, "correct_macro": round(sum(macro) / len(macro), 4) if macro else None,
            "correct_overall": r(sum(correct.values()), sum(photos.values()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mined", nargs="+", type=Path)
    parser.add_argument("--mapping", type=Path, default=SHARED / "consumer" / "catalog_types.csv")
    args = parser.parse_args()
    from fashionlens.evaluation.protocols import read_label_mapping

    mapping = read_label_mapping(args.mapping)
    emit({"benchmark": "mined_by_type", "runs": {str(p): by_type(p, mapping) for p in args.mined}})


if __name__ == "__main__":
    main()
