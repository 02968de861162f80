"""A catalog that many servers share: a Milvus store (``fashionlens serve milvus://...``).

The server keeps no catalog state on its own disk: items, vectors, attributes and what made them
live in Milvus, added photos in the ``uploads`` location every replica reads (a shared folder or an
fsspec URL). So N replicas behind a load balancer serve one catalog: an add or a removal through
one is one Milvus upsert or delete, which every replica's next search sees as soon as Milvus makes
it visible (``consistency``; see :mod:`fashionlens.index.stores.milvus`). There is no FAISS file to
persist, nothing to catch up at start and no structure to rebuild: the index job fits Milvus's
index to the collection's size (``fashionlens index``).

Two adds of one id through two replicas at once: Milvus has no conditional insert, so both
upsert and the later one wins (never two items). A removed item's photo stays in ``uploads``:
photos are named by their content, and another replica may be adding the same photo that moment.
"""

from __future__ import annotations

from pathlib import Path

from fashionlens.errors import UserError
from fashionlens.index.attribute_indexing import item_rows
from fashionlens.index.stores.milvus_rows import attribute_fields, item_row, read_attribute_fields
from fashionlens.serving.live import Conflict, LiveCatalog, NotFound
from fashionlens.serving.uploads import Photo, save_shared


class SharedCatalog(LiveCatalog):
    """:class:`LiveCatalog` over a stateless store: the same searches, batching and models; adds
    and removals go straight to the store."""

    def _options(self) -> dict:
        return {"consistency": self.cfg.consistency}

    @staticmethod
    def _where(folder: Path | str) -> str:
        return str(folder)

    def _catch_up(self) -> None:
        if self.writable and not self.cfg.uploads:
            raise UserError("a shared store needs 'uploads' (a folder or fsspec URL every replica reads) for the "
                            "photos added through the API; set it, or serve read-only (no API key)")

    def _start_writing(self) -> None:
        pass  # nothing to persist or rebuild here

    def count(self) -> int:
        return self.index.count()

    def index_state(self) -> dict:
        index = self.index.get_meta("index") or {}
        return {"index": f"Milvus {index.get('index_type', '?')}", "rebuilding": False}

    def item(self, item_id: str) -> dict:
        row = self.index.get_item(item_id)
        if row is None:
            raise NotFound(f"no item {item_id!r} in the catalog")
        stored = self.attributes.rows([row["key"]]).get(row["key"]) if self.attributes else None
        return {**row, "attributes": stored}

    def add(self, item_id: str, photo: Photo, metadata: dict[str, str]) -> dict:
        """Add one item: one upsert, durable in Milvus when it returns."""
        if not self.writable:
            raise Conflict("the catalog is read-only")
        if self.index.get_item(item_id) is not None:
            raise Conflict(f"item {item_id!r} exists; DELETE it first to replace it")
        vec = self.embed(photo)  # Milvus stores take no crop (index refuses --crop for them)
        results = self.explain_batch(photo.at(self.explainer.size)) if self.explain_batch else None
        uri = save_shared(self.cfg.uploads, photo)
        row = item_row(item_id, vec, uri, metadata)
        if results is not None:
            attrs = self.attributes
            row.update(attribute_fields(item_rows(item_id, results, photo.size, photo.at(self.explainer.size).size,
                                                  attrs.schema, attrs.projection), attrs.names))
        self.index.upsert([row])
        stored = (self.attributes.build(read_attribute_fields(row, self.attributes.names, None))
                  if results is not None else None)  # as written: a read may not see it yet (consistency)
        return {"key": item_id, "id": item_id, "path": uri, "metadata": row["metadata"], "state": "embedded",
                "attributes": stored}

    def remove(self, item_id: str) -> None:
        if not self.writable:
            raise Conflict("the catalog is read-only")
        if self.index.remove([item_id]):
            raise NotFound(f"no item {item_id!r} in the catalog")

    def persist(self) -> bool:
        return False

    def rebuild(self) -> bool:
        return False


def open_live(location: Path | str, cfg, writable: bool = False) -> LiveCatalog:
    """The live catalog for ``location``: a shared one for a stateless store (Milvus)."""
    from fashionlens.index.stores import STORES, scheme_of

    shared = scheme_of(location) in STORES and STORES.get(scheme_of(location)).stateless
    return (SharedCatalog if shared else LiveCatalog)(location, cfg, writable)
