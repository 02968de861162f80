"""``fashionlens demo``: the whole loop on the embedded default, on whatever data there is.

Data, in order: ``--data`` (or ``$FASHIONLENS_DATA``, or ``../shared/data`` when present: shop
catalog + buyers' photos), ``--photos`` (a user's own folder; sub-folders are labels), or a
public CC0 clothing photo set downloaded once into the user's cache.
"""

from __future__ import annotations

import csv
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path

from fashionlens.config import EvaluateConfig, IndexConfig
from fashionlens.data.catalog import iter_image_folder
from fashionlens.data.records import Item
from fashionlens.errors import UserError

CC0_URL = "https://github.com/alexeygrigorev/clothing-dataset-small/archive/refs/heads/master.zip"
CC0_NAME = "clothing-dataset-small (Grigorev, CC0)"


def _say(message: str) -> None:
    from fashionlens.cli import out

    out.print(message, highlight=False)


def find_shared_data(explicit: Path | None) -> Path | None:
    for candidate in (explicit, os.environ.get("FASHIONLENS_DATA"), Path("../shared/data")):
        if candidate and (Path(candidate) / "catalog").is_dir():
            return Path(candidate)
    if explicit:
        raise UserError(f"{explicit}: expected the shared data folder (with catalog/ and consumer/)")
    return None


def download_cc0(cache: Path) -> Path:
    """Download and unpack the CC0 clothing set once; returns its folder."""
    target = cache / "clothing-dataset-small"
    if (target / "test").is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / "clothing-dataset-small.zip.part"
    _say(f"downloading {CC0_NAME} from {CC0_URL}")
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


def _print_hits(searcher, photos: list[Path], k: int = 5) -> None:
    from fashionlens.cli import hits_table, out

    for photo, hits in zip(photos, searcher.search_paths(photos, k)):
        out.print(hits_table(f"query: {photo}", hits))


def _pick_queries(items: list[Item], n: int) -> list[Path]:
    """One photo from each of the first ``n`` labels."""
    seen, picked = set(), []
    for item in items:
        label = item.metadata.get("label")
        if label not in seen:
            seen.add(label)
            picked.append(item.path)
    return picked[:n]


def run_demo(data: Path | None, photos: Path | None, out: Path, n_queries: int, download: bool) -> None:
    from fashionlens.cli import RichProgress
    from fashionlens.cli_evaluate import _print_summary
    from fashionlens.evaluation.protocols import consumer_relevance, read_label_mapping, run_queries
    from fashionlens.index.pipeline import build_index
    from fashionlens.index.query import Searcher

    shared = None if photos else find_shared_data(data)
    if shared:
        _say(f"using the shared data in {shared}: catalog/ (shop photos) is indexed, "
             "consumer/test/ (buyers' photos) are the queries")
        catalog, query_items = shared / "catalog", list(iter_image_folder(shared / "consumer" / "test"))
        mapping, field = read_label_mapping(shared / "consumer" / "catalog_types.csv"), "articleType"
    else:
        if photos is None:
            if not download:
                raise UserError("no data: ../shared/data is not here; pass --photos DIR or allow --download")
            root = download_cc0(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fashionlens")
            _say(f"using the downloaded {CC0_NAME} in {root}: train/ is the catalog, test/ the queries")
            gallery, query_items = list(iter_image_folder(root / "train")), list(iter_image_folder(root / "test"))
        else:
            if not photos.is_dir():
                raise UserError(f"{photos}: not a folder of photos")
            items = list(iter_image_folder(photos))
            if not items:
                raise UserError(f"{photos}: no images found")
            _say(f"using your photos in {photos}: every 10th photo of each sub-folder is held out as a query")
            gallery = [it for i, it in enumerate(items) if i % 10 != 5]
            query_items = [it for i, it in enumerate(items) if i % 10 == 5] or items[:1]
        out.mkdir(parents=True, exist_ok=True)
        catalog = out / "catalog.csv"
        with open(catalog, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "path", "label"])
            writer.writerows([it.id, str(it.path.resolve()), it.metadata["label"]] for it in gallery)
        labels = {it.metadata["label"] for it in gallery}
        mapping, field = {label: frozenset([label]) for label in labels}, "label"
        query_items = [q for q in query_items if q.metadata["label"] in mapping]

    index_dir = out / "index"
    report = build_index(catalog, index_dir, IndexConfig(), RichProgress())
    _say(f"indexed {report.total:,} catalog items into {index_dir} ({report.index}); "
         f"{report.skipped + report.missing} skipped")
    searcher = Searcher(index_dir)
    try:
        _print_hits(searcher, _pick_queries(query_items, n_queries))
        if not query_items:
            return
        cfg = EvaluateConfig()
        progress = RichProgress()
        progress.start(len(query_items), "evaluating")
        summary = run_queries(searcher.index, searcher.embedder, query_items, consumer_relevance(mapping, field),
                              out / "evaluation", cfg.ks, f"demo: queries -> catalog ({field})",
                              max_html=cfg.max_html_queries, on_progress=progress.advance)
        progress.stop()
    finally:
        searcher.close()
    _print_summary(summary, out / "evaluation")
