"""Evaluation protocols: queries go through the index, as a user's searches do.

- ``consumer``: buyers' photos (a folder with one sub-folder per label) against a catalog index;
  a result is a hit when its metadata ``field`` (``articleType``) is among the values a
  mapping CSV lists for the query's label (the shared ``consumer/catalog_types.csv``).
- ``pairs`` (In-shop, Consumer-to-shop): queries and gallery with item ids; a hit is a gallery
  image of the same item id.
Rankings are scored as they come (``MetricAccumulator``), never held all at once.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from fashionlens.data.crops import build_cropper
from fashionlens.data.records import Item
from fashionlens.errors import UserError
from fashionlens.evaluation.metrics import MetricAccumulator
from fashionlens.evaluation.report import HtmlReport, plot_hit_rate, write_json
from fashionlens.index.stores.local import LocalStore
from fashionlens.index.config import IndexConfig
from fashionlens.index.pipeline import Progress, build_index
from fashionlens.index.query import embedder_for
from fashionlens.models.embedder import EmbedConfig, Embedder, embed_rows


class EvaluateConfig(EmbedConfig):
    ks: list[int] = Field([1, 4, 10, 20], description="cut-offs for hit rate, Recall@K and mAP@K")
    max_html_queries: int = Field(200, ge=0, description="queries shown on the HTML page")


@dataclass
class Relevance:
    """For one query: its category, which metadata values count as a hit, and how many
    gallery items carry them."""

    category: str
    field: str
    values: frozenset[str]


def read_label_mapping(path: Path) -> dict[str, frozenset[str]]:
    """``label,values`` rows, values separated by ``;`` (``consumer/catalog_types.csv``)."""
    try:
        rows = list(csv.reader(Path(path).read_text(encoding="utf-8-sig").splitlines()))
    except OSError as exc:
        raise UserError(f"{path}: cannot read the label mapping ({exc.strerror})") from None
    mapping = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise UserError(f"{path}:{line_no}: expected 'label,value;value;...'")
        mapping[row[0].strip()] = frozenset(v.strip() for v in row[1].split(";") if v.strip())
    if not mapping:
        raise UserError(f"{path}: the label mapping is empty")
    return mapping


def interleave_by_category(queries: Sequence[Item], relevance: Callable[[Item], Relevance]) -> list[Item]:
    """Queries taken round-robin across categories, keeping each category's order.

    Metrics do not depend on the order; the HTML page shows the first ``max_html`` queries,
    which this way cover every category instead of the first few folders.
    """
    groups: dict[str, list[Item]] = {}
    for q in queries:
        groups.setdefault(relevance(q).category, []).append(q)
    lists = list(groups.values())
    return [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]


def run_queries(index: LocalStore, embedder: Embedder, queries: Sequence[Item],
                relevance: Callable[[Item], Relevance], out: Path, ks: Sequence[int], title: str,
                batch_size: int = 16, workers: int = 1, max_html: int = 200,
                progress: Progress | None = None, label: str = "queries", cropper=None) -> dict:
    """Search every query through ``index`` and write metrics.json, hit_rate.png, report.html
    (each query cut by ``cropper`` first, when given)."""
    out.mkdir(parents=True, exist_ok=True)
    progress = progress or Progress()
    progress.start(len(queries), label)
    k_max = max(ks)
    acc = MetricAccumulator(ks, k_max=k_max)
    html = HtmlReport(out / "report.html", title, max_queries=max_html)
    n_relevant_cache: dict[tuple[str, frozenset[str]], int] = {}
    unreadable = []
    queries = interleave_by_category(queries, relevance)
    rows = [(i, str(q.path)) for i, q in enumerate(queries)]
    for batch in embed_rows(rows, embedder, batch_size, workers, cropper):
        unreadable += [(str(queries[i].path), err) for i, err in batch.errors]
        results = index.search(batch.vectors, k_max) if len(batch.keys) else []
        for i, hits in zip(batch.keys, results):
            query, rel = queries[i], relevance(queries[i])
            key = (rel.field, rel.values)
            if key not in n_relevant_cache:
                n_relevant_cache[key] = index.store.count_where(rel.field, rel.values)
            flags = [h.metadata.get(rel.field) in rel.values for h in hits]
            acc.add(rel.category, flags, n_relevant_cache[key])
            html.add(query.path, rel.category, [
                {"id": h.id, "path": Path(h.path), "score": h.score, "hit": f,
                 "label": h.metadata.get(rel.field, "")} for h, f in zip(hits, flags)])
        progress.advance(len(batch.keys) + len(batch.errors))
    progress.stop()
    summary = acc.summary()
    summary["unreadable_queries"] = [{"path": p, "error": e} for p, e in unreadable]
    summary["index"] = {"folder": str(index.folder), "items": index.store.count("embedded"),
                        "spec": index.store.get_meta("index_spec"), "embedder": embedder.describe()}
    summary["crop"] = {"queries": cropper.name if cropper else "none",
                       "catalog": (index.store.get_meta("crop") or {}).get("crop", "none")}
    write_json(summary, out / "metrics.json")
    plot_hit_rate(summary, out / "hit_rate.png", title=title)
    html.close(summary)
    return summary


def consumer_relevance(mapping: dict[str, frozenset[str]], field: str) -> Callable[[Item], Relevance]:
    def relevance(item: Item) -> Relevance:
        label = item.metadata.get("label", "")
        if label not in mapping:
            raise UserError(f"query label {label!r} ({item.path}) is not in the label mapping")
        return Relevance(label, field, mapping[label])
    return relevance


def same_item_relevance(item: Item) -> Relevance:
    return Relevance(item.metadata.get("category", "all"), "item_id",
                     frozenset([item.metadata["item_id"]]))


def evaluate_index(index_dir: Path, queries: Sequence[Item], relevance: Callable[[Item], Relevance], out: Path,
                   cfg: EvaluateConfig, title: str, progress: Progress | None = None) -> dict:
    """Search ``queries`` through the index in ``index_dir`` with its own model (:func:`run_queries`)."""
    if not queries:
        raise UserError("no query images found")
    index = LocalStore(index_dir)
    try:
        return run_queries(index, embedder_for(index, cfg.device), queries, relevance, out, cfg.ks, title,
                           cfg.batch_size, cfg.workers, cfg.max_html_queries, progress,
                           cropper=build_cropper(cfg.crop, cfg.crop_regions))
    finally:
        index.close()


def evaluate_pairs(gallery: Sequence[Item], queries: Sequence[Item], out: Path, cfg: EvaluateConfig, title: str,
                   progress: Progress | None = None) -> dict:
    """The item-id protocols (In-shop, Consumer-to-shop): the gallery indexed into ``out/gallery-index``
    (with its ids, item ids and categories in ``out/gallery.csv``), then every query searched."""
    out.mkdir(parents=True, exist_ok=True)
    gallery_csv = out / "gallery.csv"
    with open(gallery_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "path", "item_id", "category"])
        for item in gallery:
            writer.writerow([item.id, str(item.path), item.metadata["item_id"], item.metadata.get("category", "")])
    index_cfg = IndexConfig(**cfg.model_dump(include=set(IndexConfig.model_fields) & set(cfg.model_dump())))
    build_index(gallery_csv, out / "gallery-index", index_cfg, progress)
    return evaluate_index(out / "gallery-index", queries, same_item_relevance, out, cfg, title, progress)
