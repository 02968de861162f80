"""What every command shows: the consoles (messages and progress on stderr, results on stdout),
progress bars for indexing and for training, and the tables of results."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file with settings (see below)")]


def fmt(value) -> str:
    """A number in a table or a progress line: 3 decimals, ``-`` when missing."""
    return "-" if value in (None, "") else f"{float(value):.3f}"


class RichProgress:
    """Progress bar and log lines on stderr (the index pipeline's :class:`~fashionlens.index.pipeline.Progress`)."""

    def __init__(self):
        self.bar: Progress | None = None

    def start(self, total: int, label: str) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console)
        self.bar.start()
        self.task = self.bar.add_task(label, total=total, rate="")
        self._t0 = time.perf_counter()
        self._done = 0

    def advance(self, n: int) -> None:
        self._done += n
        dt = time.perf_counter() - self._t0
        self.bar.update(self.task, advance=n, rate=f"{self._done / dt:.1f} img/s" if dt > 0 else "")

    def log(self, message: str) -> None:
        console.print(f"[dim]{message}[/dim]")

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()


def query_figures(row: dict) -> str:
    """Overall, macro and worst-type hit rates of a validation row, in words."""
    text = f"top-1 {fmt(row.get('query_top1'))} top-4 {fmt(row.get('query_top4'))}"
    if row.get("query_macro_top4") not in (None, ""):
        text += (f", macro over types top-1 {fmt(row.get('query_macro_top1'))} top-4 {fmt(row['query_macro_top4'])}"
                 f", worst type {row.get('query_worst_type')} top-4 {fmt(row.get('query_worst_top4'))}")
    return text


class TrainProgress:
    """The training engine's events (fashionlens.training.engine): a progress bar per epoch and one
    line per finished epoch, on stderr. Subclasses print their own kinds of events."""

    def __init__(self):
        self.console = Console(stderr=True)
        self.bar = None

    def _bar(self, description: str, total: int, loss: bool = False) -> None:
        """Start a progress bar (``self.task``) unless one is showing."""
        if self.bar is None:
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
            columns += [TextColumn("loss {task.fields[loss]}")] if loss else []
            self.bar = Progress(*columns, TimeRemainingColumn(), console=self.console)
            self.bar.start()
            self.task = self.bar.add_task(description, total=total, **({"loss": ""} if loss else {}))

    def count(self, description: str, event: dict) -> None:
        """A bar for ``{"done", "total"}`` events, closed when done reaches total."""
        self._bar(description, event["total"])
        self.bar.update(self.task, completed=event["done"], total=event["total"])
        if event["done"] >= event["total"]:
            self.stop()

    def start_line(self, event: dict) -> str:
        """The line that announces the run (a retrieval run's; attribute runs say their own)."""
        return (f"[bold]training[/bold] epochs {event['start_epoch']}..{event['epochs']}, {event['batches']} batches "
                f"each, {event['train_images']} images / {event['train_identities']} identities "
                f"(validation {event['val_images']} / {event['val_identities']}), device {event['device']}"
                + (f", {event['world_size']} processes" if event["world_size"] > 1 else ""))

    def epoch_line(self, event: dict) -> str:
        """The line of a finished epoch (a retrieval run's: its loss terms and hit rates)."""
        known = {"epoch", "step", "loss", "seconds", "images_per_second", "val_top1", "val_top4",
                 "valid_triplets", "positive_fraction", "event"}
        terms = [f"{name} {fmt(value)}" for name, value in event.items()
                 if name not in known and not name.startswith("query_")]
        if event.get("positive_fraction") not in (None, ""):
            terms.append(f"positive triplets {fmt(event['positive_fraction'])}")
        return (f"epoch {event['epoch']}: loss {fmt(event['loss'])}" + (f" ({', '.join(terms)})" if terms else "")
                + f" val top-1 {fmt(event.get('val_top1'))} top-4 {fmt(event.get('val_top4'))} "
                + (f"queries {query_figures(event)} " if event.get("query_top1") not in (None, "") else "")
                + f"[dim]{event['seconds']:.0f} s, {fmt(event['images_per_second'])} img/s[/dim]")

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self.console.print(self.start_line(event))
            dropped = {k: v for k, v in (event.get("dropped") or {}).items() if v}
            if dropped:
                self.console.print(f"[dim]dropped: {dropped}[/dim]")
        elif kind == "cache":
            what = f"augmented view {event['view']}" if event.get("view") else "feature cache"
            self.console.print(f"{what}: {event['images']} images needed")
        elif kind == "cache_unreadable":
            shown = ", ".join(event["images"][:3]) + (" ..." if len(event["images"]) > 3 else "")
            self.console.print(f"[yellow]{len(event['images'])} image(s) cannot be read and are left out: {shown}[/yellow]")
        elif kind == "cache_step":
            self.count("caching feature maps", event)
        elif kind == "step":
            self._bar(f"epoch {event['epoch']}", event["batches"], loss=True)
            self.bar.update(self.task, completed=event["batch"], loss=f"{event['loss']:.4f}")
        elif kind == "epoch":
            self.stop()
            self.console.print(self.epoch_line(event))

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def run_with_progress(progress_class: type[TrainProgress], run: Callable, done: Callable[[object], str]):
    """``run(progress)`` with a ``progress_class`` display on rank 0 (no display on the other
    processes of a torchrun group), then the line ``done(result)`` there; returns the result."""
    progress = progress_class() if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        result = run(progress)
    finally:
        if progress is not None:
            progress.stop()
    if progress is not None:
        progress.console.print(done(result))
    return result


def hits_table(title: str, hits) -> Table:
    """Search results as a table: rank, id, score and every metadata column."""
    columns = list(dict.fromkeys(c for h in hits for c in h.metadata))
    table = Table(title=title, title_justify="left")
    for name in ["#", "id", "score", *columns]:
        table.add_column(name, overflow="fold")
    for rank, h in enumerate(hits, 1):
        table.add_row(str(rank), h.id, f"{h.score:.3f}", *(str(h.metadata.get(c, "")) for c in columns))
    return table


def print_summary(summary: dict, folder: Path) -> None:
    """An evaluation's hit rates per category and overall, and where its report went."""
    ks = summary["ks"]
    table = Table(title="top-k hit rate")
    for col in ["category", "queries", *[f"top-{k}" for k in ks], f"mAP@{ks[-1]}"]:
        table.add_column(col)
    groups = [*summary["per_category"].items(), ("overall", summary["overall"])]
    macro = summary.get("macro") or {}
    if macro.get("n_categories", 0) > 1:  # every category weighs the same: what a collapse onto common ones lowers
        groups.append((f"macro ({macro['n_categories']} categories)",
                       {"n_queries": sum(g["n_queries"] for g in summary["per_category"].values()), **macro}))
    for name, g in groups:
        table.add_row(name, str(g["n_queries"]), *[fmt(g["hit_rate"][str(k)]) for k in ks], fmt(g["map"][str(ks[-1])]))
    out.print(table)
    k = 4 if 4 in ks else ks[-1]  # the retrieval method's top-4 when evaluated
    scored = {c: g["hit_rate"][str(k)] for c, g in summary["per_category"].items() if g["n_queries"]}
    if len(scored) > 1:
        worst = min(scored, key=lambda c: (scored[c], c))
        out.print(f"worst category at top-{k}: {worst} {fmt(scored[worst])}")
    out.print(f"report: {folder / 'report.html'}  metrics: {folder / 'metrics.json'}  plot: {folder / 'hit_rate.png'}")


def unique_stem(photo: Path, used: set[str]) -> str:
    """The photo's file stem, numbered when another photo of this run already has it."""
    base = photo.stem or "photo"
    stem, n = base, 1
    while stem in used:
        n += 1
        stem = f"{base}-{n}"
    used.add(stem)
    return stem
