"""An index folder: ``catalog.sqlite`` (items, state, config), ``vectors/`` (embedding chunks)
and ``index-<generation>.faiss`` (the search structure, derived from the chunks).

The FAISS file is replaced by generation: a new file is written and synced, then SQLite commits
the new generation, then the old file is deleted. A killed process therefore leaves either the
old or the new generation complete, and an index whose file is gone is rebuilt from the chunks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from fashionlens.errors import UserError
from fashionlens.index.config import IndexConfig
from fashionlens.index.store import CatalogStore
from fashionlens.index.stores.base import SearchHit
from fashionlens.index.types import (
    INDEX_TYPES,
    IndexSpec,
    apply_search_params,
    choose_spec,
    new_index,
    outgrown,
    supports_remove,
    training_minimum,
    with_search_settings,
)
from fashionlens.index.vectors import ChunkFiles, rerank_exact, sample_for_training, search_index, write_index
from fashionlens.locks import exclusive_lock

DB_NAME = "catalog.sqlite"
STAGED = "rebuild-staged.faiss"  # a rebuilt index written beside the one in use, before its commit
# the index settings (IndexConfig fields) recorded in the store and read by every refresh
INDEX_SETTINGS = ("index_type", "flat_max", "ivf_flat_max", "train_sample", "pq_bytes", "rerank")


@dataclass
class Rebuild:
    """A FAISS structure built beside the one in use (:meth:`CatalogIndex.start_rebuild`)."""
    spec: IndexSpec
    chunks: list[int]  # the committed chunks it is built from
    live: np.ndarray  # the rows live when it started, sorted
    train_sample: int
    index: faiss.Index | None = None  # set by build()
    staged: np.ndarray | None = None  # the rows of the staged file, set by stage()


def _members(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of ``ids`` are in ``sorted_ids`` (``np.isin`` sorts its second argument on every
    call: 170 us a one-item chunk against 100,000 rows, where this takes 3)."""
    if not len(sorted_ids):
        return np.zeros(len(ids), bool)
    return sorted_ids[np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)] == ids


class CatalogIndex:
    """Open the index in ``folder``, to read (any number of processes) or to write (one).

    A writer (``write=True``; ``create=True`` implies it) holds an exclusive lock on
    ``folder/.lock`` until :meth:`close`, and cleans up files a killed writer left behind.
    """

    def __init__(self, folder: Path, create: bool = False, write: bool = False):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.folder}: is a file, not an index folder")
        if not (self.folder / DB_NAME).exists():
            if not create:
                raise UserError(f"{self.folder}: not a fashionlens index (no {DB_NAME}); "
                                "make one with 'fashionlens index CATALOG --out DIR'")
            self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire_lock() if (create or write) else None
        self.store = CatalogStore(self.folder / DB_NAME)
        self.chunks = ChunkFiles(self.folder / "vectors")
        if self._lock is not None:
            self.chunks.remove_orphans(set(self.store.chunks()))
            self.discard_staged()  # left by a rebuild that did not commit
        self._index: faiss.Index | None = None
        self._spec: IndexSpec | None = None

    def _acquire_lock(self):
        return exclusive_lock(self.folder, "index")

    def close(self) -> None:
        self.store.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def check_embedder(self, described: dict) -> None:
        """An index holds vectors of one model: refuse another (``Embedder.describe()``)."""
        recorded = self.store.get_meta("embedder")
        if recorded and (recorded["model"], recorded["dim"], recorded.get("letterbox")) != (
                described["model"], described["dim"], described["letterbox"]):
            raise UserError(
                f"{self.folder} holds {recorded['dim']}-d vectors of {recorded['model']} at "
                f"{recorded.get('letterbox')} px; this model is {described['model']} "
                f"({described['dim']}-d, {described['letterbox']} px). Use the index's own model, or a new --out"
            )

    # -- the FAISS structure -----------------------------------------------------------------
    @property
    def spec(self) -> IndexSpec | None:
        raw = self.store.get_meta("index_spec")
        return IndexSpec.from_dict(raw) if raw else None

    def _file(self, generation: int) -> Path:
        return self.folder / f"index-{generation:06d}.faiss"

    def load(self) -> faiss.Index:
        """The FAISS index, loaded once (rebuilt from chunks if its file is missing)."""
        if self._index is None:
            gen, spec = self.store.get_meta("generation", 0), self.spec
            path = self._file(gen)
            if spec is None or not path.exists():
                self.refresh(rebuild=True)
            else:
                self._index = faiss.read_index(str(path))
                self._spec = with_search_settings(spec, self.settings()["rerank"])
                apply_search_params(self._index, self._spec)
        return self._index

    def settings(self) -> dict:
        """The index settings recorded by ``fashionlens index`` (``INDEX_SETTINGS``), with today's
        defaults for those an older index did not record."""
        recorded, defaults = self.store.get_meta("index_settings", {}), IndexConfig().model_dump()
        return {k: recorded.get(k, defaults[k]) for k in INDEX_SETTINGS}

    def refresh(self, rebuild: bool = False, log=None, save: bool = True, defer_rebuild: bool = False) -> IndexSpec:
        """Bring the FAISS index up to date with the chunks and removals, and save it
        (``save=False``: in memory only, for a reader such as a read-only server).

        The index follows the ``index`` settings recorded in the store (``INDEX_SETTINGS``): a
        catalog that grows past ``flat_max`` is rebuilt as IVF-Flat, past ``ivf_flat_max`` as
        IVF-PQ, and any index whose FAISS structure the settings now give otherwise (other codes, or
        4x the lists as it grew: ``outgrown``) is rebuilt; lists probed and the re-scored
        shortlist are search-time settings and follow at once. A reader (``save=False``: a
        read-only server) does not rebuild; it keeps the saved structure and says so in ``log``.
        ``defer_rebuild``: a writer that keeps serving the saved structure meanwhile (a writable
        server) catches it up here and rebuilds it beside it (:meth:`start_rebuild`).
        """
        log = log or (lambda msg: None)
        settings = self.settings()
        n_live = self.store.count("embedded")
        dim = self.store.get_meta("embedder", {}).get("dim")
        if dim is None:
            raise UserError(f"{self.folder}: no vectors yet; index a catalog first")
        current = self.spec
        wanted = self._wanted(n_live, dim)
        gen = self.store.get_meta("generation", 0)
        saved = not rebuild and current is not None and self._file(gen).exists()
        rebuild_due = saved and outgrown(current, wanted)
        keep_saved = rebuild_due and (not save or defer_rebuild)
        if keep_saved:
            log(f"the index is {current.factory}; its settings now give {wanted.factory} for {n_live:,} items: "
                + ("run 'fashionlens index' on it to rebuild" if not save else "it is rebuilt beside the one in use"))
        if saved and (not rebuild_due or keep_saved):
            spec, new_chunks = with_search_settings(current, settings["rerank"]), self.store.chunks(in_index=False)
            if not new_chunks and not self.store.tombstones():  # up to date: no new generation to write
                self.load()
                return spec
            index = self._index or faiss.read_index(str(self._file(gen)))
            apply_search_params(index, spec)
        else:
            spec, new_chunks = wanted, self.store.chunks()
            index = self._trained(spec, lambda: self._live_chunks(new_chunks), n_live, settings["train_sample"], log)
            if save:
                self.store.db.execute("DELETE FROM tombstones")  # a fresh index holds no dead rows
        removed = self.store.tombstones()
        if removed and supports_remove(spec):
            index.remove_ids(np.asarray(removed, dtype=np.int64))
        for rowids, vecs in self._live_chunks(new_chunks):
            index.add_with_ids(vecs, rowids)
        if save:
            self._save(index, spec, gen + 1, new_chunks, removed if supports_remove(spec) else [])
        else:
            self._index, self._spec = index, spec
        log(f"index {spec.factory}: {index.ntotal:,} vectors")
        return spec

    @staticmethod
    def _trained(spec: IndexSpec, chunks, n_live: int, train_sample: int, log) -> faiss.Index:
        """An empty index of ``spec``, trained on a sample of the vectors ``chunks()`` yields."""
        index = new_index(spec)
        if not index.is_trained and n_live < training_minimum(spec):
            raise UserError(f"{spec.factory} needs at least {training_minimum(spec):,} vectors to train, and the "
                            f"catalog has {n_live:,}: index it with --index-type flat or auto")
        if not index.is_trained:
            log(f"training {spec.factory} on up to {train_sample:,} of {n_live:,} vectors")
            sample = sample_for_training(chunks(), n_live, train_sample, spec.dim)
            index.train(sample)
            del sample
        return index

    # -- rebuilding beside the index in use (a writable server) ---------------------------------
    def start_rebuild(self) -> Rebuild | None:
        """The structure the index settings give for the catalog as it is now, when the one in
        use has outgrown it (``outgrown``); else None. Under the caller's lock: it notes the chunks
        and live rows to build from. Then :meth:`build` runs outside the lock while searches, adds
        and removals go on (so may :meth:`add_chunks`, for the chunks committed meanwhile), and
        :meth:`finish_rebuild`, under the lock again, catches up and swaps. The caller keeps the
        rows it removes from the start on, for ``finish_rebuild``."""
        self.load()
        wanted = self._wanted(self.store.count("embedded"), self._spec.dim)
        if not outgrown(self._spec, wanted):
            return None
        live = np.fromiter(self.store.embedded_rowids(), np.int64)
        return Rebuild(wanted, self.store.chunks(), np.sort(live), self.settings()["train_sample"])

    def outgrown_at(self, n_live: int) -> bool:
        """Whether the structure in use is outgrown at ``n_live`` items (a cheap check for a
        writer that counts its adds; :meth:`start_rebuild` counts the store itself)."""
        self.load()
        return outgrown(self._spec, self._wanted(n_live, self._spec.dim))

    def _wanted(self, n_live: int, dim: int) -> IndexSpec:
        """The structure the recorded index settings give for ``n_live`` items."""
        settings = self.settings()
        kind = settings.pop("index_type")
        if kind != "auto":
            kind = INDEX_TYPES.canonical(kind)  # a plugin's type that is not loaded: a one-line error
        return choose_spec(n_live, dim, kind, **settings)

    def build(self, plan: Rebuild, log=None) -> None:
        """Train and fill ``plan``'s index from the chunk files it noted. It reads no SQLite and
        touches nothing in use (committed chunk files never change), so no lock is needed."""
        def chunks():
            for chunk in plan.chunks:
                rowids, vecs = self.chunks.read(chunk)
                live = _members(plan.live, rowids)
                if live.any():
                    yield rowids[live], np.ascontiguousarray(vecs[live])

        log = log or (lambda msg: None)
        index = self._trained(plan.spec, chunks, len(plan.live), plan.train_sample, log)
        for rowids, vecs in chunks():
            index.add_with_ids(vecs, rowids)
        plan.index = index

    def chunks_since(self, plan: Rebuild) -> list[int]:
        """Under the caller's lock: the chunks committed since ``plan`` noted its own."""
        noted = set(plan.chunks)
        return [c for c in self.store.chunks() if c not in noted]

    def add_chunks(self, plan: Rebuild, chunks: list[int]) -> None:
        """Add every row of ``chunks`` (committed after :meth:`start_rebuild`, so live then; the
        caller's removals since are applied by :meth:`finish_rebuild`) to ``plan``'s built index,
        which then counts them as noted. No SQLite: outside the lock, for what a long build let
        pile up; under it, for the rest."""
        added = []
        for chunk in chunks:
            rowids, vecs = self.chunks.read(chunk)
            plan.index.add_with_ids(np.ascontiguousarray(vecs), rowids)
            added.append(rowids)
        plan.chunks = plan.chunks + list(chunks)
        if added:
            plan.live = np.union1d(plan.live, np.concatenate(added))

    def discard_staged(self) -> None:
        """Delete a staged file (:meth:`stage`) that will not be committed."""
        for left in self.folder.glob(STAGED + "*"):
            left.unlink(missing_ok=True)

    def stage(self, plan: Rebuild) -> None:
        """Write ``plan``'s built index to a staged file, outside the lock: the write (hundreds of
        MB for a large IVF-Flat index) then stalls no search; :meth:`finish_rebuild` commits it."""
        write_index(plan.index, self.folder / STAGED)
        plan.staged = plan.live

    def finish_rebuild(self, plan: Rebuild, removed) -> tuple[list[int], list[int]]:
        """Under the caller's lock: add to ``plan``'s built index the chunks committed since it
        noted its own, drop the rows ``removed`` since :meth:`start_rebuild`, make it the index in
        use, and commit its staged file (:meth:`stage`; written here if it was not) as the next
        generation. Returns what that file lacks, for the caller's next :meth:`save`: the chunks
        added after it was written, and the removed rows it holds (their tombstones, which any
        reader of the file applies, are cleared by that save). An index that cannot remove keeps
        the tombstones of the removed rows it holds (a write of the old index meanwhile may have
        cleared them)."""
        if plan.staged is None:
            self.stage(plan)
        file_rows = plan.staged
        later = self.chunks_since(plan)
        self.add_chunks(plan, later)
        index, spec = plan.index, plan.spec
        removed = np.unique(np.asarray(list(removed), np.int64))
        removable = supports_remove(spec)
        if removable and len(removed):
            index.remove_ids(removed)
        dead = np.intersect1d(removed, file_rows if removable else plan.live).tolist()
        apply_search_params(index, spec)
        gen = self.store.get_meta("generation", 0) + 1
        os.replace(self.folder / STAGED, self._file(gen))

        def in_file():
            self.store.db.execute("UPDATE chunks SET in_index=1 WHERE in_index=0")  # all but `later` are in it
            self.store.db.executemany("UPDATE chunks SET in_index=0 WHERE chunk=?", [(c,) for c in later])
            self.store.db.execute("DELETE FROM tombstones")
            self.store.add_tombstones(dead)
        self._commit(index, spec, gen, in_file)
        return later, dead if removable else []

    def save(self, added_chunks: list[int], removed: list[int]) -> None:
        """Write the loaded FAISS index, changed in memory since it was read (a server's adds and
        removals), as the next generation; ``added_chunks`` are then marked in it and the
        ``removed`` rows' tombstones cleared."""
        gen = self.store.get_meta("generation", 0)
        self._save(self.load(), self._spec, gen + 1, added_chunks, removed if supports_remove(self._spec) else [])

    def _live_chunks(self, chunks: list[int]):
        for chunk in chunks:
            rowids, vecs = self.chunks.read(chunk)
            live = np.isin(rowids, np.fromiter(self.store.live_rowids(rowids.tolist()), np.int64))
            if live.any():
                yield rowids[live], np.ascontiguousarray(vecs[live])

    def _save(self, index, spec: IndexSpec, gen: int, added: list[int], removed: list[int]) -> None:
        """Write ``index`` as generation ``gen``, then commit it: ``added`` chunks marked in it, the
        ``removed`` rows' tombstones cleared."""
        write_index(index, self._file(gen))

        def in_file():
            self.store.db.executemany("UPDATE chunks SET in_index=1 WHERE chunk=?", [(c,) for c in added])
            self.store.clear_tombstones(removed)
        self._commit(index, spec, gen, in_file)

    def _commit(self, index, spec: IndexSpec, gen: int, in_file) -> None:
        """Make generation ``gen`` (its file written) the index: one transaction records its spec,
        its number and, by ``in_file()``, the chunks and tombstones its file accounts for; then
        ``index`` is the one in memory, and the other generations' files are deleted (one that
        cannot be deleted now is deleted by a later commit)."""
        with self.store.db:
            self.store.set_meta("index_spec", spec.to_dict(), commit=False)
            self.store.set_meta("generation", gen, commit=False)
            in_file()
        self._index, self._spec = index, spec  # committed: memory follows before anything else can fail
        current = self._file(gen)
        for old in self.folder.glob("index-*.faiss*"):
            if old != current:
                with contextlib.suppress(OSError):
                    old.unlink()

    # -- search ------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 10) -> list[list[SearchHit]]:
        """Top-``k`` live items for each query vector (unit length, as the embedder gives)."""
        index = self.load()
        if queries.ndim != 2 or queries.shape[1] != index.d:
            raise UserError(f"{self.folder}: query vectors have {queries.shape[-1]} dims, the index {index.d}")
        dead = len(self.store.tombstones())
        fetch = min(k + dead, max(index.ntotal, 1))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        shortlist = self._spec.rerank if self._spec is not None else None
        if shortlist:  # approximate codes: a longer shortlist, re-scored with the stored vectors
            _, ids = search_index(index, queries, min(max(fetch, shortlist), max(index.ntotal, 1)))
            scores, ids = rerank_exact(queries, ids, self.vectors, fetch)
        else:
            scores, ids = search_index(index, queries, fetch)
        rows = self.store.get_rows(sorted({int(i) for i in ids.ravel() if i >= 0}))
        results = []
        for q_scores, q_ids in zip(scores, ids):
            hits = [SearchHit(rows[i]["id"], float(s), rows[i]["path"], rows[i]["metadata"], int(i), rows[i]["crop"])
                    for s, i in zip(q_scores, q_ids) if i >= 0 and int(i) in rows]
            results.append(hits[:k])
        return results

    def vectors(self, rowids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the ``rowids`` that are live, sorted; their stored embeddings), read from the chunk
        files each item's current vector is in: exact, whatever the index type."""
        where = self.store.chunk_of(sorted({int(r) for r in rowids}))
        found = np.fromiter(sorted(where), np.int64, len(where))
        out = np.empty((len(found), self.load().d), np.float32)
        chunk_of = np.fromiter((where[r] for r in found.tolist()), np.int64, len(found))
        by_chunk = np.argsort(chunk_of, kind="stable")
        chunks, starts = np.unique(chunk_of[by_chunk], return_index=True)
        for chunk, mine in zip(chunks.tolist(), np.split(by_chunk, starts[1:])):
            out[mine] = self.chunks.rows(chunk, found[mine])
        return found, out

    def remove(self, item_ids: list[str]) -> list[str]:
        """Remove items; returns unknown ids. The FAISS index is updated and saved."""
        unknown = self.store.remove(item_ids)
        if self.spec is not None and len(unknown) < len(item_ids):
            self.refresh()
        return unknown
