"""The attribute commands: ``train-attributes``, ``evaluate-attributes``, ``explain``,
``index-attributes`` and ``recommend``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fashionlens.cli.console import (
    ConfigOpt,
    RichProgress,
    TrainProgress,
    console,
    fmt,
    out,
    run_with_progress,
    unique_stem,
)
from fashionlens.errors import UserError
from fashionlens.index.config import IndexAttributesConfig
from fashionlens.index.recommend import RecommendConfig
from fashionlens.training.config import AttributeTrainConfig


class AttributeProgress(TrainProgress):
    """The training progress bars, with the attribute run's start and epoch lines."""

    def start_line(self, event: dict) -> str:
        parts = ", ".join(f"{part} {n}" for part, n in event["images"].items())
        return (f"[bold]training attributes[/bold] epochs {event['start_epoch']}..{event['epochs']}, "
                f"{event['batches']} batches each, {event['attributes']} attributes, images: {parts}, "
                f"device {event['device']}")

    def epoch_line(self, event: dict) -> str:
        return (f"epoch {event['epoch']}: loss {fmt(event['loss'])} val loss {fmt(event['val_loss'])} "
                f"accuracy {fmt(event['val_accuracy'])} precision {fmt(event['val_precision'])} "
                f"mAP {fmt(event['val_map'])} [dim]{event['seconds']:.0f} s, "
                f"{fmt(event['images_per_second'])} img/s[/dim]")


def train_attributes_command(
    config: Annotated[Path, typer.Argument(help="YAML file with the settings")],
    set_: Annotated[list[str], typer.Option("--set", help="override a setting: --set lr=0.001 (repeatable)")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder (overrides 'out')")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="total epochs (overrides 'epochs')")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="torch device (overrides 'device')")] = None,
) -> None:
    from fashionlens.training.attribute_task import train_attributes
    from fashionlens.training.config import load_attribute_config

    cfg = load_attribute_config(config, list(set_), out=str(out) if out is not None else None, epochs=epochs,
                                device=device)
    run_with_progress(AttributeProgress, lambda progress: train_attributes(cfg, progress=progress),
                      lambda row: f"run folder: {cfg.out} (metrics.csv, curves.png, last/, best/); "
                                  f"last epoch {row.get('epoch', '-')}")


train_attributes_command.__doc__ = (
    "Train the multi-head attribute classifier of the explainable-attributes method (docs/METHODS.md: one head per "
    "attribute on a CNN, sigmoid "
    "cross-entropy per value, y/n/m labels with maybes drawn per epoch, unlabeled attributes "
    "masked), validating per-attribute accuracy, precision and mAP every epoch; best/ is the "
    "best mean validation accuracy. Resumes from OUT/last.\n\nSettings (YAML keys; nested ones "
    "with --set a.b=value):\n\n" + AttributeTrainConfig.help_text())


def evaluate_attributes_command(
    model: Annotated[Path, typer.Argument(help="checkpoint folder written by 'fashionlens train-attributes'")],
    split: Annotated[str, typer.Option("--split", help="which part of the run's split: train, val, test, all")] = "test",
    data: Annotated[Optional[Path], typer.Option("--data", help="another labeled folder with the same "
                                                 "attributes (then every image of it is evaluated)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="write the metrics as JSON here")] = None,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
    flip: Annotated[bool, typer.Option("--flip", help="average each photo's logits with its mirror image's")] = False,
) -> None:
    """Per-attribute loss, accuracy, precision at the run's threshold (0.6) and mAP of an
    attribute classifier, on a part of the split it was trained with (default: test), as a
    table and JSON."""
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from fashionlens.evaluation.attribute_metrics import metrics_table
    from fashionlens.models.checkpoints import resolve_checkpoint
    from fashionlens.training.attribute_data import read_attribute_set
    from fashionlens.training.attribute_task import evaluate_rows, load_attribute_run, read_config_data

    model = resolve_checkpoint(model)  # a run folder: its best/, named as such in the output
    net, cfg, _ = load_attribute_run(model, device)
    if data is not None:
        dataset = read_attribute_set(data, cfg.format, None, None, list(net.attr_head.schema), cfg.min_tag_photos)
        if dataset.schema != net.attr_head.schema:
            raise UserError(f"--data {data}: its attributes' values differ from the model's")
        rows, split = np.arange(len(dataset.images)), "all"
    else:
        dataset, parts = read_config_data(cfg)
        if split not in (*parts, "all"):
            raise UserError(f"--split {split!r}: use train, val, test or all")
        rows = np.arange(len(dataset.images)) if split == "all" else parts[split]
    if len(rows) == 0:
        raise UserError(f"the {split} part holds no image")
    metrics = evaluate_rows(net, dataset, rows, cfg.loss, cfg.threshold, device, flip=flip)
    metrics.update({"model": str(model), "split": split, "data": str(dataset.root), "threshold": cfg.threshold,
                    "flip": flip})
    table = Table(title=f"{model} on {split} ({len(rows)} images)")
    header, *body = metrics_table(metrics)
    for name in header:
        table.add_column(name, justify="left" if name == "attribute" else "right")
    for row in body:
        table.add_row(*row)
    Console(stderr=out is None).print(table)
    if metrics["unreadable"]:
        typer.echo(f"{len(metrics['unreadable'])} image(s) could not be read and were left out", err=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2))
        typer.echo(str(out))
    else:
        typer.echo(json.dumps(metrics))


def _resolve_attributes(requested: list[str], schema: dict[str, list[str]]) -> list[str] | None:
    """Attribute names as given, or by display name (``neckline`` for ``neckline_labels``)."""
    from fashionlens.explain.wording import display_name, find_attribute

    names = []
    for item in requested:
        name = find_attribute(item, list(schema))
        if name is None:
            raise UserError(f"--attribute {item!r}: not an attribute of this model; "
                            f"choose from {', '.join(map(display_name, schema))}")
        names.append(name)
    return names or None


def explain_command(
    photos: Annotated[list[Path], typer.Argument(help="one or more photos")],
    model: Annotated[Path, typer.Option("--model", "-m", help="checkpoint folder written by "
                                        "'fashionlens train-attributes'")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for <photo>-explain.png and .json")] = Path("explain"),
    attribute: Annotated[list[str], typer.Option("--attribute", "-a", help="explain this attribute only "
                                                 "(repeatable; default all)")] = [],  # noqa: B006
    method: Annotated[str, typer.Option(help="auto: exact closed-form Grad-CAM of the linear heads (one pass "
                                        "for all attributes); gradcam: the grad-cam library, one pass per attribute")] = "auto",
    box_threshold: Annotated[float, typer.Option(help="the box surrounds the largest CAM region above this "
                                                 "share of its peak")] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON instead of a table")] = False,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
) -> None:
    """Explain a garment's attributes (the explainable-attributes method, docs/METHODS.md): per attribute
    the predicted value and its confidence, the Grad-CAM of that value, the box of the CAM's largest
    region, drawn in one PNG per photo (photo, CAM, overlay, box per attribute; the method's figures
    15-17), and JSON beside
    it. Boxes are \\[x, y, w, h] in the photo's pixels. Unreadable photos are reported and skipped
    (exit code 1)."""
    from rich.console import Console
    from rich.table import Table

    from fashionlens.data.images import ImageError, open_image
    from fashionlens.explain.explainer import AttributeExplainer
    from fashionlens.explain.figures import explanation_figure
    from fashionlens.models.checkpoints import resolve_checkpoint
    from fashionlens.training.attribute_task import load_attribute_run

    if method not in ("auto", "gradcam"):
        raise UserError(f"--method {method!r}: use auto or gradcam")
    if not 0 < box_threshold <= 1:
        raise UserError(f"--box-threshold {box_threshold}: must be in (0, 1]")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a folder")
    model = resolve_checkpoint(model)  # a run folder: its best/, named as such in the output
    net, cfg, _ = load_attribute_run(model, device)
    names = _resolve_attributes(list(attribute), net.attr_head.schema)
    explainer = AttributeExplainer(net, cfg.loss, box_threshold, method, device)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out_dir}: cannot create the folder ({exc.strerror})") from None
    failed, used, documents = [], set(), []
    console = Console()
    for photo in photos:
        try:
            image = open_image(photo, draft_size=explainer.size)
        except ImageError as exc:
            typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
            failed.append(photo)
            continue
        results = explainer.explain([image], names)[0]
        stem = unique_stem(photo, used)
        png, doc_path = out_dir / f"{stem}-explain.png", out_dir / f"{stem}-explain.json"
        explanation_figure(image, results, explainer.size, png, title=str(photo))
        doc = {"photo": str(photo), "model": str(model), "size": [image.width, image.height], "method": method,
               "box_threshold": box_threshold, "png": str(png), "attributes": [r.to_json() for r in results]}
        doc_path.write_text(json.dumps(doc, indent=2, ensure_ascii=False))
        documents.append(doc)
        if not as_json:
            table = Table(title=f"{photo} -> {png}", title_justify="left")
            for column in ("attribute", "value", "confidence", "box [x, y, w, h]"):
                table.add_column(column, no_wrap=column == "attribute")
            for r in results:
                table.add_row(r.attribute, r.value, f"{r.confidence:.3f}", str(list(r.box)) if r.box else "-")
            console.print(table)
    if as_json:
        typer.echo(json.dumps(documents, ensure_ascii=False))
    if failed:
        typer.echo(f"{len(failed)} of {len(photos)} photo(s) could not be read", err=True)
        sys.exit(1)


def recommend_command(
    index_dir: Annotated[str, typer.Argument(help="index folder or Milvus store with attributes "
                                             "('fashionlens index-attributes')")],
    liked: Annotated[list[str], typer.Argument(help="ids of the items the user liked")],
    k: Annotated[Optional[int], typer.Option("-k", help="items to recommend")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    config: ConfigOpt = None,
) -> None:
    from rich.table import Table

    from fashionlens.index.recommend import recommend

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


def index_attributes_command(
    index_dir: Annotated[str, typer.Argument(help="index folder or Milvus store (milvus://HOST:PORT/COLLECTION, "
                                             "milvus+lite://FILE.db/COLLECTION) made by 'fashionlens index'")],
    model: Annotated[Path, typer.Option("--model", "-m", help="checkpoint of 'fashionlens train-attributes'")],
    config: ConfigOpt = None,
    replace: Annotated[bool, typer.Option("--replace", help="drop attributes of another model first")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="photos explained together")] = None,
    workers: Annotated[Optional[int], typer.Option(help="decoding processes")] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    feature_dim: Annotated[Optional[int], typer.Option(help="stored feature dims (0 = full)")] = None,
    optimize: Annotated[Optional[str], typer.Option(help="auto | jit | none: TorchScript freeze of the model")] = None,
) -> None:
    from fashionlens.index.attribute_indexing import index_attributes

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
