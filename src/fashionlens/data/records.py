"""The one record every reader yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Item:
    """One image with its catalog id and metadata.

    ``id`` is the catalog's own id (a string: SKUs are not always numbers); ``path`` the image
    file; ``metadata`` every other column, as strings.
    """

    id: str
    path: Path | str  # a local file, or a URL fsspec opens (s3://...)
    metadata: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
