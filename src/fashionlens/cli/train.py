"""``fashionlens train``, ``fashionlens adapt`` and ``fashionlens attention``.

Under torchrun (``python -m torch.distributed.run --nproc_per_node 2 -m fashionlens train ...``)
every process runs ``train`` or ``adapt``; only rank 0 prints and writes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fashionlens.cli.console import TrainProgress, fmt, query_figures, run_with_progress, unique_stem
from fashionlens.errors import UserError
from fashionlens.training.adapt import AdaptConfig
from fashionlens.training.config import TrainConfig


def train_command(
    config: Annotated[Path, typer.Argument(help="YAML file with the training settings")],
    set_: Annotated[list[str], typer.Option("--set", help="override a setting: --set model.neck.dim=128 (repeatable)")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder (overrides 'out')")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="total epochs (overrides 'epochs')")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="torch device (overrides 'device')")] = None,
) -> None:
    from fashionlens.training import load_train_config, train

    cfg = load_train_config(config, list(set_), out=str(out) if out is not None else None, epochs=epochs, device=device)
    run_with_progress(TrainProgress, lambda progress: train(cfg, progress=progress),
                      lambda row: f"run folder: {cfg.out} (metrics.csv, curves.png, last/, best/); "
                                  f"last epoch {row.get('epoch', '-')}")


train_command.__doc__ = (
    "Train a retrieval model with the batch-all triplet loss on P x K batches (the same-style retrieval method, "
    "docs/METHODS.md), "
    "validating top-1/top-4 hit rate on held-out identities every epoch (and, with val_queries, on "
    "labelled query photos against the whole catalog, which then picks OUT/best). With "
    "model.freeze_backbone and feature_cache the necks train on cached backbone maps. Resumes from "
    "OUT/last when it exists.\n\nSettings (YAML keys; nested ones with --set a.b=value):\n\n" + TrainConfig.help_text())


class AdaptProgress(TrainProgress):
    """The training progress, plus one line per round and a bar while the target is embedded."""

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "round":
            self.stop()
            labels = {"positive_precision": "pseudo-label precision", "negative_same_label":
                      "negatives with the query's label", "assigned_groups": "share given a source identity",
                      "assignment_precision": "their precision"}
            said = [f"{text} {fmt(event[k])}" for k, text in labels.items() if event.get(k) is not None]
            extra = f" ({', '.join(said)})" if said else ""
            self.console.print(f"[bold]round {event['round']}[/bold]: {event['what']}{extra}")
        elif kind == "mine_step":
            self.count("embedding the target", event)
        elif kind == "round_done":
            self.stop()
            self.console.print(
                f"[bold]round {event['round']} done[/bold]: queries {query_figures(event)}, "
                f"held-out identities top-1 {fmt(event.get('val_top1'))}; "
                f"model {event.get('model')}")
        elif kind == "stopped":
            self.console.print(f"stopped after round {event['round']}: no better validation for the last rounds; "
                               f"best is round {event['best']['round']}")
        else:
            super().__call__(event)


def adapt_command(
    config: Annotated[Path, typer.Argument(help="YAML file with the adaptation settings")],
    set_: Annotated[list[str], typer.Option("--set", help="override a setting: --set group_size=5 --set train.lr=1e-4")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder (overrides 'out')")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", help="mining rounds (overrides 'rounds')")] = None,
) -> None:
    from fashionlens.training.adapt import adapt, load_adapt_config

    cfg = load_adapt_config(config, list(set_), out=str(out) if out is not None else None, rounds=rounds)
    run_with_progress(AdaptProgress, lambda progress: adapt(cfg, progress=progress),
                      lambda rows: f"run folder: {cfg.out} (rounds.csv, best.json, round-N/); {len(rows) - 1} round(s)")


adapt_command.__doc__ = (
    "Adapt a trained model to an unlabeled target domain by cross-domain sample mining (the same-style retrieval "
    "method, docs/METHODS.md): each round draws queries from the target photos, retrieves within the rest of the "
    "target, makes each query and its top m (group_size) a new identity with ranks i..j (negatives_from.."
    "negatives_to) as its negatives, and retrains on the "
    "source + mined identities. Stops after ROUNDS or when validation stops improving; an "
    "interrupted run continues from the last finished round.\n\nSettings (YAML keys; --set a.b=value):\n\n"
    + AdaptConfig.help_text())


def attention_command(
    photos: Annotated[list[Path], typer.Argument(help="one or more photos")],
    model: Annotated[Path, typer.Option("--model", "-m", help="checkpoint folder written by 'fashionlens train', "
                                        "or its run folder (a model with a 'local_alignment' neck)")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for the PNG files (created)")],
    normalize: Annotated[bool, typer.Option(
        "--normalize", help="rescale each mask to [0, 1] (its own min/max) before multiplying; "
        "default: the raw sigmoid mask, as in the method")] = False,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
) -> None:
    """Attention maps of a trained model: each branch's spatial mask, nearest-upsampled to the
    (letterboxed) photo and multiplied with it, as in the same-style retrieval method (docs/METHODS.md).

    Writes OUT/<stem>-attention.png (the photo and every branch side by side, captioned) and
    OUT/<stem>-branch<i>.png per branch (<stem>-<sub-neck>-branch<i>.png for a multi neck with
    several attention necks), and prints the written paths. Unreadable photos are reported and
    skipped; the exit code is then 1.
    """
    from fashionlens.data.images import ImageError, open_image
    from fashionlens.explain.attention import attention_masks, attention_sheet, file_tag, masked_images
    from fashionlens.models.checkpoints import is_checkpoint, load_checkpoint, resolve_checkpoint

    if not is_checkpoint(model := resolve_checkpoint(model)):
        raise UserError(f"--model {model}: not a model checkpoint; attention maps need a checkpoint folder "
                        "written by 'fashionlens train' (model.safetensors + config.json) with a 'local_alignment' neck")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a folder")
    try:
        net, _, _ = load_checkpoint(model, device)
    except (RuntimeError, AssertionError, ValueError) as exc:  # e.g. --device cuda without a GPU
        raise UserError(f"--device {device}: cannot put the model there ({' '.join(str(exc).split())[:200]})") from None
    size = int(net.data_config["input_size"][-1])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out_dir}: cannot create the folder ({exc.strerror})") from None
    failed, used = [], set()
    for photo in photos:
        try:
            image = open_image(photo, draft_size=size)
        except ImageError as exc:
            typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
            failed.append(photo)
            continue
        boxed, masks = attention_masks(net, image)  # no masks at all: UserError, exit 2
        stem = unique_stem(photo, used)
        written = [out_dir / f"{stem}-attention.png"]
        images = {key: masked_images(boxed, branch_masks, normalize) for key, branch_masks in masks.items()}
        attention_sheet(boxed, masks, normalize, images=images).save(written[0])
        for key, branch_images in images.items():
            tag = file_tag(key, len(masks) > 1)
            for i, img in enumerate(branch_images, 1):
                written.append(out_dir / f"{stem}-{tag}branch{i}.png")
                img.save(written[-1])
        for path in written:
            typer.echo(str(path))
    if failed:
        typer.echo(f"{len(failed)} of {len(photos)} photo(s) could not be read", err=True)
        sys.exit(1)  # not typer.Exit: fashionlens.cli.app.main() runs the app with standalone_mode=False
