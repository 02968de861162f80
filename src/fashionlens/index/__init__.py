"""The catalog store (SQLite), embedding chunks and FAISS vector index."""

from fashionlens.index.catalog_index import CatalogIndex, SearchHit

__all__ = ["CatalogIndex", "SearchHit"]
