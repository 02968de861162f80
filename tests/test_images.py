"""Safe decoding (every failure is an ImageError) and the letterbox transform."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fashionlens.data import images as images_mod
from fashionlens.data.images import ImageError, image_size, open_image
from fashionlens.data.transforms import Preprocess, letterbox


def _noise_jpeg(path: Path, w: int = 64, h: int = 48) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims ``w`` x ``h`` pixels, with no pixel data to speak of."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


# --- open_image --------------------------------------------------------------------------------


def test_good_jpeg_decodes_to_rgb(tmp_path):
    img = open_image(_noise_jpeg(tmp_path / "ok.jpg"))
    assert img.mode == "RGB" and img.size == (64, 48)


def test_bytes_and_other_modes_become_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("LA", (10, 20), (128, 255)).save(path)
    img = open_image(path.read_bytes())
    assert img.mode == "RGB" and img.size == (10, 20)
    assert img.getpixel((5, 5)) == (128, 128, 128)


def test_draft_size_shrinks_big_jpegs_but_not_below_the_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (800, 600), (10, 200, 30)).save(path)
    img = open_image(path, draft_size=224)
    assert img.size == (400, 300)  # a power-of-two reduction that keeps both sides >= 224
    assert open_image(path).size == (800, 600)


def test_truncated_jpeg(tmp_path):
    data = _noise_jpeg(tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg: broken image"):
        open_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match="broken image"):
        open_image(tmp_path / "cut.jpg", draft_size=16)


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a photo\n")
    with pytest.raises(ImageError, match="notes.jpg: not an image file"):
        open_image(tmp_path / "notes.jpg")


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="not an image file"):
        open_image(tmp_path / "empty.jpg")


def test_over_max_pixels_refused_from_the_header(tmp_path):
    # 7000 x 7000 = 49 Mpx: over MAX_PIXELS (40 Mpx), under Pillow's own bomb threshold
    path = _png_header_only(tmp_path / "bomb.png", 7000, 7000)
    assert 7000 * 7000 > images_mod.MAX_PIXELS
    with pytest.raises(ImageError, match="7000x7000 pixels is over the limit"):
        open_image(path)


def test_decompression_bomb_beyond_pillow_limit(tmp_path):
    path = _png_header_only(tmp_path / "huge.png", 50_000, 50_000)
    with pytest.raises(ImageError, match="huge.png"):
        open_image(path)
    with pytest.raises(ImageError):
        open_image(path.read_bytes())


def test_max_pixels_is_honoured(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.new("RGB", (20, 20)).save(path)
    assert open_image(path).size == (20, 20)
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 399)
    with pytest.raises(ImageError, match="20x20 pixels is over the limit of 399"):
        open_image(path)
    with pytest.raises(ImageError, match="20x20 pixels is over the limit of 100"):
        open_image(path.read_bytes(), max_pixels=100)
    assert open_image(path, max_pixels=400).size == (20, 20)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "absent.jpg")


def test_directory(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(ImageError, match="is a folder"):
        open_image(tmp_path / "folder.jpg")


# --- letterbox ---------------------------------------------------------------------------------


def test_letterbox_wide_image_pads_top_and_bottom():
    out = letterbox(Image.new("RGB", (100, 50), (200, 30, 60)), 64)
    assert out.size == (64, 64) and out.mode == "RGB"
    arr = np.asarray(out)
    # long side fills the square; short side scaled by the same factor (50 * 0.64 = 32), centred
    rows = np.flatnonzero(arr.any(axis=(1, 2)))
    cols = np.flatnonzero(arr.any(axis=(0, 2)))
    assert (rows[0], rows[-1] + 1) == (16, 48)
    assert (cols[0], cols[-1] + 1) == (0, 64)
    assert (arr[:16] == 0).all() and (arr[48:] == 0).all()
    assert tuple(arr[32, 32]) == (200, 30, 60)
    assert tuple(arr[16, 0]) == (200, 30, 60) and tuple(arr[47, 63]) == (200, 30, 60)


def test_letterbox_tall_image_pads_left_and_right():
    out = np.asarray(letterbox(Image.new("RGB", (30, 120), (0, 255, 0)), 40))
    assert out.shape == (40, 40, 3)
    cols = np.flatnonzero(out.any(axis=(0, 2)))
    assert (cols[0], cols[-1] + 1) == (15, 25)  # 30 * 40/120 = 10 px wide, centred
    assert (out[:, :15] == 0).all() and (out[:, 25:] == 0).all()
    assert tuple(out[20, 20]) == (0, 255, 0) and tuple(out[0, 20]) == (0, 255, 0)


def test_letterbox_square_and_upscale_have_no_padding():
    out = np.asarray(letterbox(Image.new("RGB", (10, 10), (9, 99, 199)), 32))
    assert out.shape == (32, 32, 3) and (out == (9, 99, 199)).all()


def test_letterbox_fill_colour():
    out = np.asarray(letterbox(Image.new("RGB", (20, 10), (255, 255, 255)), 20, fill=(1, 2, 3)))
    assert tuple(out[0, 0]) == (1, 2, 3) and tuple(out[10, 10]) == (255, 255, 255)


def test_preprocess_normalises_padding_and_content():
    pre = Preprocess(32, (0.5,) * 3, (0.5,) * 3)
    t = pre(Image.new("RGB", (64, 32), (255, 0, 255)))
    assert isinstance(t, torch.Tensor) and t.shape == (3, 32, 32) and t.dtype == torch.float32
    assert torch.allclose(t[:, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))  # zero padding
    assert torch.allclose(t[:, 16, 16], torch.tensor([1.0, -1.0, 1.0]))
    assert pre.describe()["letterbox"] == 32


def test_image_size_reads_the_header_only(tmp_path, monkeypatch):
    """Width and height without decoding: a PNG that is all header still gives its size, and a
    missing file, a folder, a text file, a photo over the pixel limit or a decompression bomb is
    an ImageError naming the file."""
    assert image_size(_noise_jpeg(tmp_path / "ok.jpg", 64, 48)) == (64, 48)
    assert image_size(_png_header_only(tmp_path / "header.png", 300, 200)) == (300, 200)
    with pytest.raises(ImageError):  # the same file cannot be decoded
        open_image(tmp_path / "header.png")
    with pytest.raises(ImageError, match="no such file"):
        image_size(tmp_path / "absent.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        image_size(tmp_path)
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ImageError, match="notes.jpg: not an image"):
        image_size(tmp_path / "notes.jpg")
    with pytest.raises(ImageError, match="mid.png: 7000x7000 pixels is over the limit"):  # as open_image
        image_size(_png_header_only(tmp_path / "mid.png", 7_000, 7_000))
    with pytest.raises(ImageError, match="huge.png: too many pixels"):
        image_size(_png_header_only(tmp_path / "huge.png", 50_000, 50_000))
    with pytest.raises(ImageError, match="big.png: too many pixels"):  # Pillow's warning range
        image_size(_png_header_only(tmp_path / "big.png", 10_000, 10_000))
