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

    @classmethod
    def load(cls, queries: str | Path, mapping: str | Path, gallery: str | Path, field: str) -> QueryValidation:
        rel = consumer_relevance(read_label_mapping(Path(mapping)), field)
        q_items = [it for it in open_catalog(Path(queries)) if not isinstance(it, Missing)]
        if not q_items:
            raise UserError(f"{queries}: no query images")
        g_items = [it for it in open_catalog(Path(gallery)) if not isinstance(it, Missing)]
        if not any(str(it.metadata.get(field, "") or "").strip() for it in g_items):
            raise UserError(f"{gallery}: no catalog item has a value in the column {field!r} (val_field)")
        return cls([Path(it.path) for it in q_items], [rel(it).values for it in q_items],
                   [Path(it.path) for it in g_items], [str(it.metadata.get(field, "")) for it in g_items])

    def all_paths(self) -> list[Path]:
        return self.query_paths + self.gallery_paths

    @torch.no_grad()
    def hits(self, embed: Embed, k: int = 4, chunk: int = 2048) -> torch.Tensor:
        """(queries, min(k, gallery size)) bool: whether each query's i-th nearest gallery image is a
        hit; the rows of queries that could not be embedded are left out (exact search, the gallery
        in chunks)."""
        q = embed(self.query_paths).float()
        q_ok = ~torch.isnan(q).any(dim=1)  # queries that could not be embedded are left out
        q = torch.nn.functional.normalize(q[q_ok], dim=1)
        query_ok = [ok for ok, keep in zip(self.query_ok, q_ok.tolist()) if keep]
        k_max = min(k, len(self.gallery_paths))
        if not len(q):
            return torch.zeros((0, k_max), dtype=torch.bool)
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
        return torch.tensor([[self.gallery_values[j] in ok and s > float("-inf") for j, s in zip(row, srow)]
                             for row, srow, ok in zip(best_i.tolist(), best_s.tolist(), query_ok)],
                            dtype=torch.bool).reshape(len(q), -1)

    def evaluate(self, embed: Embed, ks=(1, 4), chunk: int = 2048, prefix: str = "query") -> dict:
        hits = self.hits(embed, max(ks), chunk)
        if not len(hits):
            return {f"{prefix}_top{k}": None for k in ks}
        return {f"{prefix}_top{k}": round(float(hits[:, :k].any(1).float().mean()), 6) for k in ks}


def validation_row(embed: Embed, val_samples, queries: QueryValidation | None) -> dict:
    """One epoch's validation: held-out identities (``val_top*``) and, with ``queries``, the
    labelled query photos against the whole catalog (``query_top*``)."""
    row = identity_hit_rate(embed([p for p, _ in val_samples]), [label for _, label in val_samples])
    if queries is not None:
        row.update(queries.evaluate(embed))
    return row
