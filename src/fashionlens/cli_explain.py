"""``fashionlens explain PHOTO... --model CKPT [--out DIR] [--attribute A ...] [--json]``.

Registered by ``fashionlens.cli`` (``app.command("explain")(explain_command)``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from fashionlens.cli_attention import _stem
from fashionlens.errors import UserError


def _resolve_attributes(requested: list[str], schema: dict[str, list[str]]) -> list[str] | None:
    """Attribute names as given, or by display name (``neckline`` for ``neckline_labels``)."""
    from fashionlens.explain.attributes import display_name, find_attribute

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
    """Explain a garment's attributes (thesis B): per attribute the predicted value and its
    confidence, the Grad-CAM of that value, the box of the CAM's largest region, drawn in one PNG
    per photo (photo, CAM, overlay, box per attribute; the thesis' figures 15-17), and JSON beside
    it. Boxes are [x, y, w, h] in the photo's pixels. Unreadable photos are reported and skipped
    (exit code 1)."""
    from rich.console import Console
    from rich.table import Table

    from fashionlens.data.images import ImageError, open_image
    from fashionlens.explain.attributes import AttributeExplainer
    from fashionlens.explain.figures import explanation_figure
    from fashionlens.models.builder import resolve_checkpoint
    from fashionlens.training.attributes import load_attribute_model

    if method not in ("auto", "gradcam"):
        raise UserError(f"--method {method!r}: use auto or gradcam")
    if not 0 < box_threshold <= 1:
        raise UserError(f"--box-threshold {box_threshold}: must be in (0, 1]")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a folder")
    model = resolve_checkpoint(model)  # a run folder: its best/, named as such in the output
    net, cfg, _ = load_attribute_model(model, device)
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
        stem = _stem(photo, used)
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


