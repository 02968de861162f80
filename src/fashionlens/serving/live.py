"""The index a server holds open: searches, adds and removals from many threads.

Consistency: the FAISS index and the SQLite store change together under one lock, which
searches also take for their index part (vector search, rows, stored attributes); the models
run outside it. A search therefore sees the catalog before or after an add or a removal, never
half of one.

Durability: an added item's photo is written and synced under ``INDEX/uploads/``, its vector to
a chunk file, then one SQLite transaction records item, chunk and attributes; that commit is the
point after which a ``kill -9`` cannot lose it. The FAISS file is rewritten only every
``persist_seconds`` and at shutdown: at start-up the server brings it up to date from the chunks
and tombstones (:meth:`CatalogIndex.refresh`), so a killed server loses nothing committed.

Growth: when the catalog outgrows its FAISS structure (the index settings give another type, or 4x
the lists: a flat index past ``flat_max``), a writable server rebuilds it in a thread of its own,
at a low priority, while it keeps searching, adding and removing on the old one; the new one then
catches up with what changed meanwhile and replaces it under the lock (:meth:`LiveCatalog.rebuild`).
It checks at start-up, at each add and after each write of the FAISS file. A killed rebuild loses
nothing: the old generation stays on disk until the new one is committed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

from fashionlens.index.attribute_indexing import item_rows
from fashionlens.index.config import SearchConfig
from fashionlens.index.query import ExplainedHit, Searcher
from fashionlens.index.types import supports_remove
from fashionlens.serving.batcher import Batcher, lower_thread_priority
from fashionlens.serving.config import ServeConfig
from fashionlens.serving.uploads import UPLOADS, Croppers, Photo, StoredPhoto, cut, remove_upload, save_upload

log = logging.getLogger("fashionlens.serve")
REBUILD_RETRY = 300.0  # seconds before a failed index rebuild is tried again (doubling, up to 6 h)


class NotFound(Exception):
    """An unknown item id (404)."""


class Conflict(Exception):
    """The request clashes with what is stored (409)."""


@dataclass
class Job:
    """One photo for the model: embed only (``cfg`` None), or search with ``cfg`` and ``plan``."""
    tensor: object
    cfg: SearchConfig | None = None
    plan: object = None
    query: list | None = None


class LiveCatalog:
    """An index folder opened by the server, its embedding model and (if stored) its attribute
    model; ``writable`` takes the index's writer lock (only one writer process at a time)."""

    def __init__(self, folder: Path | str, cfg: ServeConfig, writable: bool = False):
        self.cfg, self.folder, self.writable = cfg, self._where(folder), writable
        self.lock = threading.Lock()
        self.searcher = Searcher(self.folder, cfg.device, cfg.optimize, write=writable, store_options=self._options())
        self.index = self.searcher.index
        try:
            self.searcher.attributes = _attributes_of(self.index)
            self._catch_up()
            self.embedder = self.searcher.embedder
            self.croppers = Croppers.of(cfg.search.crop, self.index.get_meta("crop"))
            self.explainer = (self.searcher.attributes.explainer(cfg.device, cfg.optimize)
                              if self.searcher.attributes else None)
        except BaseException:
            self.index.close()
            raise
        workers = cfg.resolved_model_workers()
        if workers > 1:  # each batch on its own cores: no idle cores between batches
            torch.set_num_threads(cfg.model_threads(workers))
        self.batch = Batcher(self._run_batch, cfg.worker_batch(workers), cfg.batch_wait_ms / 1000, "embed",
                             workers=workers, nice=cfg.model_nice)
        # The attribute model takes batches side by side too, unless Grad-CAM's hooks need it alone
        # (it also draws the explanation images)
        concurrent = self.explainer is not None and self.explainer.concurrent
        self.model_lock = contextlib.nullcontext() if concurrent else threading.Lock()
        explain_workers = workers if concurrent else 1
        self.explain_batch = Batcher(self._explain, cfg.worker_batch(explain_workers), cfg.batch_wait_ms / 1000,
                                     "explain", workers=explain_workers, nice=cfg.model_nice) if self.explainer else None
        self._unsaved_chunks: list[int] = []
        self._unsaved_removed: list[int] = []
        self._last_save = time.monotonic()
        self._stop = threading.Event()
        self._saver = threading.Thread(target=self._save_loop, name="persist", daemon=True)
        self._rebuilder: threading.Thread | None = None
        self._removed_meanwhile: list[int] = []  # rows removed while a rebuild runs
        self._rebuild_failures, self._rebuild_retry_at = 0, 0.0
        self._items = self.index.count()  # kept by add and remove: growth is checked at each add
        if writable:
            self._start_writing()

    def _options(self) -> dict:
        """Options of the store's ``open``."""
        return {}

    @staticmethod
    def _where(folder: Path | str) -> Path:
        return Path(folder).resolve()  # absolute: uploaded photos are stored by path, valid from any folder

    def _catch_up(self) -> None:
        """Catch up with what a killed server committed; an outgrown structure is rebuilt beside it."""
        self.index.refresh(save=self.writable, defer_rebuild=True, log=log.info)

    def _start_writing(self) -> None:
        self._saver.start()
        self.rebuild()

    # -- reading ----------------------------------------------------------------------------------
    @property
    def attributes(self):
        return self.searcher.attributes

    def count(self) -> int:
        with self.lock:
            return self.index.store.count("embedded")

    def index_state(self) -> dict:
        """The FAISS structure in use and whether a rebuild runs beside it (for /health)."""
        with self.lock:
            return {"index": self.index.spec.factory, "rebuilding": self.rebuilding}

    def item(self, item_id: str) -> dict:
        with self.lock:
            return self._item(item_id)

    def _item(self, item_id: str) -> dict:
        """The item and its stored attributes; the caller holds the lock."""
        row = self.index.store.get_item(item_id)
        if row is None or row["state"] != "embedded":
            raise NotFound(f"no item {item_id!r} in the catalog")
        stored = self.attributes.rows([row["rowid"]]).get(row["rowid"]) if self.attributes else None
        return {**row, "attributes": stored}

    def photo_path(self, item_id: str) -> StoredPhoto:
        photo = StoredPhoto(self.item(item_id)["path"])
        if not photo.exists():
            raise NotFound(f"item {item_id!r}: its photo {photo.name} is missing on the server")
        return photo

    def _explain(self, images):
        with self.model_lock:
            return self.explainer.explain(images)

    def explain_attribute(self, image: Image.Image, attribute: str):
        with self.model_lock:
            return self.explainer.explain([image], attributes=[attribute])[0][0]

    def plan(self, cfg: SearchConfig):
        return self.searcher.plan(cfg)

    def search(self, photo: Photo, cfg: SearchConfig, plan) -> tuple[list[ExplainedHit], list | None]:
        return self.search_cut(photo, cfg, plan)[:2]

    def search_cut(self, photo: Photo, cfg: SearchConfig, plan) -> tuple[list[ExplainedHit], list | None, dict | None]:
        """The results for one decoded photo; its own attributes when ``plan.explain``; the box it
        was cut to (``search.crop``)."""
        query = self.explain_batch(photo.at(self.explainer.size)) if plan.explain and self.explain_batch else None
        tensor, box = self._tensor(photo, self.croppers.query)
        return self.batch(Job(tensor, cfg, plan, query)), query, box

    def embed(self, photo: Photo) -> np.ndarray:
        return self.embed_item(photo)[0]

    def embed_item(self, photo: Photo, metadata: dict | None = None) -> tuple[np.ndarray, dict | None]:
        """A new item's vector and box, cut as the catalog's photos were (its region from ``metadata``)."""
        tensor, box = self._tensor(photo, self.croppers.item, metadata)
        return self.batch(Job(tensor)), box

    def _tensor(self, photo: Photo, cropper=None, metadata: dict | None = None):
        """Cut, letterboxed and normalised in the request's thread: the model's only runs the batch."""
        img, box = cut(photo, cropper, metadata, self.embedder.preprocess.size)
        return self.embedder.preprocess(img), box

    def _run_batch(self, jobs: list[Job]) -> list:
        """One model call for every queued photo, then, under the lock, one vector search for all
        plain searches (a matrix product instead of one pass over the vectors per photo) and the
        results of each: a search sees the catalog whole, before or after any change."""
        # A few query vectors per search: more FAISS threads only contend with the model's (two
        # OpenMP pools on the same cores). Set in each worker thread: OpenMP keeps the setting per
        # thread, so a call in the thread that opened the catalog did not reach the workers.
        faiss.omp_set_num_threads(self.cfg.faiss_threads)
        vecs = self.embedder.embed_tensors(torch.stack([j.tensor for j in jobs]))
        plain = [i for i, j in enumerate(jobs) if j.cfg is not None and not (j.plan.wants or j.plan.filters)]
        out: list = list(vecs)
        with self.lock:
            found = self.index.search(vecs[plain], max(jobs[i].cfg.k for i in plain)) if plain else []
            hits = {i: h[:jobs[i].cfg.k] for i, h in zip(plain, found)}
            for i, job in enumerate(jobs):
                if job.cfg is not None:
                    out[i] = self.searcher.hits_for(vecs[i], job.query, job.cfg, job.plan, hits=hits.get(i))
        return out

    # -- changing the catalog ------------------------------------------------------------------------
    def add(self, item_id: str, photo: Photo, metadata: dict[str, str]) -> dict:
        """Add one item; durable when it returns. :class:`Conflict` if the id is taken."""
        if not self.writable:
            raise Conflict("the catalog is read-only")
        with self.lock:  # before the models' work; checked again under the lock that commits
            self._check_free(item_id)
        vec, box = self.embed_item(photo, metadata)
        results = self.explain_batch(photo.at(self.explainer.size)) if self.explain_batch else None
        path = save_upload(self.folder, photo)
        store = self.index.store
        with self.lock:
            self._check_free(item_id)  # added meanwhile by another request?
            if not path.exists():  # removed meanwhile with an item that had the same photo
                path = save_upload(self.folder, photo)
            with store.db:  # one transaction: the item is all there or not at all
                cur = store.db.execute("INSERT INTO items (item_id, path, metadata, state) VALUES (?, ?, ?, 'pending')",
                                       (item_id, str(path), _json(metadata)))
                rowid = cur.lastrowid
                chunk = store.next_chunk()
                self.index.chunks.write(chunk, np.asarray([rowid], np.int64), vec[None])
                store.record_chunk(chunk, [rowid])
                store.record_crops([rowid], [box])
                if results is not None:
                    attrs = self.attributes
                    store.record_attributes(item_rows(rowid, results, photo.size, photo.at(self.explainer.size).size,
                                                      attrs.schema, attrs.projection), [rowid])
            self.index.load().add_with_ids(vec[None].astype(np.float32), np.asarray([rowid], np.int64))
            self._unsaved_chunks.append(chunk)
            self._items += 1
            grown = self.index.outgrown_at(self._items)
            added = self._item(item_id)  # as added, whatever a DELETE does next
        if grown:  # past flat_max, say: rebuilt in the background from now on
            self.rebuild()
        return added

    def _check_free(self, item_id: str) -> None:
        if self.index.store.get_item(item_id) is not None:
            raise Conflict(f"item {item_id!r} exists; DELETE it first to replace it")

    def remove(self, item_id: str) -> None:
        if not self.writable:
            raise Conflict("the catalog is read-only")
        with self.lock:
            row = self.index.store.get_item(item_id)
            if row is None:
                raise NotFound(f"no item {item_id!r} in the catalog")
            self.index.store.remove([item_id])  # one transaction; a tombstone if it had a vector
            if row["state"] == "embedded":
                self._items -= 1
                if supports_remove(self.index.spec):
                    self.index.load().remove_ids(np.asarray([row["rowid"]], np.int64))
                self._unsaved_removed.append(row["rowid"])
                if self.rebuilding:
                    self._removed_meanwhile.append(row["rowid"])
            upload = Path(row["path"])
            if upload.parent.parent == self.folder / UPLOADS:
                remove_upload(upload, self.index.store)

    # -- persistence ----------------------------------------------------------------------------------
    def persist(self) -> bool:
        """Write the FAISS file if items changed since the last write; True if written."""
        with self.lock:
            if not (self._unsaved_chunks or self._unsaved_removed):
                return False
            self.index.save(self._unsaved_chunks, self._unsaved_removed)
            self._unsaved_chunks, self._unsaved_removed = [], []
            self._last_save = time.monotonic()
            return True

    def _save_loop(self) -> None:
        while not self._stop.wait(min(5.0, self.cfg.persist_seconds)):
            if time.monotonic() - self._last_save >= self.cfg.persist_seconds:
                try:
                    if self.persist():
                        self.rebuild()  # grown past its structure?
                except Exception:  # a full disk must not end the saving for good; nothing is lost
                    log.exception("cannot write the FAISS file; SQLite and the chunks hold every change")
                    self._last_save = time.monotonic()
            if self._rebuild_failures and time.monotonic() >= self._rebuild_retry_at:
                self.rebuild()  # a failed rebuild's next try, changes or not

    # -- rebuilding the FAISS structure beside the one in use -----------------------------------------
    @property
    def rebuilding(self) -> bool:
        return self._rebuilder is not None and self._rebuilder.is_alive()

    def rebuild(self) -> bool:
        """Start rebuilding the FAISS structure in the background if the catalog has outgrown it
        (:meth:`CatalogIndex.start_rebuild`); True if a rebuild runs now. After a failed rebuild
        the next try waits ``REBUILD_RETRY`` seconds, doubling with each failure."""
        if not self.writable or self._stop.is_set() or time.monotonic() < self._rebuild_retry_at:
            return self.rebuilding
        with self.lock:
            if self.rebuilding:
                return True
            try:
                plan = self.index.start_rebuild()
            except Exception as exc:
                self._rebuild_failed(exc)
                return False
            if plan is None:
                return False
            self._removed_meanwhile = []
            self._rebuilder = threading.Thread(target=self._rebuild, args=(plan,), name="rebuild", daemon=True)
            self._rebuilder.start()
        return True

    def _rebuild(self, plan) -> None:
        """Build at ``rebuild_nice``, then catch up and swap at the server's own priority: the swap
        holds the lock that every search waits for (and a thread cannot raise its priority again)."""
        start = time.monotonic()
        try:
            log.info("rebuilding the index as %s from %s items, beside the one in use", plan.spec.factory,
                     f"{len(plan.live):,}")
            _at_low_priority(self.cfg.rebuild_nice, self.index.build, plan, log.info)
            with self.lock:
                if self._stop.is_set():  # shutting down: the old generation stays, the next start rebuilds
                    return
                later = self.index.chunks_since(plan)
            # what was added meanwhile, outside the lock (finish_rebuild adds the last few under it),
            # and the new index's file written outside it too: the swap then only renames and commits
            _at_low_priority(self.cfg.rebuild_nice, self.index.add_chunks, plan, later)
            if self._stop.is_set():
                return
            _at_low_priority(self.cfg.rebuild_nice, self.index.stage, plan)
            with self.lock:
                if self._stop.is_set():  # a staged file left here is removed by the next writer
                    return
                # what the committed file lacks, which the next write of the index saves
                self._unsaved_chunks, self._unsaved_removed = self.index.finish_rebuild(plan, self._removed_meanwhile)
                self._rebuild_failures, self._rebuild_retry_at = 0, 0.0
            log.info("index %s in use: %s vectors, rebuilt in %.0f s", plan.spec.factory,
                     f"{self.index.load().ntotal:,}", time.monotonic() - start)
        except Exception as exc:  # the old structure keeps serving; nothing stored is touched
            with self.lock:
                if not self._stop.is_set():  # (after a stop the folder may have a new writer)
                    self.index.discard_staged()  # hundreds of MB, on a disk that may be full
            self._rebuild_failed(exc)

    def _rebuild_failed(self, exc: Exception) -> None:
        self._rebuild_failures += 1
        wait = min(REBUILD_RETRY * 2 ** (self._rebuild_failures - 1), 6 * 3600)
        self._rebuild_retry_at = time.monotonic() + wait
        if self._rebuild_failures == 1:
            log.exception("cannot rebuild the index; the one in use stays; next try in %.0f s", wait)
        else:
            log.warning("cannot rebuild the index (%s: %s), failure %d; next try in %.0f s",
                        type(exc).__name__, exc, self._rebuild_failures, wait)

    def close(self) -> None:
        self._stop.set()
        if self._saver.is_alive():
            self._saver.join(timeout=60)
        if self.rebuilding:  # not waited for: a rebuild of millions takes minutes, and is redone at start
            log.info("stopping before the index rebuild finished; it starts again with the server")
        self.batch.close()
        if self.explain_batch:
            self.explain_batch.close()
        if self.writable:
            self.persist()
        self.index.close()


def _at_low_priority(nice: int, fn, *args) -> None:
    """``fn(*args)`` in a thread of its own at ``nice`` (FAISS's OpenMP threads, started there,
    inherit it), its exception raised here."""
    failed: list[BaseException] = []

    def run():
        lower_thread_priority(nice)
        try:
            fn(*args)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, name="rebuild-build", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def _attributes_of(index):
    from fashionlens.index.attribute_store import META_KEY, StoredAttributes

    return StoredAttributes(index) if index.get_meta(META_KEY) else None


def _json(metadata: dict) -> str:
    return json.dumps({str(k): str(v) for k, v in metadata.items()}, ensure_ascii=False)
