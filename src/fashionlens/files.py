"""Files that are either wholly written or not at all: write a temporary file beside the
target, then rename it over the target (``os.replace`` is atomic on POSIX)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        fh.write(text)
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def atomic_write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    """``rows`` as lists of values in ``columns`` order (None written as an empty field)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    atomic_write_text(path, buffer.getvalue())


def atomic_write_dict_rows(path: str | Path, columns: Sequence[str], rows: Iterable[dict]) -> None:
    """``rows`` as dicts; each row's values of ``columns`` (missing or None: an empty field)."""
    atomic_write_csv(path, columns, ([row.get(c) for c in columns] for row in rows))
