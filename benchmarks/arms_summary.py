"""Summarise ``adapt_rounds.py`` JSONs arm by arm: the mean over seeds of a round's validation (and
test, where run) figures, overall, macro over the garment types, the worst type, and each type's
top-4 against the untrained default; JSON out, or a Markdown table with ``--markdown``.

    python benchmarks/arms_summary.py benchmarks/results/adapt_arm_*_seed*.json [--round 1] [--markdown]

An arm is the file name up to ``_seed``: ``adapt_arm_prior_seed2.json`` is arm ``prior``, seed 2.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FIGURES = ("query_top1", "query_top4", "query_macro_top1", "query_macro_top4", "query_worst_top4")


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def summarise(paths: list[Path], round_: str) -> dict:
    arms: dict[str, list[tuple[int, dict, dict]]] = {}
    for path in paths:
        m = re.match(r"(?:adapt_arm_)?(.+)_seed(\d+)$", path.stem)
        name, seed = (m.group(1), int(m.group(2))) if m else (path.stem, 0)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # a run still going (its JSON not written yet)
            continue
        rows = {str(r["round"]): r for r in data["rounds"]}
        pick = str(max(int(r) for r in rows if r != "untrained")) if round_ == "last" else round_
        if pick in rows:
            arms.setdefault(name, []).append((seed, rows[pick], rows["untrained"]))
    out = {}
    for name, runs in sorted(arms.items()):
        entry: dict = {"seeds": sorted(s for s, _, _ in runs)}
        for split in ("validation", "test"):
            have = [(r, u) for _, r, u in runs if split in r]
            if not have:
                continue
            types = sorted({k.split(".", 1)[1] for r, _ in have for k in r[split] if k.startswith("query_top4.")})
            entry[split] = {k: _mean([r[split].get(k) for r, _ in have]) for k in FIGURES}
            entry[split]["seeds"] = sorted(s for s, r, _ in runs if split in r)
            entry[split]["per_type_top4"] = {t: _mean([r[split].get(f"query_top4.{t}") for r, _ in have])
                                             for t in types}
            entry[split]["per_type_top4_vs_untrained"] = {
                t: _mean([r[split][f"query_top4.{t}"] - u[split][f"query_top4.{t}"] for r, u in have
                          if r[split].get(f"query_top4.{t}") is not None]) for t in types}
            entry[split]["untrained"] = {k: _mean([u[split].get(k) for _, u in have]) for k in FIGURES}
        out[name] = entry
    return out


def markdown(summary: dict, split: str) -> str:
    arms = {n: e for n, e in summary.items() if split in e}
    if not arms:
        return ""
    types = sorted({t for e in arms.values() for t in e[split]["per_type_top4_vs_untrained"]})
    head = ["arm", "seeds", "top-1 / top-4", "macro top-1 / top-4", "worst type top-4",
            *[f"{t} top-4 vs untrained" for t in types]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = next(iter(arms.values()))[split]["untrained"]
    lines.append(f"| untrained default | - | {first['query_top1']:.3f} / {first['query_top4']:.3f} | "
                 f"{first['query_macro_top1']:.3f} / {first['query_macro_top4']:.3f} | "
                 f"{first['query_worst_top4']:.3f} | "
                 + " | ".join("-" for _ in types) + " |")
    for name, e in arms.items():
        f = e[split]
        seeds = ",".join(map(str, e[split]["seeds"]))
        lines.append(f"| {name} | {seeds} | {f['query_top1']:.3f} / {f['query_top4']:.3f} | "
                     f"{f['query_macro_top1']:.3f} / {f['query_macro_top4']:.3f} | {f['query_worst_top4']:.3f} | "
                     + " | ".join(f"{100 * f['per_type_top4_vs_untrained'][t]:+.1f}"
                                  if f["per_type_top4_vs_untrained"].get(t) is not None else "-" for t in types) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--round", default="1", help="the round to report (a number, or 'last')")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    summary = summarise(args.files, args.round)
    if args.markdown:
        for split in ("validation", "test"):
            table = markdown(summary, split)
            if table:
                print(f"\n{split}\n\n{table}")
    else:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
