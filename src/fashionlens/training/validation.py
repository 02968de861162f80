"""Validation during training, by brute force on embeddings (small sets: no index needed).

* :func:`identity_hit_rate` - held-out catalog identities, each image against the others.
* :class:`QueryValidation` - labelled query photos (e.g. buyers' photos, ``consumer/validation``)
  against the whole catalog, a hit being a catalog item whose ``field`` value the label
  mapping lists for the query's label: the cross-domain measure the issue asks to improve.
  Scored gallery chunk by gallery chunk (running top-k), never as one query x gallery matrix.

``embed(paths) -> (N, D) tensor`` is given by the trainer: from images, or from cached maps.
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
        return cls([Path(it.path) for it in q_items], [rel(it).values for it in q_items],
                   [Path(it.path) for it in g_items], [str(it.metadata.get(field, "")) for it in g_items])

    def all_paths(self) -> list[Path]:
        return self.query_paths + self.gallery_paths

    @torch.no_grad()
    def evaluate(self, embed: Embed, ks=(1, 4), chunk: int = 2048, prefix: str = "query") -> dict:
        q = torch.nn.functional.normalize(embed(self.query_paths).float(), dim=1)
        k_max = min(max(ks), len(self.gallery_paths))
        best_s = torch.full((len(q), 0), float("-inf"))
        best_i = torch.zeros((len(q), 0), dtype=torch.long)
        for start in range(0, len(self.gallery_paths), chunk):
            g = torch.nn.functional.normalize(embed(self.gallery_paths[start:start + chunk]).float(), dim=1)
            s = torch.cat([best_s, q @ g.T], dim=1)
            i = torch.cat([best_i, torch.arange(start, start + len(g)).expand(len(q), -1)], dim=1)
            best_s, pick = s.topk(min(k_max, s.shape[1]), dim=1)
            best_i = i.gather(1, pick)
        hits = torch.tensor([[self.gallery_values[j] in ok for j in row] for row, ok in
                             zip(best_i.tolist(), self.query_ok)], dtype=torch.bool)
        return {f"{prefix}_top{k}": round(float(hits[:, :k].any(1).float().mean()), 6) for k in ks}
