"""``fashionlens attention PHOTO [PHOTO ...] --model CKPT --out DIR [--normalize]``.

Registered by ``fashionlens.cli`` (``app.command("attention")(attention_command)``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fashionlens.errors import UserError


def _stem(photo: Path, used: set[str]) -> str:
    """The photo's file stem, numbered when another photo of this run already has it."""
    base = photo.stem or "photo"
    stem, n = base, 1
    while stem in used:
        n += 1
        stem = f"{base}-{n}"
    used.add(stem)
    return stem


def attention_command(
    photos: Annotated[list[Path], typer.Argument(help="one or more photos")],
    model: Annotated[Path, typer.Option("--model", "-m", help="checkpoint folder written by 'fashionlens train', "
                                        "or its run folder (a model with a 'lan' neck)")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for the PNG files (created)")],
    normalize: Annotated[bool, typer.Option(
        "--normalize", help="rescale each mask to [0, 1] (its own min/max) before multiplying; "
        "default: the raw sigmoid mask, as in the thesis")] = False,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
) -> None:
    """Attention maps of a trained model: each branch's spatial mask, nearest-upsampled to the
    (letterboxed) photo and multiplied with it, as in thesis A.

    Writes OUT/<stem>-attention.png (the photo and every branch side by side, captioned) and
    OUT/<stem>-branch<i>.png per branch (<stem>-<sub-neck>-branch<i>.png for a multi neck with
    several attention necks), and prints the written paths. Unreadable photos are reported and
    skipped; the exit code is then 1.
    """
    from fashionlens.data.images import ImageError, open_image
    from fashionlens.explain.attention import attention_masks, attention_sheet, file_tag, masked_images
    from fashionlens.models.builder import is_checkpoint, load_checkpoint, resolve_checkpoint

    if not is_checkpoint(model := resolve_checkpoint(model)):
        raise UserError(f"--model {model}: not a model checkpoint; attention maps need a checkpoint folder "
                        "written by 'fashionlens train' (model.safetensors + config.json) with a 'lan' neck")
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
        stem = _stem(photo, used)
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
        sys.exit(1)  # not typer.Exit: fashionlens.cli.main() runs the app with standalone_mode=False
