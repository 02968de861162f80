"""``fashionlens adapt CONFIG.yaml [--set a.b=value ...] [--out DIR] [--rounds N]``: cross-domain
mining rounds (thesis A, 3.2.4). Registered by ``fashionlens.cli``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from fashionlens.cli_train import _RichTrainProgress
from fashionlens.training.adapt import AdaptConfig


class _RichAdaptProgress(_RichTrainProgress):
    """The training progress, plus one line per round and a bar while the target is embedded."""

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        fmt = lambda v: "-" if v in (None, "") else f"{float(v):.3f}"  # noqa: E731
        if kind == "round":
            self.stop()
            labels = {"positive_precision": "pseudo-label precision", "negative_same_label":
                      "negatives with the query's label", "assigned_groups": "share given a source identity",
                      "assignment_precision": "their precision"}
            said = [f"{text} {fmt(event[k])}" for k, text in labels.items() if event.get(k) is not None]
            extra = f" ({', '.join(said)})" if said else ""
            self.console.print(f"[bold]round {event['round']}[/bold]: {event['what']}{extra}")
        elif kind == "mine_step":
            self._count("embedding the target", event)
        elif kind == "round_done":
            self.stop()
            self.console.print(
                f"[bold]round {event['round']} done[/bold]: queries top-1 {fmt(event.get('query_top1'))} "
                f"top-4 {fmt(event.get('query_top4'))}, held-out identities top-1 {fmt(event.get('val_top1'))}; "
                f"model {event.get('model')}")
        elif kind == "stopped":
            self.console.print(f"stopped after round {event['round']}: no better validation for the last rounds; "
                               f"best is round {event['best']['round']}")
        else:
            super().__call__(event)


def adapt_command(
    config: Annotated[Path, typer.Argument(help="YAML file with the adaptation settings")],
    set_: Annotated[list[str], typer.Option("--set", help="override a setting: --set m=5 --set train.lr=1e-4")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder (overrides 'out')")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", help="mining rounds (overrides 'rounds')")] = None,
) -> None:
    from fashionlens.training.adapt import adapt, load_adapt_config

    cfg = load_adapt_config(config, list(set_), out=str(out) if out is not None else None, rounds=rounds)
    progress = _RichAdaptProgress() if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        rows = adapt(cfg, progress=progress)
    finally:
        if progress is not None:
            progress.stop()
    if progress is not None:
        progress.console.print(f"run folder: {cfg.out} (rounds.csv, best.json, round-N/); {len(rows) - 1} round(s)")


adapt_command.__doc__ = (
    "Adapt a trained model to an unlabeled target domain by cross-domain sample mining (thesis A): "
    "each round draws queries from the target photos, retrieves within the rest of the target, makes "
    "each query and its top m a new identity with ranks i..j as its negatives, and retrains on the "
    "source + mined identities. Stops after ROUNDS or when validation stops improving; an "
    "interrupted run continues from the last finished round.\n\nSettings (YAML keys; --set a.b=value):\n\n"
    + AdaptConfig.help_text())
