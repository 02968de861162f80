"""``fashionlens evaluate ...`` and ``fashionlens demo``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, Optional

import typer

from fashionlens.config import EvaluateConfig, IndexConfig
from fashionlens.errors import UserError

evaluate_app = typer.Typer(no_args_is_help=True, help=(
    "Measure retrieval: top-k hit rate (the thesis metric), Recall@K and mAP@K, per category and "
    "overall; writes metrics.json, hit_rate.png and report.html.\n\nSettings:\n\n" + EvaluateConfig.help_text()))

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file with settings")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="folder for metrics.json, hit_rate.png, report.html")]


def _print_summary(summary: dict, out: Path) -> None:
    from rich.table import Table

    from fashionlens.cli import out as stdout

    ks = summary["ks"]
    table = Table(title="top-k hit rate")
    for col in ["category", "queries", *[f"top-{k}" for k in ks], f"mAP@{ks[-1]}"]:
        table.add_column(col)
    groups = [*summary["per_category"].items(), ("overall", summary["overall"])]
    for name, g in groups:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(name, str(g["n_queries"]), *[fmt(g["hit_rate"][str(k)]) for k in ks],
                      fmt(g["map"][str(ks[-1])]))
    stdout.print(table)
    stdout.print(f"report: {out / 'report.html'}  metrics: {out / 'metrics.json'}  plot: {out / 'hit_rate.png'}")


def _run(index_dir: Path, queries, relevance, out: Path, cfg: EvaluateConfig, title: str) -> dict:
    from fashionlens.cli import RichProgress
    from fashionlens.evaluation.protocols import run_queries
    from fashionlens.index import CatalogIndex
    from fashionlens.index.query import embedder_for

    if not queries:
        raise UserError("no query images found")
    index = CatalogIndex(index_dir)
    try:
        embedder = embedder_for(index, cfg.device)
        progress = RichProgress()
        progress.start(len(queries), "queries")
        summary = run_queries(index, embedder, queries, relevance, out, cfg.ks, title, cfg.batch_size,
                              cfg.workers, cfg.max_html_queries, on_progress=progress.advance)
        progress.stop()
    finally:
        index.close()
    _print_summary(summary, out)
    return summary


@evaluate_app.command("consumer")
def evaluate_consumer(
    queries: Annotated[Path, typer.Argument(help="folder of query photos, one sub-folder per label")],
    index_dir: Annotated[Path, typer.Option("--index", help="catalog index folder")],
    mapping: Annotated[Path, typer.Option(help="CSV: label, catalog values (;-separated) that count as a hit")],
    out: OutOpt,
    field: Annotated[str, typer.Option(help="catalog metadata column the mapping's values refer to")] = "articleType",
    config: ConfigOpt = None,
):
    """Buyers' photos -> catalog (e.g. shared consumer/test -> catalog, hit = matching articleType)."""
    from fashionlens.data.catalog import iter_image_folder
    from fashionlens.evaluation.protocols import consumer_relevance, read_label_mapping

    if not queries.is_dir():
        raise UserError(f"{queries}: not a folder of query photos")
    cfg = EvaluateConfig.load(config)
    items = list(iter_image_folder(queries))
    _run(index_dir, items, consumer_relevance(read_label_mapping(mapping), field), out, cfg,
         f"{queries.name} -> catalog ({field})")


def _pairs_eval(gallery, queries, out: Path, cfg: EvaluateConfig, title: str) -> None:
    from fashionlens.cli import RichProgress
    from fashionlens.evaluation.protocols import same_item_relevance
    from fashionlens.index.pipeline import build_index

    out.mkdir(parents=True, exist_ok=True)
    gallery_csv = out / "gallery.csv"
    with open(gallery_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "path", "item_id", "category"])
        for item in gallery:
            writer.writerow([item.id, str(item.path), item.metadata["item_id"], item.metadata.get("category", "")])
    index_cfg = IndexConfig(**cfg.model_dump(include=set(IndexConfig.model_fields) & set(cfg.model_dump())))
    build_index(gallery_csv, out / "gallery-index", index_cfg, RichProgress())
    _run(out / "gallery-index", queries, same_item_relevance, out, cfg, title)


@evaluate_app.command("inshop")
def evaluate_inshop(
    root: Annotated[Path, typer.Argument(help="DeepFashion In-shop folder (holding img/)")],
    out: OutOpt,
    partition: Annotated[Optional[Path], typer.Option(help="list_eval_partition.txt (default: under ROOT)")] = None,
    config: ConfigOpt = None,
):
    """DeepFashion In-shop: query split against the gallery split, hit = same item id."""
    from fashionlens.data.deepfashion import read_inshop

    cfg = EvaluateConfig.load(config)
    splits = read_inshop(root, partition)
    _pairs_eval(splits["gallery"], splits["query"], out, cfg, "In-shop query -> gallery")


@evaluate_app.command("consumer-to-shop")
def evaluate_c2s(
    root: Annotated[Path, typer.Argument(help="DeepFashion Consumer-to-shop folder (holding img/)")],
    out: OutOpt,
    split: Annotated[str, typer.Option(help="val or test")] = "test",
    partition: Annotated[Optional[Path], typer.Option(help="list_eval_partition.txt (default: under ROOT)")] = None,
    config: ConfigOpt = None,
):
    """DeepFashion Consumer-to-shop: consumer photos against the shop photos of the split."""
    from fashionlens.data.deepfashion import read_consumer_to_shop

    cfg = EvaluateConfig.load(config)
    data = read_consumer_to_shop(root, partition)
    _pairs_eval(data.gallery(split), data.queries(split), out, cfg, f"Consumer-to-shop {split}")


def demo(
    data: Annotated[Optional[Path], typer.Option(help="the shared data folder (default: ../shared/data if present)")] = None,
    photos: Annotated[Optional[Path], typer.Option(help="your own folder of clothing photos to use instead")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="where the index and report go")] = Path("fashionlens-demo"),
    queries: Annotated[int, typer.Option(help="photo queries to print")] = 3,
    download: Annotated[bool, typer.Option(help="download a public CC0 clothing photo set when no data is found")] = True,
):
    """Index a catalog with the embedded default model, answer a few photo queries, and write
    an evaluation report. Resumable: run it again after an interruption."""
    from fashionlens.demo import run_demo

    run_demo(data, photos, out, queries, download)
