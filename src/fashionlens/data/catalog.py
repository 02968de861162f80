"""Catalog readers: a CSV with an id/path column and metadata, a folder of images, or both.

``open_catalog(path)`` accepts
- a CSV file: one row per item; an id column (``id``, ``item_id``, ``sku``, ...) and/or a path
  column (``path``, ``image``, ``filename``, ...); every other column is metadata. Without a
  path column the image is looked up as ``images/<id>.<ext>`` or ``<id>.<ext>`` beside the CSV.
  A path may be a URL that fsspec opens (``s3://bucket/a.jpg``): it is read when the photo is
  decoded (a missing one is then skipped with its reason), not checked while reading the rows.
- a Parquet file with the same columns (read in record batches; needs pyarrow);
- a folder of images, recursively; the sub-folder of an image is its ``label``;
- a folder holding one CSV and its images (the shared ``catalog/``: ``styles.csv`` +
  ``images/<id>.jpg``).

Readers stream: a catalog of millions of rows is never held in memory. A row whose image file
does not exist comes out as a :class:`Missing` so the caller can report it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fashionlens.data.images import is_url
from fashionlens.data.records import Item
from fashionlens.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ID_COLUMNS = ("id", "item_id", "itemid", "image_id", "sku", "product_id", "style_id")
PATH_COLUMNS = ("path", "image", "image_path", "filename", "file", "image_name", "img")


@dataclass(frozen=True)
class Missing:
    """A catalog row whose image is not there."""

    id: str
    reason: str


@dataclass
class CatalogSource:
    """A catalog to read: ``kind`` is ``csv`` or ``folder``; iterate it for items."""

    path: Path
    kind: str
    image_root: Path | None = None

    def __iter__(self) -> Iterator[Item | Missing]:
        if self.kind == "csv":
            return iter_catalog_csv(self.path, self.image_root)
        if self.kind == "parquet":
            return iter_catalog_parquet(self.path, self.image_root)
        return iter_image_folder(self.path)

    def describe(self) -> str:
        return f"{self.kind} {self.path}"


def _find_column(header: list[str], candidates: tuple[str, ...]) -> str | None:
    lowered = {h.strip().lower(): h for h in header}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _image_for_id(base: Path, item_id: str) -> Path | None:
    for folder in (base / "images", base):
        for ext in IMAGE_EXTENSIONS:
            candidate = folder / f"{item_id}{ext}"
            if candidate.is_file():
                return candidate
    return None


def _row_item(record: dict[str, str], id_col: str | None, path_col: str | None, base: Path,
              where: str) -> Item | Missing:
    """One manifest row (its columns as strings) as an item, or :class:`Missing`."""
    rel = record.pop(path_col) if path_col else ""
    item_id = record.pop(id_col) if id_col else Path(rel.split("://")[-1]).with_suffix("").as_posix()
    if not item_id:
        raise UserError(f"{where}: empty id")
    if is_url(rel):
        return Item(item_id, rel, record)
    path = (base / rel) if rel else _image_for_id(base, item_id)
    if path is None or not path.is_file():
        return Missing(item_id, f"{where}: image not found ({path or f'images/{item_id}.*'})")
    return Item(item_id, path, record)


def _columns(header: list[str], source: Path) -> tuple[str | None, str | None]:
    id_col, path_col = _find_column(header, ID_COLUMNS), _find_column(header, PATH_COLUMNS)
    if id_col is None and path_col is None:
        raise UserError(f"{source}: no id or image column; name one {'/'.join(ID_COLUMNS[:4])} or "
                        f"{'/'.join(PATH_COLUMNS[:4])} (found: {', '.join(header)})")
    return id_col, path_col


def iter_catalog_parquet(path: Path, image_root: Path | None = None, batch: int = 10_000) -> Iterator[Item | Missing]:
    """Stream a Parquet manifest, a record batch at a time (values as strings, None as "")."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow (pip install 'fashionlens[scale]')") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's own error types for a broken file
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    id_col, path_col = _columns(table.schema_arrow.names, path)
    row = 0
    for records in table.iter_batches(batch_size=batch):
        for record in records.to_pylist():
            row += 1
            yield _row_item({k: "" if v is None else str(v).strip() for k, v in record.items()}, id_col, path_col,
                            image_root or path.parent, f"{path.name}:row {row}")


def iter_catalog_csv(csv_path: Path, image_root: Path | None = None) -> Iterator[Item | Missing]:
    """Stream a catalog CSV (delimiter sniffed among , ; tab |). Duplicate ids are the
    caller's to detect (the index does, through SQLite, without a set of millions in memory)."""
    base = image_root or csv_path.parent
    try:
        fh = open(csv_path, encoding="utf-8-sig", newline="")
        sample = fh.read(16384)
        fh.seek(0)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{csv_path}: cannot read as UTF-8 text ({exc})") from None
    with fh:
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
        except csv.Error:
            dialect = csv.excel
        reader = csv.reader(fh, dialect)
        try:
            header = next(reader, None)
            if not header:
                raise UserError(f"{csv_path}: empty CSV, expected a header row")
            id_col, path_col = _columns(header, csv_path)
            for row in reader:
                line_no = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise UserError(f"{csv_path}:{line_no}: {len(row)} fields, the header has {len(header)}")
                record = {h: v.strip() for h, v in zip(header, row)}
                yield _row_item(record, id_col, path_col, base, f"{csv_path.name}:{line_no}")
        except UnicodeDecodeError as exc:
            raise UserError(f"{csv_path}: not UTF-8 text ({exc})") from None
        except csv.Error as exc:
            raise UserError(f"{csv_path}:{reader.line_num}: {exc}") from None


def iter_image_folder(folder: Path) -> Iterator[Item]:
    """Every image below ``folder`` in a stable order; its id is the path relative to
    ``folder`` without suffix, and ``label`` the sub-folder it lies in (empty at the top)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(folder)
            label = rel.parent.as_posix() if rel.parent != Path(".") else ""
            yield Item(rel.with_suffix("").as_posix(), path, {"label": label})


def open_catalog(path: Path) -> CatalogSource:
    """A CSV file, a folder with one CSV and its images, or a folder of images."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() in (".parquet", ".pq"):
            return CatalogSource(path, "parquet")
        if path.suffix.lower() not in (".csv", ".tsv", ".txt"):
            raise UserError(f"{path}: expected a catalog CSV or Parquet file, or a folder of images")
        return CatalogSource(path, "csv")
    csvs = sorted(path.glob("*.csv"))
    if len(csvs) > 1:
        raise UserError(f"{path}: holds several CSV files ({', '.join(c.name for c in csvs)}); name one")
    if csvs:
        return CatalogSource(csvs[0], "csv")
    return CatalogSource(path, "folder")
