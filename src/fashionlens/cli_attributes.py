"""``fashionlens train-attributes CONFIG`` and ``fashionlens evaluate-attributes CKPT``.

Registered by ``fashionlens.cli``. Progress and the table go to stderr / stdout with rich.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from fashionlens.cli_train import _RichTrainProgress
from fashionlens.errors import UserError
from fashionlens.training.attributes import AttributeTrainConfig

_fmt = lambda v: "-" if v in (None, "") else f"{float(v):.3f}"  # noqa: E731


class _AttributeProgress(_RichTrainProgress):
    """The retrieval trainer's progress bars, with the attribute run's start and epoch lines."""

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            parts = ", ".join(f"{part} {n}" for part, n in event["images"].items())
            self.console.print(f"[bold]training attributes[/bold] epochs {event['start_epoch']}..{event['epochs']}, "
                               f"{event['batches']} batches each, {event['attributes']} attributes, images: {parts}, "
                               f"device {event['device']}")
        elif kind == "epoch":
            self.stop()
            self.console.print(f"epoch {event['epoch']}: loss {_fmt(event['loss'])} val loss {_fmt(event['val_loss'])} "
                               f"accuracy {_fmt(event['val_accuracy'])} precision {_fmt(event['val_precision'])} "
                               f"mAP {_fmt(event['val_map'])} [dim]{event['seconds']:.0f} s, "
                               f"{_fmt(event['images_per_second'])} img/s[/dim]")
        else:
            super().__call__(event)


def train_attributes_command(
    config: Annotated[Path, typer.Argument(help="YAML file with the settings")],
    set_: Annotated[list[str], typer.Option("--set", help="override a setting: --set lr=0.001 (repeatable)")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder (overrides 'out')")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="total epochs (overrides 'epochs')")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="torch device (overrides 'device')")] = None,
) -> None:
    from fashionlens.training.attributes import load_attribute_config, train_attributes

    cfg = load_attribute_config(config, list(set_), out=str(out) if out is not None else None, epochs=epochs,
                                device=device)
    progress = _AttributeProgress()
    try:
        row = train_attributes(cfg, progress=progress)
    finally:
        progress.stop()
    progress.console.print(f"run folder: {cfg.out} (metrics.csv, curves.png, last/, best/); "
                           f"last epoch {row.get('epoch', '-')}")


train_attributes_command.__doc__ = (
    "Train thesis B's multi-head attribute classifier (one head per attribute on a CNN, sigmoid "
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

    from fashionlens.evaluation.attributes import metrics_table
    from fashionlens.models.builder import resolve_checkpoint
    from fashionlens.training.attributes import evaluate_rows, load_attribute_model, read_config_data
    from fashionlens.training.attribute_data import read_attribute_set

    model = resolve_checkpoint(model)  # a run folder: its best/, named as such in the output
    net, cfg, _ = load_attribute_model(model, device)
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
