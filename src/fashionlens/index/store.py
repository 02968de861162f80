"""The catalog store: every item's id, image path, metadata and embedding state, in SQLite.

Each item has an integer ``rowid``, which is also its id in the vector index. States:
``pending`` (to embed), ``embedded`` (its vector is in chunk ``chunk``), ``skipped`` (its file
could not be decoded; see ``reason``). Removed items are deleted from ``items``; when the vector
index cannot remove them (HNSW), their rowids go to ``tombstones`` and searches filter them.
SQLite's WAL journal makes every write atomic: a killed process leaves the last commit.

``item_attributes`` holds an attribute classifier's predictions per item and attribute
(``fashionlens index-attributes``, :mod:`fashionlens.index.attribute_indexing`), ``attribute_state`` which
items were explained (``reason`` NULL) or could not be (the reason). Both are keyed by the item's
rowid: deleting or re-queueing an item (:meth:`CatalogStore._delete_rows`) deletes its rows, and
rowids are never reused (AUTOINCREMENT), so no stale prediction can attach to another photo.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from fashionlens.data.records import Item

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    metadata TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    chunk INTEGER,
    reason TEXT,
    seen_run INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS items_state ON items(state);
CREATE TABLE IF NOT EXISTS chunks (
    chunk INTEGER PRIMARY KEY, n INTEGER NOT NULL, in_index INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tombstones (rowid INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS missing (
    item_id TEXT PRIMARY KEY, reason TEXT NOT NULL, seen_run INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS item_attributes (
    item INTEGER NOT NULL, attr INTEGER NOT NULL, value INTEGER NOT NULL, confidence REAL NOT NULL,
    scores BLOB NOT NULL, x INTEGER, y INTEGER, w INTEGER, h INTEGER, feature BLOB,
    PRIMARY KEY (item, attr)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attribute_state (item INTEGER PRIMARY KEY, reason TEXT);
CREATE TABLE IF NOT EXISTS crops (item INTEGER PRIMARY KEY, crop TEXT NOT NULL);
"""


# rows named in one statement: SQLite's default build allows 32,766 parameters
_CROP = "(SELECT crop FROM crops WHERE item=items.rowid)"  # the box an item was embedded from
_PIECE = 30_000


class CatalogStore:
    """A thin, explicit layer over one SQLite file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value, commit: bool = True) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        if commit:
            self.db.commit()

    # -- catalog sync ----------------------------------------------------------------------
    def new_run(self) -> int:
        run = int(self.get_meta("run", 0)) + 1
        self.set_meta("run", run)
        return run

    def upsert(self, items: Iterable[Item], run: int) -> tuple[int, int, list[str]]:
        """Insert new items, re-queue items whose path changed; one transaction per call.

        Returns (added, changed, ids seen twice within this run). Changed items get a new
        rowid, so that the old vector (if any) is retired like a removal.
        """
        added = changed = 0
        duplicates = []
        for item in items:
            row = self.db.execute(
                "SELECT rowid, path, seen_run FROM items WHERE item_id=?", (item.id,)
            ).fetchone()
            meta = json.dumps(item.metadata, ensure_ascii=False)
            if row is None:
                self.db.execute(
                    "INSERT INTO items (item_id, path, metadata, seen_run) VALUES (?, ?, ?, ?)",
                    (item.id, str(item.path), meta, run),
                )
                added += 1
            elif row[2] == run:
                duplicates.append(item.id)
            elif row[1] != str(item.path):
                self._delete_rows([row[0]])
                self.db.execute(
                    "INSERT INTO items (item_id, path, metadata, seen_run) VALUES (?, ?, ?, ?)",
                    (item.id, str(item.path), meta, run),
                )
                changed += 1
            else:
                self.db.execute(
                    "UPDATE items SET metadata=?, seen_run=?, "
                    "state=CASE state WHEN 'skipped' THEN 'pending' ELSE state END WHERE rowid=?",
                    (meta, run, row[0]),
                )
            self.db.execute("DELETE FROM missing WHERE item_id=?", (item.id,))
        self.db.commit()
        return added, changed, duplicates

    def record_missing(self, item_id: str, reason: str, run: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO missing VALUES (?, ?, ?)", (item_id, reason, run))

    # -- embedding state -------------------------------------------------------------------
    def pending(self, batch: int = 4096, metadata: bool = False) -> Iterator[list[tuple]]:
        """Pages of (rowid, path) still to embed, in rowid order ((rowid, path, metadata) with ``metadata``)."""
        last = 0
        columns = "rowid, path, metadata" if metadata else "rowid, path"
        while True:
            rows = self.db.execute(
                f"SELECT {columns} FROM items WHERE state='pending' AND rowid>? ORDER BY rowid LIMIT ?",
                (last, batch),
            ).fetchall()
            if metadata:
                rows = [(r, p, json.loads(m)) for r, p, m in rows]
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def count(self, state: str | None = None) -> int:
        if state is None:
            return self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM items WHERE state=?", (state,)).fetchone()[0]

    def next_chunk(self) -> int:
        return (self.db.execute("SELECT MAX(chunk) FROM chunks").fetchone()[0] or 0) + 1

    def commit_chunk(self, chunk: int, rowids: list[int], skipped: list[tuple[int, str]],
                     crops: list[dict | None] = ()) -> None:
        """Atomically record a chunk file's rows as embedded (with the crop box each was embedded
        from, when a crop ran) and the failures as skipped."""
        with self.db:
            self.record_chunk(chunk, rowids, skipped)
            self.record_crops(rowids, crops)

    def record_crops(self, rowids: list[int], crops: list[dict | None]) -> None:
        """Inside the caller's transaction: the crop box each item was embedded from (None: none)."""
        self.db.executemany("INSERT OR REPLACE INTO crops VALUES (?, ?)",
                            [(r, json.dumps(c)) for r, c in zip(rowids, crops) if c is not None])

    def record_chunk(self, chunk: int, rowids: list[int], skipped: list[tuple[int, str]] = ()) -> None:
        """:meth:`commit_chunk` inside the caller's transaction."""
        self.db.execute("INSERT INTO chunks (chunk, n) VALUES (?, ?)", (chunk, len(rowids)))
        self.db.executemany(
            "UPDATE items SET state='embedded', chunk=?, reason=NULL WHERE rowid=?",
            [(chunk, r) for r in rowids],
        )
        self.db.executemany(
            "UPDATE items SET state='skipped', reason=? WHERE rowid=?",
            [(reason, r) for r, reason in skipped],
        )

    def record_attributes(self, rows: list[tuple], explained: list[int], failed: list[tuple[int, str]] = ()) -> None:
        """Inside the caller's transaction: ``rows`` of ``item_attributes``, the ``explained``
        items marked done, the ``failed`` ones marked with their reason and their rows dropped."""
        self.db.executemany("INSERT OR REPLACE INTO item_attributes VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
        self.db.executemany("INSERT OR REPLACE INTO attribute_state VALUES (?, ?)",
                            [(r, None) for r in explained] + list(failed))
        self.db.executemany("DELETE FROM item_attributes WHERE item=?", [(r,) for r, _ in failed])

    def chunks(self, in_index: bool | None = None) -> list[int]:
        sql = "SELECT chunk FROM chunks"
        if in_index is not None:
            sql += f" WHERE in_index={int(in_index)}"
        return [r[0] for r in self.db.execute(sql + " ORDER BY chunk")]

    def _embedded_in(self, columns: str, rowids: Iterable[int]) -> Iterator[tuple]:
        """``columns`` of the embedded items among ``rowids``, asked in pieces: SQLite allows
        32,766 parameters a statement in its default build (a batch's re-scored shortlists can
        hold more rows)."""
        ids = list(rowids)
        for start in range(0, len(ids), _PIECE):
            piece = ids[start:start + _PIECE]
            yield from self.db.execute(f"SELECT {columns} FROM items WHERE state='embedded' AND rowid IN "
                                       f"({','.join('?' * len(piece))})", piece)

    def embedded_rowids(self) -> Iterator[int]:
        """Every embedded item's rowid."""
        return (r[0] for r in self.db.execute("SELECT rowid FROM items WHERE state='embedded'"))

    def live_rowids(self, rowids: Iterable[int]) -> set[int]:
        return {r[0] for r in self._embedded_in("rowid", rowids)}

    # -- reading items ---------------------------------------------------------------------
    def get_rows(self, rowids: list[int]) -> dict[int, dict]:
        return {r[0]: {"id": r[1], "path": r[2], "metadata": json.loads(r[3]), "crop": r[4] and json.loads(r[4])}
                for r in self._embedded_in(f"rowid, item_id, path, metadata, {_CROP}", rowids)}

    def chunk_of(self, rowids: list[int]) -> dict[int, int]:
        """The chunk file holding each embedded item's vector."""
        return dict(self._embedded_in("rowid, chunk", rowids))

    def get_item(self, item_id: str) -> dict | None:
        row = self.db.execute(
            f"SELECT rowid, item_id, path, metadata, state, reason, {_CROP} FROM items WHERE item_id=?", (item_id,)
        ).fetchone()
        if row is None:
            return None
        return {"rowid": row[0], "id": row[1], "path": row[2], "metadata": json.loads(row[3]),
                "state": row[4], "reason": row[5], "crop": row[6] and json.loads(row[6])}

    def count_where(self, column: str, values: Iterable[str]) -> int:
        """How many embedded items have metadata ``column`` in ``values`` (relevance counts)."""
        vals = list(values)
        marks = ",".join("?" * len(vals))
        return self.db.execute(
            f"SELECT COUNT(*) FROM items WHERE state='embedded' AND json_extract(metadata, ?) IN ({marks})",
            [f"$.{json.dumps(column)}", *vals],
        ).fetchone()[0]

    def skipped(self) -> list[tuple[str, str, str]]:
        """(id, path or '', reason) of everything not searchable: undecodable or missing files."""
        rows = self.db.execute(
            "SELECT item_id, path, reason FROM items WHERE state='skipped' ORDER BY rowid").fetchall()
        rows += [(i, "", r) for i, r in self.db.execute("SELECT item_id, reason FROM missing ORDER BY item_id")]
        return rows

    # -- removal ---------------------------------------------------------------------------
    def _delete_rows(self, rowids: list[int]) -> None:
        """Delete items; the caller retires their vectors (remove or tombstone)."""
        marks = ",".join("?" * len(rowids))
        embedded = [r[0] for r in self.db.execute(
            f"SELECT rowid FROM items WHERE state='embedded' AND rowid IN ({marks})", rowids)]
        self.db.execute(f"DELETE FROM items WHERE rowid IN ({marks})", rowids)
        self.db.execute(f"DELETE FROM item_attributes WHERE item IN ({marks})", rowids)
        self.db.execute(f"DELETE FROM crops WHERE item IN ({marks})", rowids)
        self.db.execute(f"DELETE FROM attribute_state WHERE item IN ({marks})", rowids)
        self.db.executemany("INSERT OR IGNORE INTO tombstones VALUES (?)", [(r,) for r in embedded])

    def remove(self, item_ids: list[str]) -> list[str]:
        """Remove items by id; returns the ids that were not in the catalog."""
        unknown = []
        with self.db:
            for item_id in item_ids:
                row = self.db.execute("SELECT rowid FROM items WHERE item_id=?", (item_id,)).fetchone()
                if row is None:
                    unknown.append(item_id)
                else:
                    self._delete_rows([row[0]])
        return unknown

    def clear_attributes(self) -> None:
        """Drop every stored attribute prediction (``index-attributes --replace``)."""
        with self.db:
            self.db.execute("DELETE FROM item_attributes")
            self.db.execute("DELETE FROM attribute_state")
            self.db.execute("DELETE FROM meta WHERE key='attributes'")

    def tombstones(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT rowid FROM tombstones ORDER BY rowid")]

    def clear_tombstones(self, rowids: Iterable[int]) -> None:
        self.db.executemany("DELETE FROM tombstones WHERE rowid=?", [(r,) for r in rowids])

    def add_tombstones(self, rowids: Iterable[int]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO tombstones VALUES (?)", [(r,) for r in rowids])
