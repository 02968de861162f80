"""``fashionlens demo``: the whole loop on the embedded default, on whatever data there is.

Data, in order: ``--data`` (or ``$FASHIONLENS_DATA``, or ``../shared/data`` when present: shop
catalog + buyers' photos), ``--photos`` (a user's own folder; sub-folders are labels), or a
public CC0 clothing photo set downloaded once into the user's cache. What it has to say goes to
the caller's ``say`` and ``show_hits`` (the command line prints them).
"""

from __future__ import annotations

import csv
import os
import shutil
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fashionlens.data.catalog import iter_image_folder
from fashionlens.data.records import Item
from fashionlens.errors import UserError
from fashionlens.evaluation.protocols import EvaluateConfig, consumer_relevance, read_label_mapping, run_queries
from fashionlens.index.config import IndexConfig
from fashionlens.index.pipeline import Progress, build_index
from fashionlens.index.query import Searcher

CC0_URL = "https://github.com/alexeygrigorev/clothing-dataset-small/archive/refs/heads/master.zip"
CC0_NAME = "clothing-dataset-small (Grigorev, CC0)"


def find_shared_data(explicit: Path | None) -> Path | None:
    for candidate in (explicit, os.environ.get("FASHIONLENS_DATA"), Path("../shared/data")):
        if candidate and (Path(candidate) / "catalog").is_dir():
            return Path(candidate)
    if explicit:
        raise UserError(f"{explicit}: expected the shared data folder (with catalog/ and consumer/)")
    return None


def download_cc0(cache: Path, say: Callable[[str], None] = print) -> Path:
    """Download and unpack the CC0 clothing set once; returns its folder."""
    target = cache / "clothing-dataset-small"
    if (target / "test").is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / "clothing-dataset-small.zip.part"
    say(f"downloading {CC0_NAME} from {CC0_URL}")
    try:
        with urllib.request.urlopen(CC0_URL, timeout=20) as resp, open(archive, "wb") as fh:
            shutil.copyfileobj(resp, fh)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(cache / "unpack")
    except (OSError, zipfile.BadZipFile) as exc:
        archive.unlink(missing_ok=True)
        raise UserError(
            "no data to run the demo on: ../shared/data is not here, no --photos folder was given, "
            f"and downloading {CC0_NAME} failed ({exc}). Pass --photos DIR with your own clothing photos."
        ) from None
    (cache / "unpack" / "clothing-dataset-small-master").rename(target)
    archive.unlink()
    return target


def _pick_queries(items: list[Item], n: int) -> list[Path]:
    """One photo from each of the first ``n`` labels."""
    seen, picked = set(), []
    for item in items:
        label = item.metadata.get("label")
        if label not in seen:
            seen.add(label)
            picked.append(item.path)
    return picked[:n]


@dataclass
class DemoData:
    """What the demo indexes and asks: a catalog, query photos, and which results are hits (the
    query's label -> values of the catalog column ``field``)."""

    catalog: Path
    queries: list[Item]
    mapping: dict[str, frozenset[str]]
    field: str


def demo_data(data: Path | None, photos: Path | None, out: Path, download: bool,
              say: Callable[[str], None] = print) -> DemoData:
    """The shared data, the user's photos (every 10th of each sub-folder a query), or the CC0 set."""
    shared = None if photos else find_shared_data(data)
    if shared:
        say(f"using the shared data in {shared}: catalog/ (shop photos) is indexed, "
            "consumer/test/ (buyers' photos) are the queries")
        return DemoData(shared / "catalog", list(iter_image_folder(shared / "consumer" / "test")),
                        read_label_mapping(shared / "consumer" / "catalog_types.csv"), "articleType")
    if photos is None:
        if not download:
            raise UserError("no data: ../shared/data is not here; pass --photos DIR or allow --download")
        root = download_cc0(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fashionlens", say)
        say(f"using the downloaded {CC0_NAME} in {root}: train/ is the catalog, test/ the queries")
        gallery, query_items = list(iter_image_folder(root / "train")), list(iter_image_folder(root / "test"))
    else:
        if not photos.is_dir():
            raise UserError(f"{photos}: not a folder of photos")
        items = list(iter_image_folder(photos))
        if not items:
            raise UserError(f"{photos}: no images found")
        say(f"using your photos in {photos}: every 10th photo of each sub-folder is held out as a query")
        gallery = [it for i, it in enumerate(items) if i % 10 != 5]
        query_items = [it for i, it in enumerate(items) if i % 10 == 5] or items[:1]
    out.mkdir(parents=True, exist_ok=True)
    catalog = out / "catalog.csv"
    with open(catalog, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "path", "label"])
        writer.writerows([it.id, str(it.path.resolve()), it.metadata["label"]] for it in gallery)
    mapping = {label: frozenset([label]) for label in {it.metadata["label"] for it in gallery}}
    return DemoData(catalog, [q for q in query_items if q.metadata["label"] in mapping], mapping, "label")


def run_demo(data: Path | None, photos: Path | None, out: Path, n_queries: int, download: bool,
             say: Callable[[str], None] = print, show_hits: Callable[[Path, list], None] | None = None,
             progress: Progress | None = None) -> dict | None:
    """Index the demo's catalog into ``out/index``, show the hits of ``n_queries`` photos (one of each of
    the first labels) and evaluate every query into ``out/evaluation``; returns its summary (None
    without queries)."""
    found = demo_data(data, photos, out, download, say)
    index_dir = out / "index"
    report = build_index(found.catalog, index_dir, IndexConfig(), progress)
    say(f"indexed {report.total:,} catalog items into {index_dir} ({report.index}); "
        f"{report.skipped + report.missing} skipped")
    searcher = Searcher(index_dir)
    try:
        picked = _pick_queries(found.queries, n_queries)
        for photo, hits in zip(picked, searcher.search_paths(picked, 5)):
            if show_hits is not None:
                show_hits(photo, hits)
        if not found.queries:
            return None
        cfg = EvaluateConfig()
        return run_queries(searcher.index, searcher.embedder, found.queries,
                           consumer_relevance(found.mapping, found.field), out / "evaluation", cfg.ks,
                           f"demo: queries -> catalog ({found.field})", max_html=cfg.max_html_queries,
                           progress=progress, label="evaluating")
    finally:
        searcher.close()
