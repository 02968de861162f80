"""What mining gives, as files and figures: ``mined.csv`` (written and read), the identities it
holds for training, the cap on the photos one source identity receives, and the measures of the
pseudo-labels (how they spread over the identities; their precision where the target's labels
are known, measurement only)."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fashionlens.errors import UserError
from fashionlens.files import atomic_write_csv
from fashionlens.training.identities import MinedIdentities
from fashionlens.training.mining import Mined, TargetPhotos


def to_identities(mined: Mined, target: TargetPhotos) -> MinedIdentities:
    p = target.paths
    return MinedIdentities([[p[q]] + [p[r] for r in rows] for q, rows in zip(mined.queries, mined.positives)],
                           [[p[r] for r in rows] for rows in mined.negatives], mined.assigned)


def write_mined_csv(path: Path, mined: Mined, target: TargetPhotos, with_labels: bool = False) -> None:
    """``mined.csv`` (see the module docstring), written whole or not at all."""
    voted = mined.assigned is not None
    columns = (["identity", "role", "rank", "score", "path"] + (["label"] if with_labels else [])
               + (["source_identity", "vote_share"] if voted else []))

    def row(ident, role, rank, score, r):
        return ([ident, role, rank, f"{float(score):.6f}", str(target.paths[r])]
                + ([target.labels[r]] if with_labels else [])
                + ([mined.assigned[ident] or "", f"{mined.assigned_share[ident]:.3f}"] if voted else []))

    def rows():
        for ident, q in enumerate(mined.queries):
            yield row(ident, "query", 0, 1.0, q)
            for rank, (r, s) in enumerate(zip(mined.positives[ident], mined.positive_scores[ident]), start=1):
                yield row(ident, "positive", rank, s, r)
            for rank, r, s in zip(mined.negative_ranks[ident], mined.negatives[ident], mined.negative_scores[ident]):
                yield row(ident, "negative", rank, s, r)

    atomic_write_csv(path, columns, rows())


def read_mined_csv(path: Path) -> MinedIdentities:
    """The identities of a ``mined.csv``: query + positives, negatives, and (when the groups
    were voted onto source identities) each one's source identity or None."""
    positives: dict[int, list[Path]] = {}
    negatives: dict[int, list[Path]] = {}
    source: dict[int, str | None] = {}
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            voted = "source_identity" in (reader.fieldnames or [])
            for row in reader:
                ident, role = int(row["identity"]), row["role"]
                if role not in ("query", "positive", "negative"):
                    raise ValueError(f"unknown role {role!r}")
                (negatives if role == "negative" else positives).setdefault(ident, []).append(Path(row["path"]))
                if voted:
                    source[ident] = row["source_identity"] or None
    except (KeyError, ValueError, TypeError, csv.Error) as exc:
        raise UserError(f"{path}: not a mined-identities CSV ({exc})") from None
    order = sorted(set(positives) | set(negatives))
    return MinedIdentities([positives.get(q, []) for q in order], [negatives.get(q, []) for q in order],
                           [source.get(q) for q in order] if voted else None)


def assignment_precision(mined: Mined, labels: Sequence[str], correct: Callable[[str, str], bool]) -> dict:
    """Measurement only, for groups voted onto source identities: ``assigned_share`` = share of
    groups with a source identity; ``assignment_precision`` = share of their photos (query and
    positives) for which ``correct(photo's label, source identity)`` holds."""
    if mined.assigned is None:
        return {}
    hits = total = 0
    for q, rows, name in zip(mined.queries, mined.positives, mined.assigned):
        if name is None:
            continue
        group = [q, *rows.tolist()]
        hits += sum(correct(labels[r], name) for r in group)
        total += len(group)
    n_assigned = sum(a is not None for a in mined.assigned)
    return {"assigned_groups": n_assigned / len(mined.assigned) if mined.assigned else None,
            "assignment_precision": hits / total if total else None}


def cap_assigned(mined: Mined, cap: int) -> None:
    """At most ``cap`` target photos (a group counts its query and positives) join one source
    identity: the entries with the largest vote shares keep it (ties: the earlier), the others
    lose it (None). Changes ``mined`` in place."""
    if mined.assigned is None:
        return
    taken: Counter = Counter()
    order = sorted(range(len(mined.assigned)), key=lambda e: -mined.assigned_share[e])
    for e in order:
        name = mined.assigned[e]
        if name is None:
            continue
        size = 1 + len(mined.positives[e])
        if taken[name] + size > cap:
            mined.assigned[e] = None
        else:
            taken[name] += size


def assignment_counts(mined: Mined, n_target: int) -> dict:
    """How the assigned target photos spread over the source identities: the share of the
    ``n_target`` photos given one (``labelled_photos``), the largest identity's share of them
    (``largest_identity_share``) and each identity's count (``identity_photos``)."""
    if mined.assigned is None:
        return {}
    counts: Counter = Counter()
    for e, name in enumerate(mined.assigned):
        if name is not None:
            counts[name] += 1 + len(mined.positives[e])
    total = sum(counts.values())
    return {"labelled_photos": round(total / n_target, 6) if n_target else None,
            "largest_identity_share": round(max(counts.values()) / total, 6) if total else None,
            "identity_photos": dict(counts.most_common())}


def label_precision(mined: Mined, labels: Sequence[str]) -> dict:
    """Measurement only: ``positive_precision`` = share of mined positives (ranks 1..m) whose
    label is the query's; ``negative_same_label`` = share of mined negatives (ranks i..j) whose
    label is the query's (negatives that are in fact positives at the labels' granularity)."""
    lab = np.asarray(labels)
    pos_same = [lab[rows] == lab[q] for q, rows in zip(mined.queries, mined.positives)]
    neg_same = [lab[rows] == lab[q] for q, rows in zip(mined.queries, mined.negatives)]
    n_pos, n_neg = sum(len(x) for x in pos_same), sum(len(x) for x in neg_same)
    return {
        "positive_precision": float(sum(x.sum() for x in pos_same) / n_pos) if n_pos else None,
        "negative_same_label": float(sum(x.sum() for x in neg_same) / n_neg) if n_neg else None,
        "positives": n_pos, "negatives": n_neg,
    }
