"""Photos and item ids from clients: checked and decoded (``decode_photo``, ``check_id``), and
stored for the items added through the API (``save_upload``, ``remove_upload``): under
``INDEX/uploads/`` for a local index, or in the ``uploads`` location every replica reads (a
shared folder or an fsspec URL such as ``s3://bucket/uploads``) for a shared store. Stored
photos are read back, wherever they are, as :class:`StoredPhoto`."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fashionlens.data.images import ImageError, is_url, open_image, open_source
from fashionlens.index.query import DRAFT_SIZE

# Photo formats accepted from clients (no EPS and the like, which Pillow hands to Ghostscript).
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO (phone cameras)
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
UPLOADS = "uploads"


class BadPhoto(Exception):
    """An upload that is not a usable photo (422)."""


@dataclass
class Photo:
    """An uploaded photo, decoded as each model decodes catalog photos (a JPEG at reduced scale
    down to the model's input size: the same pixels as when the catalog was indexed)."""
    data: bytes
    size: tuple[int, int]  # the photo's own width and height
    format: str
    max_pixels: int
    _decoded: dict = field(default_factory=dict, repr=False)

    def at(self, draft: int) -> Image.Image:
        key = draft if self.format == "jpeg" else 0
        if key not in self._decoded:
            self._decoded[key] = open_image(self.data, draft_size=draft, max_pixels=self.max_pixels)
        return self._decoded[key]


def decode_photo(data: bytes, max_pixels: int, draft: int = DRAFT_SIZE) -> Photo:
    """The upload's bytes as a photo (decoded once at ``draft`` to check it), or
    :class:`BadPhoto` with the reason."""
    if not data:
        raise BadPhoto("the photo is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as header:
            photo = Photo(data, header.size, (header.format or "bin").lower(), max_pixels)
        photo.at(draft)
    except ImageError as exc:
        raise BadPhoto(str(exc).removeprefix("upload: ")) from None
    except UnidentifiedImageError:
        raise BadPhoto(f"not a photo in a supported format ({', '.join(UPLOAD_FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise BadPhoto(f"too many pixels ({exc})") from None
    except Exception as exc:  # a codec bug: a 422, not a crash
        raise BadPhoto(f"cannot decode ({type(exc).__name__})") from None
    return photo


@dataclass
class Croppers:
    """What a server cuts: query photos (``search.crop``) and added items (the catalog's own crop,
    as recorded by ``index --crop``, so that added items match the indexed ones)."""
    query: object = None
    item: object = None

    @classmethod
    def of(cls, query_crop: str, recorded: dict | None) -> Croppers:
        from fashionlens.data.crops import build_cropper

        recorded = recorded or {"crop": "none"}
        return cls(build_cropper(query_crop), build_cropper(recorded["crop"], recorded.get("crop_regions")))


def cut(photo: Photo, cropper, metadata: dict | None, size: int) -> tuple[Image.Image, dict | None]:
    """The photo as the model takes it: decoded at a draft near ``size`` uncut, or whole and cut by
    ``cropper`` (to the region of ``metadata``, for an item), with the box as a dict."""
    if cropper is None:
        return photo.at(size), None
    img, box = cropper(photo.at(0), cropper.region_for(metadata) if metadata is not None else None)
    return img, box.to_dict()


def check_id(item_id: str) -> str:
    if not ID_PATTERN.fullmatch(item_id or ""):
        raise ValueError(f"item id {item_id[:80]!r}: use 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return item_id


class StoredPhoto:
    """A catalog item's photo: a local path or a URL fsspec opens."""

    def __init__(self, uri: str | Path):
        self.uri = str(uri)
        self.name = self.uri.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.uri

    def _fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.uri)

    def exists(self) -> bool:
        if not is_url(self.uri):
            return Path(self.uri).is_file()
        try:
            fs, path = self._fs()
            return fs.isfile(path)
        except (OSError, ValueError, ImportError):
            return False

    def version(self) -> str:
        """Changes when the file does (for caches): its modification time, or an object's ETag."""
        if not is_url(self.uri):
            return str(Path(self.uri).stat().st_mtime_ns)
        fs, path = self._fs()
        info = fs.info(path)
        return str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("size"))

    def read_bytes(self) -> bytes:
        with open_source(self.uri) as fh:
            return fh.read()


def _digest_name(photo: Photo) -> tuple[str, str]:
    digest = hashlib.sha256(photo.data).hexdigest()
    return digest, f"{digest[:2]}/{digest[:40]}.{re.sub(r'[^a-z0-9]', '', photo.format) or 'bin'}"


def save_shared(root: str, photo: Photo) -> str:
    """The photo's bytes in the shared ``uploads`` location ``root`` (a folder or an fsspec URL),
    named by their hash (so two replicas storing one photo write the same bytes to the same name);
    its URI. An object store's put is atomic; a folder gets a temporary file, then a rename."""
    _, name = _digest_name(photo)
    if not is_url(root):
        return str(save_upload(Path(root).resolve(), photo, sub=""))
    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    target = f"{base.rstrip('/')}/{name}"
    if not fs.exists(target):
        fs.pipe_file(target, photo.data)
    return f"{root.rstrip('/')}/{name}"


def save_upload(index_folder: Path, photo: Photo, sub: str = UPLOADS) -> Path:
    """The photo's bytes under ``INDEX/uploads/`` (``sub``), named by their hash, synced to disk."""
    digest, name = _digest_name(photo)
    path = index_folder / sub / name
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # a unique temporary name: two adds of one photo may race here
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{digest[:8]}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(photo.data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def remove_upload(path: Path, store) -> None:
    """Delete an uploaded photo no other item uses (the same photo may back two ids)."""
    if store.db.execute("SELECT 1 FROM items WHERE path=? LIMIT 1", (str(path),)).fetchone() is None:
        path.unlink(missing_ok=True)
