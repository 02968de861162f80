"""Vector stores: where a catalog's items live (id, vector, photo, metadata, attributes), and the
registry that opens one from the single argument every catalog command takes.

- a folder path: :class:`~fashionlens.index.stores.local.LocalStore` (FAISS + SQLite + chunk
  files; the default, one machine, one writer);
- ``milvus://HOST:PORT/COLLECTION`` (a Milvus server or cluster; its token in
  ``$FASHIONLENS_MILVUS_TOKEN``) or ``milvus+lite://PATH.db/COLLECTION`` (Milvus Lite, the
  embedded build of the same engine): :class:`~fashionlens.index.stores.milvus.MilvusStore`.

A store of another kind is one module of this package (or a plugin) with
``@STORES.register("scheme")`` on a :class:`VectorStore` subclass. Each item has a ``key``: the
store's own handle for it (the SQLite rowid of a local store, the item id in Milvus), which hits,
attribute rows and vector reads are keyed by.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from fashionlens.errors import UserError
from fashionlens.registry import Registry

SCHEME = re.compile(r"([a-z][a-z0-9+.-]*)://", re.IGNORECASE)


@dataclass
class SearchHit:
    id: str
    score: float
    path: str
    metadata: dict
    rowid: int | str | None = None  # the item's key in its store (a local store: its row, its id in FAISS)
    crop: dict | None = None  # the box its photo was embedded from (index --crop), else None


@dataclass
class Where:
    """What a filtered search keeps: ``filters`` {metadata column: allowed values} (values of one
    column are alternatives, columns must all match) and ``wants`` [(attribute number, value
    number)] of the stored predictions, each at ``min_confidence`` or more."""

    filters: dict[str, set[str]] = field(default_factory=dict)
    wants: list[tuple[int, int]] = field(default_factory=list)
    min_confidence: float = 0.5
    max_pool: int = 2000  # a store that filters after searching: the most nearest items it looks at

    def __bool__(self) -> bool:
        return bool(self.filters or self.wants)


class VectorStore(ABC):
    """A catalog's items, opened to read (any number of processes) or to write."""

    scheme: ClassVar[str] = ""
    location: str  # what the user named it by, for messages
    stateless: ClassVar[bool] = False  # holds nothing on the local disk (replicas can share it)

    @classmethod
    @abstractmethod
    def open(cls, location: str, create: bool = False, write: bool = False, **options) -> VectorStore:
        """The store at ``location``; ``create``: made if it is not there; ``write``: to change it."""

    # -- what made the vectors -------------------------------------------------------------------
    @abstractmethod
    def get_meta(self, key: str, default=None): ...

    @abstractmethod
    def set_meta(self, key: str, value) -> None: ...

    def check_embedder(self, described: dict) -> None:
        """A store holds vectors of one model: refuse another (``Embedder.describe()``)."""
        recorded = self.get_meta("embedder")
        if recorded and (recorded["model"], recorded["dim"], recorded.get("letterbox")) != (
                described["model"], described["dim"], described["letterbox"]):
            raise UserError(
                f"{self.location} holds {recorded['dim']}-d vectors of {recorded['model']} at "
                f"{recorded.get('letterbox')} px; this model is {described['model']} "
                f"({described['dim']}-d, {described['letterbox']} px). Use the store's own model, or a new store")

    # -- reading ---------------------------------------------------------------------------------
    @abstractmethod
    def count(self) -> int:
        """Searchable items."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int = 10) -> list[list[SearchHit]]:
        """Top-``k`` items for each unit-length query vector."""

    @abstractmethod
    def search_where(self, vector: np.ndarray, k: int, where: Where, attributes=None) -> list[SearchHit]:
        """The ``k`` nearest items to one vector that meet ``where``, in similarity order
        (``attributes``: the store's :class:`StoredAttributes`, for ``where.wants``)."""

    @abstractmethod
    def get_item(self, item_id: str) -> dict | None:
        """``{key, id, path, metadata, state}`` (state ``embedded`` when searchable), or None."""

    @abstractmethod
    def vectors(self, keys) -> tuple[np.ndarray, np.ndarray]:
        """(the ``keys`` found, in a fixed order; their stored vectors), exact."""

    @abstractmethod
    def read_attributes(self, keys: list, attrs: list[int] | None = None) -> dict:
        """{key: [(attribute number, value number, confidence, scores, box or None, feature or
        None)]} of the stored predictions (``attrs``: only those attributes)."""

    @abstractmethod
    def attribute_counts(self) -> tuple[int, int]:
        """(items explained, items whose photo could not be read) by ``index-attributes``."""

    def warm(self) -> None:
        """Load what the first search would (a local store's FAISS file), so that it fails or
        waits here rather than in the first request."""

    @abstractmethod
    def summary(self) -> dict:
        """What ``fashionlens info`` prints."""

    # -- changing ------------------------------------------------------------------------------
    @abstractmethod
    def remove(self, item_ids: list[str]) -> list[str]:
        """Remove items; returns the ids that were not there."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


STORES: Registry[type[VectorStore]] = Registry("vector store", "fashionlens.index.stores")


def scheme_of(location: str | Path) -> str:
    """``milvus`` of ``milvus://host/c``, ``local`` of a folder path."""
    match = SCHEME.match(str(location))
    return match.group(1).lower() if match else "local"


def open_store(location: str | Path, create: bool = False, write: bool = False, **options) -> VectorStore:
    """The store named by ``location`` (a folder, ``milvus://...``, ``milvus+lite://...``)."""
    scheme = scheme_of(location)
    if scheme not in STORES:
        raise UserError(f"{location}: unknown kind of store {scheme + '://'!r}; use a folder, "
                        + ", ".join(f"{s}://..." for s in STORES.names() if s != "local"))
    return STORES.get(scheme).open(str(location), create=create, write=write, **options)
