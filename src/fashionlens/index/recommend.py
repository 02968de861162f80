"""``fashionlens recommend``: items like the ones a user liked, and the attribute values they share.

Recommendation uses only what the index stores: the liked items' stored attribute predictions
give the values they share (an attribute counts when at least ``min_share`` of them, and at least
2 when 2+ are liked, confidently predict the same value); the ``pool`` items nearest to the mean
of the liked items' embeddings are then re-ranked by the mean, over the shared attributes, of the
item's score for the shared value, plus ``visual_weight`` x the cosine similarity of the item's
embedding to that mean. No model runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field

from fashionlens.config import Config
from fashionlens.errors import UserError
from fashionlens.explain.wording import phrase
from fashionlens.index.attribute_store import StoredAttributes
from fashionlens.index.stores import open_store


class RecommendConfig(Config):
    k: int = Field(10, ge=1, le=1000, description="items recommended")
    min_share: float = Field(0.6, gt=0, le=1, description="an attribute value is shared when at least this share "
                             "of the liked items (and 2 of them, when 2+ are liked) confidently predict it")
    min_confidence: float = Field(0.5, ge=0, le=1, description="a prediction counts from this score on")
    visual_weight: float = Field(0.5, ge=0, description="weight of the cosine similarity to the liked items' "
                                 "mean embedding, beside the mean score of the shared values")
    pool: int = Field(1000, ge=1, description="nearest items to the liked items' mean that are re-ranked")


@dataclass
class Recommendation:
    id: str
    score: float
    attribute_score: float
    visual: float
    shares: list[str]
    path: str
    metadata: dict = field(default_factory=dict)


def shared_values(rows: list[list], n_values: dict, cfg: RecommendConfig) -> list[tuple[int, int, int]]:
    """(attribute, value, liked items predicting it) of the values the liked items share:
    per attribute the most frequent confident value (lowest value number on ties), kept when
    its count reaches ``min_share`` of the liked items (and 2 when 2+ are liked); most shared first."""
    n = len(rows)
    needed = max(math.ceil(cfg.min_share * n - 1e-9), 2 if n >= 2 else 1)
    shared = []
    for a in range(len(rows[0])):
        counts = np.zeros(n_values[a], int)
        for row in rows:
            if row[a] is not None and row[a].confidence >= cfg.min_confidence:
                counts[row[a].index] += 1
        if counts.max(initial=0) >= needed:
            shared.append((a, int(counts.argmax()), int(counts.max())))
    return sorted(shared, key=lambda s: -s[2])


def liked_vectors(index, keys: list) -> np.ndarray:
    """The liked items' stored embeddings (exact, any index type), by their store keys."""
    found, vectors = index.vectors(np.asarray(keys))
    at = {k: i for i, k in enumerate(found.tolist())}
    if gone := [k for k in keys if k not in at]:  # removed meanwhile (a server may share the index)
        raise UserError(f"{len(gone)} of the liked items left the index while reading it; try again")
    return vectors[[at[k] for k in keys]]


def recommend(folder: Path | str, liked: list[str], cfg: RecommendConfig) -> tuple[list[dict], list[Recommendation]]:
    """(the shared values, the top ``k`` other items) for the liked item ids, in the store ``folder``."""
    index = open_store(folder)
    try:
        attrs = StoredAttributes(index)
        items = {i: index.get_item(i) for i in dict.fromkeys(liked)}
        if unknown := [i for i, it in items.items() if it is None]:
            raise UserError(f"not in the index {folder}: {', '.join(unknown)}")
        if bad := [i for i, it in items.items() if it["state"] != "embedded"]:
            raise UserError(f"not searchable (unreadable or not embedded yet): {', '.join(bad)}")
        rowids = [it["key"] for it in items.values()]
        rows = attrs.rows(rowids)
        if bad := [i for i, r in zip(items, rowids) if r not in rows]:
            raise UserError(f"no attributes stored yet for {', '.join(bad)}; run 'fashionlens index-attributes'")
        n_values = [len(attrs.schema[name]) for name in attrs.names]
        shared = shared_values([rows[r] for r in rowids], n_values, cfg)
        centroid = liked_vectors(index, rowids).mean(axis=0)
        centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
        hits = [h for h in index.search(centroid[None], cfg.pool + len(rowids))[0] if h.rowid not in set(rowids)]
        stored = attrs.rows([h.rowid for h in hits], attrs=[a for a, _, _ in shared]) if shared else {}
        ranked = []
        for h in hits[:cfg.pool]:
            row = stored.get(h.rowid) or [None] * len(attrs.names)
            values = [(a, v, row[a]) for a, v, _ in shared]
            attr_score = float(np.mean([s.scores[attrs.schema[s.attribute][v]] if s else 0.0 for _, v, s in values])
                               ) if shared else 0.0
            shares = [phrase(s.attribute, s.value, attrs.schema[s.attribute])  # absences ("no collar") last
                      for _, v, s in sorted(values, key=lambda t: bool(t[2]) and t[2].value == "no")
                      if s and s.index == v and s.confidence >= cfg.min_confidence]
            ranked.append(Recommendation(h.id, attr_score + cfg.visual_weight * h.score, attr_score, h.score,
                                         shares, h.path, h.metadata))
        ranked.sort(key=lambda r: -r.score)
        names = [{"attribute": attrs.names[a], "value": attrs.schema[attrs.names[a]][v], "liked_items": c,
                  "phrase": phrase(attrs.names[a], attrs.schema[attrs.names[a]][v], attrs.schema[attrs.names[a]])}
                 for a, v, c in sorted(shared, key=lambda t: (attrs.schema[attrs.names[t[0]]][t[1]] == "no", -t[2]))]
        return names, ranked[:cfg.k]
    finally:
        index.close()
