"""``fashionlens index``: catalog reader -> embedding engine (:mod:`.engines`: here, or Ray) ->
the store's writer (:mod:`.stores`: a local folder, or Milvus).

A local folder is resumable by construction: the catalog is first synced into SQLite
(idempotent), then only ``pending`` items are embedded; each chunk file is written before SQLite
commits its rows as ``embedded``, so a kill loses at most one uncommitted chunk, which the next run
redoes; then the FAISS index. Files that cannot be decoded are marked ``skipped`` with the reason
and listed in ``skipped.csv``. A Milvus store is written by :mod:`.upsert_writer`.
"""

from __future__ import annotations

import csv
import gc
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from fashionlens.data.catalog import CatalogSource, Missing, open_catalog
from fashionlens.errors import UserError
from fashionlens.index.catalog_index import INDEX_SETTINGS, CatalogIndex
from fashionlens.index.config import IndexConfig
from fashionlens.index.engines import ENGINES, Engine
from fashionlens.index.stores import open_store
from fashionlens.models.checkpoints import chosen_model, is_checkpoint
from fashionlens.models.embedder import Embedder, build_embedder

SYNC_BATCH = 5000


@dataclass
class IndexReport:
    added: int = 0
    changed: int = 0
    missing: int = 0
    duplicates: list[str] = field(default_factory=list)
    embedded: int = 0
    skipped: int = 0
    total: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    startup_seconds: float = 0.0  # until the first batch came back (Ray: its actors loading their model)
    steady_images_per_second: float = 0.0  # after the first batch
    index: str = ""
    skipped_report: str = ""
    engine: str = ""


class EmbedClock:
    """The embedding phase's time, whole and after the first batch: an engine's start-up (Ray's
    workers and actors starting, each loading the model) is then told apart from its rate."""

    def __init__(self):
        self.started, self.first, self.first_n, self.done = time.perf_counter(), None, 0, 0

    def add(self, n: int) -> None:
        self.done += n
        if self.first is None and n:
            self.first, self.first_n = time.perf_counter(), n

    def report(self, report: IndexReport) -> None:
        end = time.perf_counter()
        report.seconds = end - self.started
        report.images_per_second = self.done / report.seconds if report.seconds > 0 and self.done else 0.0
        if self.first is not None:
            report.startup_seconds = self.first - self.started
            later = self.done - self.first_n
            report.steady_images_per_second = later / (end - self.first) if later and end > self.first else 0.0


class Progress:
    """What the pipeline tells the user; the CLI gives a rich progress bar."""

    def start(self, total: int, label: str) -> None: ...
    def advance(self, n: int) -> None: ...
    def log(self, message: str) -> None: ...
    def stop(self) -> None: ...


def sync_catalog(index: CatalogIndex, source: CatalogSource, report: IndexReport, progress: Progress) -> None:
    """Stream the catalog into SQLite (idempotent): new items, changed paths, missing images."""
    run = index.store.new_run()
    progress.log(f"reading {source.describe()}")
    stream = iter(source)
    while batch := list(islice(stream, SYNC_BATCH)):
        items = [x for x in batch if not isinstance(x, Missing)]
        for miss in (x for x in batch if isinstance(x, Missing)):
            index.store.record_missing(miss.id, miss.reason, run)
            report.missing += 1
        added, changed, dups = index.store.upsert(items, run)
        report.added += added
        report.changed += changed
        report.duplicates += dups
    if index.store.count() == 0 and report.missing == 0:
        raise UserError(f"{source.path}: the catalog has no items")


def with_regions(rows: list[tuple], cropper) -> list[tuple]:
    """(key, path, metadata) rows -> (key, path, the item's crop region) for ``cropper``."""
    if cropper is None:
        return rows
    return [(key, path, cropper.region_for(metadata)) for key, path, metadata in rows]


def check_crop(recorded: dict | None, cfg: IndexConfig, location, has_items: bool) -> None:
    """Vectors of one store come from one crop: refuse to add with another."""
    if recorded is None:
        recorded = {"crop": "none", "crop_regions": None}
    wanted = {"crop": cfg.crop, "crop_regions": cfg.crop_regions}
    if has_items and recorded != wanted:
        raise UserError(f"{location} was indexed with crop {recorded['crop']}"
                        + (f" (regions {recorded['crop_regions']})" if recorded.get("crop_regions") else "")
                        + f"; this run asks for crop {cfg.crop}: use the same --crop, or a new store")


def embed_pending(index: CatalogIndex, engine: Engine, cfg: IndexConfig, report: IndexReport,
                  progress: Progress) -> None:
    store, embedder = index.store, engine.embedder
    total = store.count("pending")
    progress.start(total, "embedding")
    buf_ids: list[int] = []
    buf_vecs: list[np.ndarray] = []
    buf_skipped: list[tuple[int, str]] = []
    buf_crops: list[dict | None] = []
    clock = EmbedClock()

    def flush() -> None:
        chunk = store.next_chunk()
        vecs = np.concatenate(buf_vecs) if buf_vecs else np.zeros((0, embedder.dim), np.float32)
        index.chunks.write(chunk, np.asarray(buf_ids, np.int64), vecs)
        store.commit_chunk(chunk, list(buf_ids), list(buf_skipped), list(buf_crops))
        report.embedded += len(buf_ids)
        report.skipped += len(buf_skipped)
        buf_ids.clear(), buf_vecs.clear(), buf_skipped.clear(), buf_crops.clear()

    for page in store.pending(engine.page, metadata=engine.cropper is not None):
        for batch in engine.embed(with_regions(page, engine.cropper)):
            buf_ids.extend(batch.keys)
            buf_crops.extend(batch.crops or [None] * len(batch.keys))
            buf_vecs.append(batch.vectors)
            buf_skipped.extend(batch.errors)
            progress.advance(len(batch.keys) + len(batch.errors))
            clock.add(len(batch.keys) + len(batch.errors))
            if len(buf_ids) + len(buf_skipped) >= cfg.chunk_size:
                flush()
    if buf_ids or buf_skipped:
        flush()
    progress.stop()
    clock.report(report)


def write_skipped_report(index: CatalogIndex) -> Path:
    path = index.folder / "skipped.csv"
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "path", "reason"])
        writer.writerows(index.store.skipped())
    tmp.replace(path)
    return path


def build_index(catalog: Path, out: Path | str, cfg: IndexConfig, progress: Progress | None = None,
                embedder: Embedder | None = None) -> IndexReport:
    """Index (or update, or resume indexing) ``catalog`` into the store ``out`` (a folder,
    ``milvus://...`` or ``milvus+lite://...``), embedding with ``cfg.engine``."""
    progress = progress or Progress()
    source = open_catalog(catalog)  # a bad catalog path fails before any folder is made or model loaded
    if embedder is None:
        # a run folder: record the checkpoint it hands over; a checkpoint by its absolute path, so that
        # `search` and `serve` find it from any folder (its embedder record names that path anyway)
        chosen = chosen_model(cfg.model)
        chosen = str(Path(chosen).resolve()) if is_checkpoint(chosen) else chosen
        if chosen != cfg.model:
            cfg = cfg.model_copy(update={"model": chosen})
    # a bad model fails before any folder is made
    embedder = embedder or build_embedder(cfg.model, cfg.input_size, cfg.device, optimize=cfg.optimize)
    # the engine first: Ray starts its processes before an in-process Milvus Lite starts its gRPC threads
    # (a fork beside those threads left Ray's GCS without its port file)
    engine, described = ENGINES.get(cfg.engine)(cfg, embedder), embedder.describe()
    embedder = None  # the engine holds it (and frees it)
    store = None
    try:
        store = open_store(out, create=True)
        store.check_embedder(described)
        report = IndexReport(engine=engine.describe())
        if store.stateless:
            from fashionlens.index.upsert_writer import ingest

            ingest(store, source, engine, cfg, report, progress)
        else:
            _index_local(store, source, engine, cfg, report, progress, catalog)
        return report
    finally:
        engine.close()
        if store is not None:
            store.close()


def _index_local(index: CatalogIndex, source: CatalogSource, engine: Engine, cfg: IndexConfig, report: IndexReport,
                 progress: Progress, catalog: Path) -> None:
    store = index.store
    check_crop(store.get_meta("crop"), cfg, index.folder, store.count("embedded") > 0)
    sync_catalog(index, source, report, progress)
    with store.db:
        store.set_meta("crop", {"crop": cfg.crop, "crop_regions": cfg.crop_regions}, commit=False)
        store.set_meta("config", {"command": "index", "catalog": str(catalog), **cfg.model_dump()}, commit=False)
        store.set_meta("embedder", engine.embedder.describe(), commit=False)
        store.set_meta("index_settings", {k: getattr(cfg, k) for k in INDEX_SETTINGS}, commit=False)
    embed_pending(index, engine, cfg, report, progress)
    engine.embedder = None  # free the model before the FAISS build, the memory peak of large catalogs
    gc.collect()
    spec = index.refresh(log=progress.log)
    report.index = spec.factory
    report.total = store.count("embedded")
    report.skipped_report = str(write_skipped_report(index))
