"""``fashionlens train CONFIG.yaml [--set a.b=value ...] [--out DIR] [--epochs N]``.

Registered by ``fashionlens.cli`` (``app.command("train")(train_command)``). Under torchrun
(``python -m torch.distributed.run --nproc_per_node 2 -m fashionlens train ...``) every
process runs it; only rank 0 prints and writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from fashionlens.training.config import TrainConfig


class _RichTrainProgress:
    """Progress bar per epoch and one line per finished epoch, on stderr."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.bar = None

    def _bar(self, description: str, total: int, loss: bool = False) -> None:
        """Start a progress bar (``self.task``) unless one is showing."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self.bar is None:
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
            columns += [TextColumn("loss {task.fields[loss]}")] if loss else []
            self.bar = Progress(*columns, TimeRemainingColumn(), console=self.console)
            self.bar.start()
            self.task = self.bar.add_task(description, total=total, **({"loss": ""} if loss else {}))

    def _count(self, description: str, event: dict) -> None:
        """A bar for ``{"done", "total"}`` events, closed when done reaches total."""
        self._bar(description, event["total"])
        self.bar.update(self.task, completed=event["done"], total=event["total"])
        if event["done"] >= event["total"]:
            self.stop()

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self.console.print(
                f"[bold]training[/bold] epochs {event['start_epoch']}..{event['epochs']}, {event['batches']} batches each, "
                f"{event['train_images']} images / {event['train_identities']} identities "
                f"(validation {event['val_images']} / {event['val_identities']}), device {event['device']}"
                + (f", {event['world_size']} processes" if event["world_size"] > 1 else ""))
            dropped = {k: v for k, v in event["dropped"].items() if v}
            if dropped:
                self.console.print(f"[dim]dropped: {dropped}[/dim]")
        elif kind == "cache":
            what = f"augmented view {event['view']}" if event.get("view") else "feature cache"
            self.console.print(f"{what}: {event['images']} images needed")
        elif kind == "cache_unreadable":
            shown = ", ".join(event["images"][:3]) + (" ..." if len(event["images"]) > 3 else "")
            self.console.print(f"[yellow]{len(event['images'])} image(s) cannot be read and are left out: {shown}[/yellow]")
        elif kind == "cache_step":
            self._count("caching feature maps", event)
        elif kind == "step":
            self._bar(f"epoch {event['epoch']}", event["batches"], loss=True)
            self.bar.update(self.task, completed=event["batch"], loss=f"{event['loss']:.4f}")
        elif kind == "epoch":
            self.stop()
            fmt = lambda v: "-" if v in (None, "") else f"{float(v):.3f}"  # noqa: E731
            self.console.print(
                f"epoch {event['epoch']}: loss {fmt(event['loss'])} (triplet {fmt(event['triplet'])}, "
                f"identity {fmt(event['identity'])}, positive triplets {fmt(event['positive_fraction'])}) "
                f"val top-1 {fmt(event.get('val_top1'))} top-4 {fmt(event.get('val_top4'))} "
                + (f"queries top-1 {fmt(event['query_top1'])} top-4 {fmt(event['query_top4'])} "
                   if event.get("query_top1") not in (None, "") else "") +
                f"[dim]{event['seconds']:.0f} s, {fmt(event['images_per_second'])} img/s[/dim]")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def train_command(
    config: Annotated[Path, typer.Argument(help="YAML file with the training settings")],
    set_: Annotated[list[str], typer.Option("--set", help="override a setting: --set model.neck.dim=128 (repeatable)")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder (overrides 'out')")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="total epochs (overrides 'epochs')")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="torch device (overrides 'device')")] = None,
) -> None:
    from fashionlens.training import load_train_config, train

    cfg = load_train_config(config, list(set_), out=str(out) if out is not None else None, epochs=epochs, device=device)
    progress = _RichTrainProgress() if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        row = train(cfg, progress=progress)
    finally:
        if progress is not None:
            progress.stop()
    if progress is not None:
        progress.console.print(f"run folder: {cfg.out} (metrics.csv, curves.png, last/, best/); "
                               f"last epoch {row.get('epoch', '-')}")


train_command.__doc__ = (
    "Train a retrieval model with the batch-all triplet loss on P x K batches (thesis A), "
    "validating top-1/top-4 hit rate on held-out identities every epoch (and, with val_queries, on "
    "labelled query photos against the whole catalog, which then picks OUT/best). With "
    "model.freeze_backbone and feature_cache the necks train on cached backbone maps. Resumes from "
    "OUT/last when it exists.\n\nSettings (YAML keys; nested ones with --set a.b=value):\n\n" + TrainConfig.help_text())
