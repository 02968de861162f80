"""Retrieval metrics: top-k hit rate (the retrieval method's metric, docs/METHODS.md), recall@k and mAP@k.

The input model, per query:

* ``hits``: the ranked results as booleans, ``hits[i]`` is true when result ``i`` (rank
  ``i + 1``) is relevant. Its length is the number of results retrieved, which may be shorter
  than ``k`` when the gallery is small; missing ranks count as misses.
* ``n_relevant``: how many relevant items the whole gallery holds (may exceed the number
  retrieved). Queries with ``n_relevant == 0`` have no correct answer at all; the single-query
  functions return 0 for them, and :class:`MetricAccumulator` leaves them out of every average
  and counts them as ``n_without_relevant`` instead.
* ``category``: a label (e.g. the articleType) for the per-category breakdown.

:class:`MetricAccumulator` aggregates query by query, so an evaluator never has to hold all
rankings in memory. Its :meth:`~MetricAccumulator.summary` is a plain, JSON-ready dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

DEFAULT_KS: tuple[int, ...] = (1, 4, 10, 20)
OVERALL = "overall"
METRICS = ("hit_rate", "recall", "map")


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


def _check_relevant(hits: Sequence[bool], n_relevant: int) -> None:
    if n_relevant < 0:
        raise ValueError(f"n_relevant must not be negative, got {n_relevant}")
    found = sum(1 for h in hits if h)
    if found > n_relevant:
        raise ValueError(f"{found} relevant results retrieved but n_relevant is {n_relevant}")


def hit_rate_at_k(hits: Sequence[bool], k: int) -> float:
    """Top-k hit rate of one query: 1.0 if any of the first ``k`` results is relevant, else 0.0."""
    _check_k(k)
    return 1.0 if any(hits[:k]) else 0.0


def recall_at_k(hits: Sequence[bool], n_relevant: int, k: int) -> float:
    """Fraction of all ``n_relevant`` relevant gallery items found in the first ``k`` results.

    Returns 0.0 when ``n_relevant == 0``; the aggregator excludes such queries from averages.
    """
    _check_k(k)
    _check_relevant(hits, n_relevant)
    if n_relevant == 0:
        return 0.0
    return sum(1 for h in hits[:k] if h) / n_relevant


def average_precision_at_k(hits: Sequence[bool], n_relevant: int, k: int) -> float:
    """AP@k = (1 / min(k, n_relevant)) * sum over ranks i <= k of precision@i * rel_i.

    Normalising by ``min(k, n_relevant)`` makes a perfect top-k ranking score 1.0 even when the
    gallery holds more relevant items than ``k``. Returns 0.0 when ``n_relevant == 0``.
    """
    _check_k(k)
    _check_relevant(hits, n_relevant)
    if n_relevant == 0:
        return 0.0
    found = 0
    total = 0.0
    for i, h in enumerate(hits[:k], start=1):
        if h:
            found += 1
            total += found / i
    return total / min(k, n_relevant)


@dataclass
class _Sums:
    """Running sums for one group of queries (a category, or all of them)."""

    n_queries: int = 0
    n_without_relevant: int = 0
    hit_rate: dict[int, float] = field(default_factory=dict)
    recall: dict[int, float] = field(default_factory=dict)
    map: dict[int, float] = field(default_factory=dict)

    def add(self, per_k: dict[int, tuple[float, float, float]]) -> None:
        self.n_queries += 1
        for k, (hit, rec, ap) in per_k.items():
            self.hit_rate[k] = self.hit_rate.get(k, 0.0) + hit
            self.recall[k] = self.recall.get(k, 0.0) + rec
            self.map[k] = self.map.get(k, 0.0) + ap

    def means(self, ks: Sequence[int]) -> dict:
        n = self.n_queries
        out: dict = {"n_queries": n, "n_without_relevant": self.n_without_relevant}
        for name in METRICS:
            sums = getattr(self, name)
            out[name] = {str(k): (sums.get(k, 0.0) / n if n else None) for k in ks}
        return out


class MetricAccumulator:
    """Streaming aggregate of hit rate, recall and mAP at several cut-offs ``ks``.

    Call :meth:`add` once per query, then :meth:`summary`. Memory grows with the number of
    categories, not with the number of queries. ``k_max`` is the number of results the
    evaluator retrieves per query; when left out it is the longest ``hits`` list seen. Cut-offs
    above it are dropped from the summary (they would repeat the value at ``k_max``).
    """

    def __init__(self, ks: Iterable[int] = DEFAULT_KS, k_max: int | None = None) -> None:
        self._ks = sorted(set(int(k) for k in ks))
        if not self._ks:
            raise ValueError("ks must name at least one cut-off")
        for k in self._ks:
            _check_k(k)
        if k_max is not None and k_max < 0:
            raise ValueError(f"k_max must not be negative, got {k_max}")
        self._k_max = k_max
        self._longest = 0
        self._overall = _Sums()
        self._categories: dict[str, _Sums] = {}

    def add(self, category: str, hits: Sequence[bool], n_relevant: int) -> None:
        """Add one query: its category, ranked relevance flags and the gallery's relevant count."""
        hits = [bool(h) for h in hits]
        _check_relevant(hits, n_relevant)
        self._longest = max(self._longest, len(hits))
        cat = self._categories.setdefault(str(category), _Sums())
        if n_relevant == 0:
            cat.n_without_relevant += 1
            self._overall.n_without_relevant += 1
            return
        # One pass over the ranking gives every cut-off: running count of relevant results and
        # running sum of precision@i at the relevant ranks.
        per_k: dict[int, tuple[float, float, float]] = {}
        found = 0
        ap_sum = 0.0
        pending = iter(self._ks)
        k = next(pending)
        for i in range(1, self._ks[-1] + 1):
            if i <= len(hits) and hits[i - 1]:
                found += 1
                ap_sum += found / i
            if i == k:
                per_k[k] = (
                    1.0 if found else 0.0,
                    found / n_relevant,
                    ap_sum / min(k, n_relevant),
                )
                k = next(pending, None)
                if k is None:
                    break
        cat.add(per_k)
        self._overall.add(per_k)

    @property
    def ks(self) -> list[int]:
        """The cut-offs the summary reports: the requested ones that do not exceed ``k_max``."""
        limit = self._k_max if self._k_max is not None else self._longest
        return [k for k in self._ks if k <= limit]

    def summary(self) -> dict:
        """JSON-ready results.

        ``{"ks": [...], "overall": {...}, "macro": {...}, "per_category": {name: {...}}}`` where
        each group holds ``n_queries`` (queries with at least one relevant item, the ones
        averaged), ``n_without_relevant`` (skipped), and ``hit_rate``, ``recall`` and ``map``
        as ``{str(k): mean}``. ``overall`` averages over queries; ``macro`` averages the
        per-category means over the ``n_categories`` categories that have queries. A mean over
        no queries is ``None``.
        """
        ks = self.ks
        per_category = {name: s.means(ks) for name, s in sorted(self._categories.items())}
        scored = [c for c in per_category.values() if c["n_queries"]]
        macro: dict = {"n_categories": len(scored)}
        for name in METRICS:
            macro[name] = {
                str(k): (sum(c[name][str(k)] for c in scored) / len(scored) if scored else None)
                for k in ks
            }
        return {
            "ks": ks,
            OVERALL: self._overall.means(ks),
            "macro": macro,
            "per_category": per_category,
        }


def summarize(
    queries: Iterable[tuple[str, Sequence[bool], int]],
    ks: Iterable[int] = DEFAULT_KS,
    k_max: int | None = None,
) -> dict:
    """Summarise ``(category, hits, n_relevant)`` triples; see :meth:`MetricAccumulator.summary`."""
    acc = MetricAccumulator(ks, k_max=k_max)
    for category, hits, n_relevant in queries:
        acc.add(category, hits, n_relevant)
    return acc.summary()
