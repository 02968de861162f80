"""``fashionlens index-attributes DIR --model CKPT`` and ``fashionlens recommend DIR LIKED_ID...``.

Recommendation (issue 5, point 9) uses only what the index stores: the liked items' stored
attribute predictions give the values they share (an attribute counts when at least
``min_share`` of them, and at least 2 when 2+ are liked, confidently predict the same value);
the ``pool`` items nearest to the mean of the liked items' embeddings are then re-ranked by
the mean, over the shared attributes, of the item's score for the shared value, plus
``visual_weight`` x the cosine similarity of the item's embedding to that mean. No model runs.

Registered by ``fashionlens.cli``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from fashionlens.config import IndexAttributesConfig, RecommendConfig
from fashionlens.errors import UserError

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file with settings (see below)")]


# -- recommend ---------------------------------------------------------------------------------


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


def liked_vectors(index, rowids: list[int]) -> np.ndarray:
    """The liked items' stored embeddings, read from their chunk files (exact, any index type)."""
    found, vectors = index.vectors(np.asarray(rowids, np.int64))
    if gone := sorted(set(rowids) - set(found.tolist())):  # removed meanwhile (a server may share the index)
        raise UserError(f"{len(gone)} of the liked items left the index while reading it; try again")
    return vectors[np.searchsorted(found, rowids)]


def recommend(folder: Path, liked: list[str], cfg: RecommendConfig) -> tuple[list[dict], list[Recommendation]]:
    """(the shared values, the top ``k`` other items) for the liked item ids."""
    from fashionlens.explain.attributes import phrase
    from fashionlens.index import CatalogIndex
    from fashionlens.index.attributes import StoredAttributes

    index = CatalogIndex(folder)
    try:
        attrs, store = StoredAttributes(index), index.store
        items = {i: store.get_item(i) for i in dict.fromkeys(liked)}
        if unknown := [i for i, it in items.items() if it is None]:
            raise UserError(f"not in the index {folder}: {', '.join(unknown)}")
        if bad := [i for i, it in items.items() if it["state"] != "embedded"]:
            raise UserError(f"not searchable (unreadable or not embedded yet): {', '.join(bad)}")
        rowids = [it["rowid"] for it in items.values()]
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


def recommend_command(
    index_dir: Annotated[Path, typer.Argument(help="index folder with attributes ('fashionlens index-attributes')")],
    liked: Annotated[list[str], typer.Argument(help="ids of the items the user liked")],
    k: Annotated[Optional[int], typer.Option("-k", help="items to recommend")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    config: ConfigOpt = None,
) -> None:
    from rich.table import Table

    from fashionlens.cli import console, out

    cfg = RecommendConfig.load(config, k=k)
    shared, ranked = recommend(index_dir, liked, cfg)
    if as_json:
        payload = {"liked": list(dict.fromkeys(liked)), "shared": shared, "results": [
            {"rank": n, "id": r.id, "score": round(r.score, 6), "attribute_score": round(r.attribute_score, 6),
             "visual": round(r.visual, 6), "shares": r.shares, "text": "shares: " + (", ".join(r.shares) or "-"),
             "path": r.path, **r.metadata} for n, r in enumerate(ranked, 1)]}
        out.print_json(json.dumps(payload, ensure_ascii=False))
        return
    console.print("the liked items share: " + (", ".join(s["phrase"] for s in shared)
                                               or "no attribute value (ranked by looks alone)"))
    columns = list(dict.fromkeys(c for r in ranked for c in r.metadata))
    table = Table(title=f"recommended for {', '.join(dict.fromkeys(liked))}", title_justify="left")
    for name in ["#", "id", "score", "attributes", "visual", *columns]:
        table.add_column(name, overflow="fold")
    for n, r in enumerate(ranked, 1):
        table.add_row(str(n), r.id, f"{r.score:.3f}", f"{r.attribute_score:.3f}", f"{r.visual:.3f}",
                      *(str(r.metadata.get(c, "")) for c in columns))
    out.print(table)
    for n, r in enumerate(ranked, 1):  # full lines: a table column would be cramped
        out.print(f"  {n}. {r.id}: shares: {', '.join(r.shares) or '-'}", markup=False, highlight=False, soft_wrap=True)


recommend_command.__doc__ = ("Recommend items like the liked ones: those sharing the attribute values the "
                             "liked items have in common, and looking like them.\n\nSettings:\n\n"
                             + RecommendConfig.help_text())


# -- index-attributes --------------------------------------------------------------------------


def index_attributes_command(
    index_dir: Annotated[Path, typer.Argument(help="index folder made by 'fashionlens index'")],
    model: Annotated[Path, typer.Option("--model", "-m", help="checkpoint of 'fashionlens train-attributes'")],
    config: ConfigOpt = None,
    replace: Annotated[bool, typer.Option("--replace", help="drop attributes of another model first")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="photos explained together")] = None,
    workers: Annotated[Optional[int], typer.Option(help="decoding processes")] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    feature_dim: Annotated[Optional[int], typer.Option(help="stored feature dims (0 = full)")] = None,
    optimize: Annotated[Optional[str], typer.Option(help="auto | jit | none: TorchScript freeze of the model")] = None,
) -> None:
    from fashionlens.cli import RichProgress, console
    from fashionlens.index.attributes import index_attributes

    cfg = IndexAttributesConfig.load(config, batch_size=batch_size, workers=workers, device=device,
                                     feature_dim=feature_dim, optimize=optimize)
    report = index_attributes(index_dir, model, cfg, RichProgress(), replace=replace)
    console.print(f"[green]attributes[/green] of {report.total:,} items in {index_dir}; this run: "
                  f"{report.explained:,} explained at {report.per_second:.1f} img/s, {report.skipped:,} unreadable")
    if report.skipped:
        console.print(f"unreadable photos are listed in {report.skipped_report}")


index_attributes_command.__doc__ = (
    "Store an attribute classifier's predictions beside every item of an index: per attribute the "
    "value, confidence, all scores, the CAM box in the photo's pixels and the box's feature "
    "(for 'search --explain', 'search --want' and 'recommend'). Running it again resumes; "
    "another model needs --replace.\n\nSettings:\n\n" + IndexAttributesConfig.help_text())
