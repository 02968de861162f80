"""Validation during training, by brute force on embeddings (small sets: no index needed).

* :func:`identity_hit_rate` - held-out catalog identities, each image against the others.
* :class:`QueryValidation` - labelled query photos (e.g. buyers' photos, ``consumer/validation``)
  against the whole catalog, a hit being a catalog item whose ``field`` value the label
  mapping lists for the query's label: the cross-domain measure the issue asks to improve.
  Scored gallery chunk by gallery chunk (running top-k), never as one query x gallery matrix.

``embed(paths) -> (N, D) tensor`` is given by the trainer: from images, or from cached maps; a
NaN row marks an image that could not be embedded (a query left out, a gallery item never ranked).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fashionlens.data.catalog import Missing, open_catalog
from fashionlens.errors import UserError
from fashionlens.evaluation.protocols import consumer_relevance, read_label_mapping

Embed = Callable[[Sequence[Path]], torch.Tensor]


def identity_hit_rate(embeddings: torch.Tensor, labels: Sequence[int], ks=(1, 4), prefix: str = "val") -> dict:
    """Top-k hit rate of every row against the other rows (cosine), labels as identities."""
    ok = ~torch.isnan(embeddings).any(dim=1)  # NaN rows: images that could not be embedded
    embeddings, labels = embeddings[ok], [lab for lab, keep in zip(labels, ok.tolist()) if keep]
    if len(set(labels)) < 2:
        return {f"{prefix}_top{k}": None for k in ks}
    e = torch.nn.functional.normalize(embeddings.float(), dim=1)
    lab = torch.as_tensor(list(labels))
    sim = e @ e.T
    sim.fill_diagonal_(float("-inf"))
    top = sim.topk(min(max(ks), len(lab) - 1), dim=1).indices
    hits = lab[top] == lab[:, None]
    return {f"{prefix}_top{k}": round(float(hits[:, :k].any(1).float().mean()), 6) for k in ks}


@dataclass
class QueryValidation:
    """Query photos with labels, a gallery with one metadata value per image."""

    query_paths: list[Path]
    query_ok: list[frozenset[str]]  # per query: gallery values that count as a hit
    gallery_paths: list[Path]
    gallery_values: list[str]
    query_types: list[str] | None = None  # per query: its garment type (label), for per-type figures

    @classmethod
    def load(cls, queries: str | Path, mapping: str | Path, gallery: str | Path, field: str) -> QueryValidation:
        rel = consumer_relevance(read_label_mapping(Path(mapping)), field)
        q_items = [it for it in open_catalog(Path(queries)) if not isinstance(it, Missing)]
        if not q_items:
            raise UserError(f"{queries}: no query images")
        g_items = [it for it in open_catalog(Path(gallery)) if not isinstance(it, Missing)]
        if not any(str(it.metadata.get(field, "") or "").strip() for it in g_items):
            raise UserError(f"{gallery}: no catalog item has a value in the column {field!r} (val_field)")
        rels = [rel(it) for it in q_items]
        return cls([Path(it.path) for it in q_items], [r.values for r in rels],
                   [Path(it.path) for it in g_items], [str(it.metadata.get(field, "")) for it in g_items],
                   [r.category for r in rels])

    def types(self) -> list[str]:
        """The garment types of the queries, sorted (none without ``query_types``)."""
        return sorted(set(self.query_types or ()))

    def all_paths(self) -> list[Path]:
        return self.query_paths + self.gallery_paths

    @torch.no_grad()
    def hits(self, embed: Embed, k: int = 4, chunk: int = 2048) -> torch.Tensor:
        """(queries, min(k, gallery size)) bool: whether each query's i-th nearest gallery image is a
        hit; the rows of queries that could not be embedded are left out (exact search, the gallery
        in chunks)."""
        return self.typed_hits(embed, k, chunk)[0]

    @torch.no_grad()
    def typed_hits(self, embed: Embed, k: int = 4, chunk: int = 2048) -> tuple[torch.Tensor, list[str]]:
        """:meth:`hits` and the garment type of each of its rows ("" without ``query_types``)."""
        q = embed(self.query_paths).float()
        q_ok = ~torch.isnan(q).any(dim=1)  # queries that could not be embedded are left out
        q = torch.nn.functional.normalize(q[q_ok], dim=1)
        query_ok = [ok for ok, keep in zip(self.query_ok, q_ok.tolist()) if keep]
        types = [t for t, keep in zip(self.query_types or [""] * len(self.query_paths), q_ok.tolist()) if keep]
        k_max = min(k, len(self.gallery_paths))
        if not len(q):
            return torch.zeros((0, k_max), dtype=torch.bool), types
        best_s = torch.full((len(q), 0), float("-inf"))
        best_i = torch.zeros((len(q), 0), dtype=torch.long)
        for start in range(0, len(self.gallery_paths), chunk):
            g = embed(self.gallery_paths[start:start + chunk]).float()
            g_bad = torch.isnan(g).any(dim=1)  # never ranked
            scores = q @ torch.nn.functional.normalize(g.nan_to_num(0.0), dim=1).T
            scores[:, g_bad] = float("-inf")
            s = torch.cat([best_s, scores], dim=1)
            i = torch.cat([best_i, torch.arange(start, start + len(g)).expand(len(q), -1)], dim=1)
            best_s, pick = s.topk(min(k_max, s.shape[1]), dim=1)
            best_i = i.gather(1, pick)
        hits = torch.tensor([[self.gallery_values[j] in ok and s > float("-inf") for j, s in zip(row, srow)]
                             for row, srow, ok in zip(best_i.tolist(), best_s.tolist(), query_ok)],
                            dtype=torch.bool).reshape(len(q), -1)
        return hits, types

    def columns(self, ks=(1, 4), prefix: str = "query") -> list[str]:
        """The names :meth:`evaluate` gives its figures, in order."""
        return type_columns(self.types(), ks, prefix)

    def evaluate(self, embed: Embed, ks=(1, 4), chunk: int = 2048, prefix: str = "query") -> dict:
        """Top-k hit rates over all queries (``query_top1``), their mean over the garment types
        (``query_macro_top1``: every type weighs the same, so a collapse onto the common types
        cannot raise it), the type with the lowest top-k of the largest k (``query_worst_type``,
        ``query_worst_top4``) and each type's own (``query_top4.dress``)."""
        hits, types = self.typed_hits(embed, max(ks), chunk)
        return type_figures(hits, types, self.types(), ks, prefix)


def type_columns(types: Sequence[str], ks=(1, 4), prefix: str = "query") -> list[str]:
    """Column names of :func:`type_figures` for the garment ``types``."""
    k_last = max(ks)
    per_type = [f"{prefix}_top{k}.{t}" for t in types for k in ks]
    summary = ([f"{prefix}_macro_top{k}" for k in ks] + [f"{prefix}_worst_top{k_last}", f"{prefix}_worst_type"]
               if types else [])
    return [f"{prefix}_top{k}" for k in ks] + summary + per_type


def type_figures(hits: torch.Tensor, types: Sequence[str], all_types: Sequence[str], ks=(1, 4),
                 prefix: str = "query") -> dict:
    """Overall, macro, worst-type and per-type top-k hit rates of ``hits`` (queries x ranks, bool),
    row i of type ``types[i]``; every type of ``all_types`` gets its columns (None when it has no
    query). The worst type is the one with the lowest top-max(ks), ties by name."""
    k_last = max(ks)
    row: dict = dict.fromkeys(type_columns(all_types, ks, prefix))
    if not len(hits):
        return row
    rate = lambda h, k: round(float(h[:, :k].any(1).float().mean()), 6)  # noqa: E731
    row.update({f"{prefix}_top{k}": rate(hits, k) for k in ks})
    scored: dict[str, dict[int, float]] = {}
    for t in all_types:
        mask = torch.tensor([x == t for x in types], dtype=torch.bool)
        if mask.any():
            scored[t] = {k: rate(hits[mask], k) for k in ks}
            row.update({f"{prefix}_top{k}.{t}": scored[t][k] for k in ks})
    if scored:
        row.update({f"{prefix}_macro_top{k}": round(sum(s[k] for s in scored.values()) / len(scored), 6) for k in ks})
        worst = min(scored, key=lambda t: (scored[t][k_last], t))
        row.update({f"{prefix}_worst_top{k_last}": scored[worst][k_last], f"{prefix}_worst_type": worst})
    return row


SUMMARY = ("query_top1", "query_top4", "query_macro_top1", "query_macro_top4", "query_worst_top4", "query_worst_type")
"""The figures a report gives of labelled query photos: overall, macro over the types, the worst type."""


def _figure(name: str, value):
    """A figure of a validation or metrics.csv row: a number as a float, the worst type's name as
    it is, an empty field as None."""
    return None if value in (None, "") else (value if name == "query_worst_type" else float(value))


def summary_of(row: dict) -> dict:
    """The :data:`SUMMARY` figures of a validation or metrics.csv row (absent: None)."""
    return {k: _figure(k, row.get(k)) for k in SUMMARY}


def validation_columns(queries: QueryValidation | None) -> list[str]:
    """The columns of :func:`validation_row`."""
    return ["val_top1", "val_top4"] + (queries.columns() if queries is not None else ["query_top1", "query_top4"])


def validation_row(embed: Embed, val_samples, queries: QueryValidation | None) -> dict:
    """One epoch's validation: held-out identities (``val_top*``) and, with ``queries``, the
    labelled query photos against the whole catalog (``query_top*``)."""
    row = identity_hit_rate(embed([p for p, _ in val_samples]), [label for _, label in val_samples])
    if queries is not None:
        row.update(queries.evaluate(embed))
    return row


def round_figures(row: dict) -> dict:
    """The validation figures of a metrics.csv row (numbers as floats; the worst type's name kept)."""
    keep = lambda k: k.startswith(("query_top", "query_macro_", "query_worst_top", "val_top"))  # noqa: E731
    out = {k: _figure(k, v) for k, v in row.items() if keep(k)}
    if row.get("query_worst_type"):
        out["query_worst_type"] = row["query_worst_type"]
    return out


def type_drops(row: dict, start: dict, k: int = 4) -> dict[str, float]:
    """Per garment type: how far ``row``'s validation top-k lies below ``start``'s (negative: a gain)."""
    prefix = f"query_top{k}."
    return {name[len(prefix):]: round(float(start[name]) - float(row[name]), 6) for name in row
            if name.startswith(prefix) and row[name] is not None and start.get(name) not in (None, "")}


def eligible(row: dict, start: dict, max_drop: float | None) -> bool:
    """Whether round ``row`` may be handed over: no type's top-4 more than ``max_drop`` below round 0's."""
    return max_drop is None or all(d <= max_drop + 1e-9 for d in type_drops(row, start).values())
