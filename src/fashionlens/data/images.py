"""Safe image decoding: every failure becomes an :class:`ImageError` with a short reason."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# Images above this many pixels are refused (decompression bombs); 40 megapixels covers any
# real product or phone photo.
MAX_PIXELS = 40_000_000


class ImageError(Exception):
    """An image that cannot be used: missing, not an image, truncated or too large."""


def is_url(source) -> bool:
    """A photo named by a URL (``s3://bucket/a.jpg``, ``gs://``, ``https://``, ``file://``: anything
    fsspec opens) rather than a local path."""
    return isinstance(source, str) and "://" in source[:32]


def open_source(source: Path | str):
    """A binary file object for a local path or, through fsspec, a URL (read whole: photos are
    small, and a remote file read in pieces costs a round trip a piece)."""
    if is_url(source):
        import fsspec

        try:
            with fsspec.open(source, "rb") as fh:
                return io.BytesIO(fh.read())
        except FileNotFoundError:
            raise
        except (ValueError, ImportError) as exc:  # an unknown protocol, or its package missing
            raise OSError(f"cannot open this URL ({exc})") from None
    return open(source, "rb")


def open_image(source: Path | str | bytes, *, draft_size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode ``source`` (a path, a URL fsspec opens, or the file's bytes) fully into an RGB image.

    ``draft_size`` lets the JPEG decoder scale down by a power of two while decoding, as long as
    the result stays at least that large on both sides: much faster for big photos, and
    harmless because the image is resized to the model's input size afterwards. Images of more
    than ``max_pixels`` (default :data:`MAX_PIXELS`) are refused from their header, before any
    decoding.
    """
    with _opened(source, max_pixels) as img:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return img.convert("RGB")


def image_size(source: Path | bytes, *, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` of an image from its header, without decoding its pixels; refused
    (:class:`ImageError`) exactly as :func:`open_image` would refuse it before decoding."""
    with _opened(source, max_pixels) as img:
        return img.size


@contextmanager
def _opened(source: Path | bytes, max_pixels: int | None) -> Iterator[Image.Image]:
    """``source`` opened lazily (header read, pixels not yet decoded); any failure, also one
    while the caller decodes inside the ``with``, becomes an :class:`ImageError`."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    name = "upload" if isinstance(source, bytes) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open_source(source)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from None
    try:
        with fp, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            if img.width * img.height > max_pixels:
                raise ImageError(
                    f"{name}: {img.width}x{img.height} pixels is over the limit of {max_pixels:,}"
                )
            yield img
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: broken image ({exc})") from None
