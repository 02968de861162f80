"""Search an index by photo: decode, embed with the index's own model, search."""

from __future__ import annotations

from pathlib import Path

from fashionlens.data.images import ImageError, open_image
from fashionlens.errors import UserError
from fashionlens.index.catalog_index import CatalogIndex, SearchHit
from fashionlens.models.embedder import Embedder, build_embedder


# JPEGs are decoded at reduced scale down to this size at least (>= any input size we use).
DRAFT_SIZE = 512


def embedder_for(index: CatalogIndex, device: str = "cpu", optimize: str = "auto") -> Embedder:
    """The model that made the index's vectors, as recorded in it."""
    cfg = index.store.get_meta("config")
    if not cfg:
        raise UserError(f"{index.folder}: the index records no model; re-run 'fashionlens index'")
    embedder = build_embedder(cfg["model"], cfg.get("input_size"), device, optimize=optimize)
    index.check_embedder(embedder.describe())
    return embedder


def load_photos(paths: list[Path], draft_size: int):
    """Decode every photo, or raise a one-line UserError naming the first bad one."""
    images = []
    for path in paths:
        try:
            images.append(open_image(path, draft_size=draft_size))
        except ImageError as exc:
            raise UserError(str(exc)) from None
    return images


class Searcher:
    """An open index with its model loaded: search by photo paths or decoded images."""

    def __init__(self, folder: Path, device: str = "cpu", optimize: str = "auto"):
        self.index = CatalogIndex(folder)
        self.embedder = embedder_for(self.index, device, optimize)
        self.index.load()

    def search_images(self, images, k: int = 10, batch_size: int = 16) -> list[list[SearchHit]]:
        results = []
        for start in range(0, len(images), batch_size):
            results += self.index.search(self.embedder.embed_images(images[start:start + batch_size]), k)
        return results

    def search_paths(self, paths: list[Path], k: int = 10, batch_size: int = 16) -> list[list[SearchHit]]:
        return self.search_images(load_photos(paths, self.embedder.preprocess.size), k, batch_size)

    def close(self) -> None:
        self.index.close()
