"""``local``: an index folder on this machine (FAISS + SQLite + chunk files,
:class:`~fashionlens.index.catalog_index.CatalogIndex`), the default store."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fashionlens.index.catalog_index import CatalogIndex
from fashionlens.index.stores.base import STORES, SearchHit, VectorStore, Where


def meets(metadata: dict, filters: dict[str, set[str]] | None) -> bool:
    """Does an item's metadata have one of the allowed values in every filtered column?"""
    return not filters or all(str(metadata.get(c, "")) in allowed for c, allowed in filters.items())


@STORES.register("local")
class LocalStore(CatalogIndex, VectorStore):
    """An index folder; a writer holds its lock (one writer process at a time)."""

    scheme = "local"

    @classmethod
    def open(cls, location: str, create: bool = False, write: bool = False, **options) -> LocalStore:
        return cls(Path(location), create=create, write=write)

    @property
    def location(self) -> str:
        return str(self.folder)

    def warm(self) -> None:
        self.load()

    def get_meta(self, key: str, default=None):
        return self.store.get_meta(key, default)

    def set_meta(self, key: str, value) -> None:
        self.store.set_meta(key, value)

    def count(self) -> int:
        return self.store.count("embedded")

    def get_item(self, item_id: str) -> dict | None:
        row = self.store.get_item(item_id)
        return None if row is None else {**row, "key": row["rowid"]}

    def search_where(self, vector: np.ndarray, k: int, where: Where, attributes=None) -> list[SearchHit]:
        """FAISS cannot filter on SQLite's metadata: the nearest items are taken in pools of k x 10,
        growing x 4 up to ``where.max_pool``, and checked here; so the result is the plain
        search's order with the other items left out."""
        ntotal, checked = self.load().ntotal, {}
        pool = min(k * 10, where.max_pool)
        wanted = sorted({a for a, _ in where.wants})
        while True:
            hits = self.search(vector[None], pool)[0]
            new = [h for h in hits if h.rowid not in checked]
            rows = attributes.rows([h.rowid for h in new], attrs=wanted) if where.wants else {}
            for h in new:
                row = rows.get(h.rowid)
                checked[h.rowid] = meets(h.metadata, where.filters) and (not where.wants or row is not None and all(
                    row[a] is not None and row[a].index == v and row[a].confidence >= where.min_confidence
                    for a, v in where.wants))
            kept = [h for h in hits if checked[h.rowid]]
            if len(kept) >= k or pool >= min(where.max_pool, ntotal):
                return kept[:k]
            pool = min(pool * 4, where.max_pool)

    def read_attributes(self, keys: list, attrs: list[int] | None = None) -> dict:
        out: dict[int, list] = {}
        only = "" if attrs is None else f" AND attr IN ({','.join(str(int(a)) for a in attrs)})"
        for start in range(0, len(keys), 900):
            part = [int(r) for r in keys[start:start + 900]]
            for item, a, value, conf, scores, x, y, w, h, feature in self.store.db.execute(
                    f"SELECT * FROM item_attributes WHERE item IN ({','.join('?' * len(part))}){only}", part):
                out.setdefault(item, []).append((
                    a, value, conf, np.frombuffer(scores, np.float16).astype(float).tolist(),
                    None if x is None else (x, y, w, h),
                    None if feature is None else np.frombuffer(feature, np.float16)))
        return out

    def attribute_counts(self) -> tuple[int, int]:
        """(items explained, items whose photo could not be read) by ``index-attributes``."""
        count = lambda sql: self.store.db.execute(sql).fetchone()[0]  # noqa: E731
        return (count("SELECT COUNT(*) FROM attribute_state WHERE reason IS NULL"),
                count("SELECT COUNT(*) FROM attribute_state WHERE reason IS NOT NULL"))

    # -- attributes (fashionlens index-attributes) ------------------------------------------------
    def attribute_todo(self, page: int = 4096):
        """Pages of (key, path) of the searchable items without stored attributes (those whose
        photo could not be read included: tried again)."""
        last = 0
        while rows := self.store.db.execute(
                "SELECT i.rowid, i.path FROM items i LEFT JOIN attribute_state a ON a.item = i.rowid "
                "WHERE i.state='embedded' AND i.rowid>? AND (a.item IS NULL OR a.reason IS NOT NULL) "
                "ORDER BY i.rowid LIMIT ?", (last, page)).fetchall():
            last = rows[-1][0]
            yield rows

    def attribute_todo_count(self) -> int:
        return self.store.db.execute(
            "SELECT COUNT(*) FROM items i LEFT JOIN attribute_state a ON a.item = i.rowid "
            "WHERE i.state='embedded' AND (a.item IS NULL OR a.reason IS NOT NULL)").fetchone()[0]

    def record_attributes(self, rows: list[tuple], explained: list, failed: list[tuple]) -> None:
        """One transaction: ``item_attributes`` rows (:func:`~fashionlens.index.attribute_indexing.item_rows`),
        the ``explained`` items marked done, the ``failed`` (key, reason) marked with their reason."""
        with self.store.db:
            self.store.record_attributes(rows, explained, failed)

    def clear_attributes(self) -> None:
        self.store.clear_attributes()

    def attribute_failures(self) -> list[tuple]:
        return self.store.db.execute(
            "SELECT i.item_id, i.path, a.reason FROM attribute_state a JOIN items i ON i.rowid = a.item "
            "WHERE a.reason IS NOT NULL ORDER BY a.item").fetchall()

    @property
    def report_folder(self) -> Path:
        """Where the commands write their lists of skipped photos."""
        return self.folder

    def summary(self) -> dict:
        store = self.store
        return {"store": "local", "location": self.location,
                "items": {s: store.count(s) for s in ("embedded", "pending", "skipped")},
                "index": store.get_meta("index_spec"), "embedder": store.get_meta("embedder"),
                "config": store.get_meta("config")}
