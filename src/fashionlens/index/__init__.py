"""The index stage: vector stores (a local folder: SQLite + embedding chunks + FAISS; Milvus),
embedding engines (here, Ray), and searching them."""

from fashionlens.index.catalog_index import CatalogIndex
from fashionlens.index.stores import SearchHit, VectorStore, open_store
from fashionlens.index.stores.local import LocalStore

__all__ = ["CatalogIndex", "LocalStore", "SearchHit", "VectorStore", "open_store"]
