"""Vector stores (each module of this package registers one; :mod:`.base` opens them by location)."""

from fashionlens.index.stores.base import STORES, SearchHit, VectorStore, Where, open_store, scheme_of

__all__ = ["STORES", "SearchHit", "VectorStore", "Where", "open_store", "scheme_of"]
