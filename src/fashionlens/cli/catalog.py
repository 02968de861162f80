"""The catalog commands: ``index``, ``remove``, ``search`` and ``info``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from fashionlens.cli.console import ConfigOpt, RichProgress, console, hits_table, out
from fashionlens.errors import UserError
from fashionlens.index.config import IndexConfig, SearchConfig


def index(
    catalog: Annotated[Path, typer.Argument(help="catalog CSV, folder of images, or folder with both")],
    out_dir: Annotated[str, typer.Option("--out", "--store", "-o", help="where the index goes (created, or updated): "
                                         "a folder, milvus://HOST:PORT/COLLECTION or milvus+lite://FILE.db/COLLECTION")],
    config: ConfigOpt = None,
    model: Annotated[Optional[str], typer.Option(help="'lite0', 'lite2' (offline), a timm model name, or a "
                                                 "checkpoint / train or adapt run folder (its chosen model)")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="letterbox size in pixels")] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    workers: Annotated[Optional[int], typer.Option(help="decoding processes")] = None,
    index_type: Annotated[Optional[str], typer.Option(help="auto, flat, ivfflat, hnsw or ivfpq")] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    optimize: Annotated[Optional[str], typer.Option(help="auto, jit or none")] = None,
    engine: Annotated[Optional[str], typer.Option(help="local, or ray (Ray Data on a cluster or a local one)")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="the Ray cluster (else $RAY_ADDRESS, else local)")] = None,
    crop: Annotated[Optional[str], typer.Option(help="cut each photo first: none, person, garment or auto (the box "
                                                "is kept per item)")] = None,
):
    """Index a catalog: embed every image, store vectors and metadata in --out / --store: a folder
    (FAISS + SQLite) or a Milvus collection.

    Running it again on the same store resumes an interrupted run, adds new items and re-embeds
    items whose image path changed. Unreadable files are skipped and listed in skipped.csv (in the
    folder; for Milvus, in the working folder). A Milvus server's token: $FASHIONLENS_MILVUS_TOKEN.
    """
    from fashionlens.index.pipeline import build_index

    cfg = IndexConfig.load(config, model=model, input_size=input_size, batch_size=batch_size,
                           workers=workers, index_type=index_type, device=device, optimize=optimize, engine=engine,
                           ray_address=ray_address, crop=crop)
    report = build_index(catalog, out_dir, cfg, RichProgress())
    console.print(
        f"[green]indexed[/green] {report.total:,} items in {out_dir} ({report.index}; {report.engine}); this run: "
        f"{report.added:,} new, {report.changed:,} changed, {report.embedded:,} embedded at "
        f"{report.images_per_second:.1f} img/s ({report.steady_images_per_second:.1f} after a "
        f"{report.startup_seconds:.1f} s start), {report.skipped:,} unreadable, {report.missing:,} missing"
    )
    if report.duplicates:
        console.print(f"[yellow]ids listed twice (first row kept):[/yellow] {', '.join(report.duplicates[:10])}")
    if report.skipped or report.missing:
        console.print(f"skipped files are listed in {report.skipped_report}")


index.__doc__ += "\n\nSettings:\n\n" + IndexConfig.help_text()


STORE_HELP = "index folder, milvus://HOST:PORT/COLLECTION or milvus+lite://FILE.db/COLLECTION"


def remove(
    index_dir: Annotated[str, typer.Argument(help=STORE_HELP)],
    ids: Annotated[list[str], typer.Argument(help="item ids to remove")],
):
    """Remove items from an index by id."""
    from fashionlens.index.stores import open_store

    with open_store(index_dir, write=True) as idx:
        unknown = idx.remove(ids)
    console.print(f"removed {len(ids) - len(unknown)} item(s)")
    if unknown:
        raise UserError(f"not in the catalog: {', '.join(unknown)}")


def search(
    index_dir: Annotated[str, typer.Argument(help=STORE_HELP + ", made by 'fashionlens index'")],
    photos: Annotated[list[Path], typer.Argument(help="one or more photos")],
    k: Annotated[Optional[int], typer.Option("-k", help="results per photo")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON: one list of results per photo")] = False,
    config: ConfigOpt = None,
    explain: Annotated[bool, typer.Option("--explain", help="say why each result matches (attributes)")] = False,
    want: Annotated[Optional[list[str]], typer.Option(
        "--want", help="ATTR=VALUE: only items with that value, e.g. neckline=v-shape (repeatable)")] = None,
    filters: Annotated[Optional[list[str]], typer.Option(
        "--filter", help="COLUMN=VALUE: only items with that metadata value, e.g. gender=Men (repeatable)")] = None,
    min_confidence: Annotated[Optional[float], typer.Option(
        "--min-confidence", help="attributes predicted with less are not mentioned")] = None,
    crop: Annotated[Optional[str], typer.Option(help="cut each photo first: none, person, garment or auto; the box "
                                                "used is reported")] = None,
):
    """Search the catalog by photo; several photos are embedded as one batch.

    --explain and --want need the attributes of 'fashionlens index-attributes'.
    """
    from fashionlens.index.query import DRAFT_SIZE, Searcher, load_photos

    cfg = SearchConfig.load(config, k=k, explain=explain or None, want=want or None, filters=filters or None,
                            min_confidence=min_confidence, crop=crop)
    images = load_photos(photos, DRAFT_SIZE)  # bad photos fail before the model loads
    explained = cfg.explain or bool(cfg.want)
    searcher = Searcher(index_dir, attributes=explained)
    queries = None
    try:
        embed_images, crops = searcher.decode(photos, cfg.crop)  # as the catalog was decoded: same photo, same vector
        if explained or cfg.filters:
            results, queries = searcher.search_explained(images, cfg, embed_images)
        else:
            results = searcher.search_images(embed_images, cfg.k, cfg.batch_size)
    finally:
        searcher.close()
    if as_json:
        payload = []
        for n, (photo, hits) in enumerate(zip(photos, results)):
            entry = {"photo": str(photo), **({"crop": crops[n]} if crops[n] else {}),
                     "results": [
                {"rank": r + 1, "id": h.id, "score": round(h.score, 6), "path": h.path, **h.metadata,
                 **({"crop": h.crop} if h.crop else {}), **({"reasons": h.reasons} if explained else {})}
                for r, h in enumerate(hits)]}
            if queries is not None:
                entry["attributes"] = _photo_attributes(photo, images[n], queries[n])
            payload.append(entry)
        out.print_json(json.dumps(payload, ensure_ascii=False))
        return
    for n, (photo, hits) in enumerate(zip(photos, results)):
        if c := crops[n]:
            out.print(f"{photo}: searched the {c['region']} box {c['box']} (found by {c['method']})", markup=False)
        out.print(hits_table(str(photo), hits))
        for rank, h in enumerate(hits if explained else [], 1):  # full lines: a table column would be cramped
            out.print(f"  {rank}. {h.id}: {h.reasons['text']}", markup=False, highlight=False, soft_wrap=True)


search.__doc__ += "\n\nSettings:\n\n" + SearchConfig.help_text()


def _photo_attributes(photo: Path, image, results) -> list[dict]:
    """A query photo's predicted attributes, boxes in the photo's own pixels."""
    from PIL import Image

    from fashionlens.index.attribute_indexing import scale_box

    with Image.open(photo) as header:
        full = header.size
    return [{**r.to_json(), "box": list(scale_box(r.box, image.size, full)) if r.box else None} for r in results]


def info(index_dir: Annotated[str, typer.Argument(help=STORE_HELP)]):
    """What an index holds and the configuration that made it."""
    from fashionlens.index.attribute_store import StoredAttributes
    from fashionlens.index.stores import open_store

    with open_store(index_dir) as idx:
        payload = {**idx.summary(), "attributes": StoredAttributes(idx).summary() if idx.get_meta("attributes") else None}
    out.print_json(json.dumps(payload))
