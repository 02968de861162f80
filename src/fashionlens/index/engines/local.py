"""``local``: decode in this process (or ``workers`` DataLoader processes) and embed here."""

from __future__ import annotations

from fashionlens.index.engines.base import ENGINES, Engine
from fashionlens.models.embedder import embed_rows


@ENGINES.register("local")
class LocalEngine(Engine):
    def embed(self, rows):
        return embed_rows(rows, self.embedder, self.cfg.batch_size, self.cfg.workers, self.cropper)

    def describe(self) -> str:
        return f"local ({self.cfg.workers} decoding workers)"
