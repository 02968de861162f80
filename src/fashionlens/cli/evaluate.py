"""``fashionlens evaluate consumer | inshop | consumer-to-shop`` and ``fashionlens demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fashionlens.cli.console import RichProgress, hits_table, out, print_summary
from fashionlens.errors import UserError
from fashionlens.evaluation.protocols import EvaluateConfig

evaluate_app = typer.Typer(no_args_is_help=True, help=(
    "Measure retrieval: top-k hit rate (the retrieval method's metric), Recall@K and mAP@K, per category and "
    "overall; writes metrics.json, hit_rate.png and report.html.\n\nSettings:\n\n" + EvaluateConfig.help_text()))

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file with settings")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="folder for metrics.json, hit_rate.png, report.html")]


@evaluate_app.command("consumer")
def evaluate_consumer(
    queries: Annotated[Path, typer.Argument(help="folder of query photos, one sub-folder per label")],
    index_dir: Annotated[Path, typer.Option("--index", help="catalog index folder")],
    mapping: Annotated[Path, typer.Option(help="CSV: label, catalog values (;-separated) that count as a hit")],
    out: OutOpt,
    field: Annotated[str, typer.Option(help="catalog metadata column the mapping's values refer to")] = "articleType",
    config: ConfigOpt = None,
    crop: Annotated[Optional[str], typer.Option(help="cut each query photo first: none, person, garment or auto "
                                                "(the catalog's crop is the index's)")] = None,
):
    """Buyers' photos -> catalog (e.g. shared consumer/test -> catalog, hit = matching articleType)."""
    from fashionlens.data.catalog import iter_image_folder
    from fashionlens.evaluation.protocols import consumer_relevance, evaluate_index, read_label_mapping

    if not queries.is_dir():
        raise UserError(f"{queries}: not a folder of query photos")
    cfg = EvaluateConfig.load(config, crop=crop)
    items = list(iter_image_folder(queries))
    summary = evaluate_index(index_dir, items, consumer_relevance(read_label_mapping(mapping), field), out, cfg,
                             f"{queries.name} -> catalog ({field})", RichProgress())
    print_summary(summary, out)


@evaluate_app.command("inshop")
def evaluate_inshop(
    root: Annotated[Path, typer.Argument(help="DeepFashion In-shop folder (holding img/)")],
    out: OutOpt,
    partition: Annotated[Optional[Path], typer.Option(help="list_eval_partition.txt (default: under ROOT)")] = None,
    config: ConfigOpt = None,
):
    """DeepFashion In-shop: query split against the gallery split, hit = same item id."""
    from fashionlens.data.deepfashion import read_inshop
    from fashionlens.evaluation.protocols import evaluate_pairs

    cfg = EvaluateConfig.load(config)
    splits = read_inshop(root, partition)
    print_summary(evaluate_pairs(splits["gallery"], splits["query"], out, cfg, "In-shop query -> gallery",
                                 RichProgress()), out)


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
    from fashionlens.evaluation.protocols import evaluate_pairs

    cfg = EvaluateConfig.load(config)
    data = read_consumer_to_shop(root, partition)
    print_summary(evaluate_pairs(data.gallery(split), data.queries(split), out, cfg, f"Consumer-to-shop {split}",
                                 RichProgress()), out)


def demo(
    data: Annotated[Optional[Path], typer.Option(help="the shared data folder (default: ../shared/data if present)")] = None,
    photos: Annotated[Optional[Path], typer.Option(help="your own folder of clothing photos to use instead")] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="where the index and report go")] = Path("fashionlens-demo"),
    queries: Annotated[int, typer.Option(help="photo queries to print")] = 3,
    download: Annotated[bool, typer.Option(help="download a public CC0 clothing photo set when no data is found")] = True,
):
    """Index a catalog with the embedded default model, answer a few photo queries, and write
    an evaluation report. Resumable: run it again after an interruption."""
    from fashionlens.evaluation.demo import run_demo

    summary = run_demo(data, photos, out_dir, queries, download, say=lambda text: out.print(text, highlight=False),
                       show_hits=lambda photo, hits: out.print(hits_table(f"query: {photo}", hits)),
                       progress=RichProgress())
    if summary is not None:
        print_summary(summary, out_dir / "evaluation")
