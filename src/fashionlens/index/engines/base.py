"""Embedding engines: what turns a page of (key, photo) rows into vectors for ``fashionlens index``.

``local`` (the default) decodes in this process or in DataLoader workers and runs the model here;
``ray`` runs the same decoding and the same model on a Ray cluster (Ray Data). Both yield
:class:`~fashionlens.models.embedder.EmbeddedBatch` es (keys, vectors, errors), which the store's
writer consumes; so the vectors of both engines for one photo agree (same model, same runtime).
A new engine is one module here with ``@ENGINES.register("name")`` on an :class:`Engine` subclass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from fashionlens.registry import Registry


class Engine:
    """Embeds pages of rows with the model of ``cfg`` (an :class:`~fashionlens.index.config.IndexConfig`)."""

    page = 65_536  # rows handed to one call of :meth:`embed`

    def __init__(self, cfg, embedder):
        from fashionlens.data.crops import build_cropper

        self.cfg, self.embedder = cfg, embedder
        self.cropper = build_cropper(getattr(cfg, "crop", "none"), getattr(cfg, "crop_regions", None))

    def embed(self, rows: Sequence[tuple]) -> Iterator:
        """:class:`EmbeddedBatch` es for ``rows`` of (key, photo path or URL[, crop region]), in any
        order; with a crop, each batch carries the box of each key's photo."""
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def close(self) -> None: ...


ENGINES: Registry[type[Engine]] = Registry("embedding engine", "fashionlens.index.engines")
EngineName = ENGINES.setting()
"""A config field naming an engine."""
