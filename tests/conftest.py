"""Shared fixtures: a tiny synthetic catalog, a tiny (fast) real Embedder, the shared data.

``make_tiny_embedder`` and ``make_catalog`` are plain functions so that a subprocess script can
import them too (``sys.path.insert(0, tests_dir); from conftest import ...``).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

import fashionlens.index.catalog_index as catalog_index_mod
from fashionlens.data.records import Item
from fashionlens.index import LocalStore, types

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TESTS_DIR = Path(__file__).resolve().parent

ARTICLE_TYPES = ("Tshirts", "Shirts", "Jeans", "Dresses", "Skirts", "Casual Shoes")
PATTERNS = ("solid", "hstripes", "vstripes", "checker")


def _colour(i: int) -> tuple[int, int, int]:
    """Distinct colours: walk the RGB cube with co-prime steps."""
    return ((37 + 97 * i) % 256, (11 + 59 * i) % 256, (151 + 173 * i) % 256)


def make_image(path: Path, i: int, size: int = 24) -> Path:
    """Image number ``i``: a distinct colour, drawn solid or as stripes/checks on black."""
    arr = np.zeros((size, size, 3), np.uint8)
    colour = np.array(_colour(i), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    pattern = PATTERNS[(i // 7) % len(PATTERNS)]
    mask = {
        "solid": np.ones((size, size), bool),
        "hstripes": (yy // 4) % 2 == 0,
        "vstripes": (xx // 4) % 2 == 0,
        "checker": ((yy // 4) + (xx // 4)) % 2 == 0,
    }[pattern]
    arr[mask] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)
    return path


def make_catalog(root: Path, n: int = 24, start: int = 0, size: int = 24) -> Path:
    """``root/styles.csv`` (id,articleType,baseColour) + ``root/images/<id>.jpg``; returns the CSV.

    Ids are zero-padded strings (``item-0007``) so that string handling is visible. Calling it
    again with a larger ``n`` rewrites the CSV and adds only the missing images.
    """
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        item_id = f"item-{i:04d}"
        image = root / "images" / f"{item_id}.jpg"
        if i >= start and not image.exists():
            make_image(image, i, size)
        rows.append([item_id, ARTICLE_TYPES[i % len(ARTICLE_TYPES)], f"colour{i:02d}"])
    csv_path = root / "styles.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "articleType", "baseColour"])
        writer.writerows(rows)
    return csv_path


def make_tiny_embedder(out_channels: int = 8, name: str = "tiny-test", delay: float = 0.0, seed: int = 0):
    """A real :class:`Embedder` around conv(3->C) + global average pool: milliseconds a batch."""
    import torch
    from torch import nn

    from fashionlens.data.transforms import Preprocess
    from fashionlens.models.embedder import Embedder

    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(3, out_channels, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            if delay:
                time.sleep(delay)
            return self.pool(self.conv(x)).flatten(1)

    return Embedder(TinyNet(), Preprocess(32, (0.5,) * 3, (0.5,) * 3), name)


def unit(rng, n, dim):
    """``n`` random unit vectors."""
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def all_vectors(index) -> tuple[np.ndarray, np.ndarray]:
    """(rowids, vectors) of every live item, read back from the committed chunk files."""
    ids, vecs = [], []
    for chunk in index.store.chunks():
        rowids, v = index.chunks.read(chunk)
        live = np.isin(rowids, list(index.store.live_rowids(rowids.tolist())))
        ids.append(rowids[live])
        vecs.append(v[live])
    return np.concatenate(ids), np.concatenate(vecs)


def synthetic_index(folder: Path, vecs: np.ndarray, index_type="auto", flat_max=100_000, chunk=500,
                    first=0, **settings) -> LocalStore:
    """Add ``vecs`` as items ``v<first+i>`` through the store and chunk API, then refresh
    (``settings``: more of the recorded index settings, e.g. ``ivf_flat_max``, ``rerank``)."""
    idx = LocalStore(folder, create=True)
    store = idx.store
    store.set_meta("embedder", {"model": "synthetic", "dim": vecs.shape[1], "letterbox": 0})
    store.set_meta("index_settings", {"index_type": index_type, "flat_max": flat_max, "train_sample": 100_000,
                                      **settings})
    ids = range(first, first + len(vecs))
    store.upsert([Item(f"v{i:05d}", Path(f"/fake/{i}.jpg"), {"n": str(i)}) for i in ids], store.new_run())
    for page in store.pending(chunk):
        rowids = np.array([r for r, _ in page], np.int64)
        rows = np.array([int(Path(p).stem) - first for _, p in page])
        c = store.next_chunk()
        idx.chunks.write(c, rowids, vecs[rows])
        store.commit_chunk(c, rowids.tolist(), [])
    idx.refresh()
    return idx


def brute_force(idx: LocalStore, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
    rowids, vecs = all_vectors(idx)
    scores = queries @ vecs.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    names = idx.store.get_rows(rowids.tolist())
    return [[names[int(rowids[j])]["id"] for j in row] for row in order], np.take_along_axis(scores, order, 1)


def recall(idx: LocalStore, queries: np.ndarray, k: int = 10) -> float:
    truth, _ = brute_force(idx, queries, k)
    got = idx.search(queries, k)
    return float(np.mean([len(set(t) & {h.id for h in g}) / k for t, g in zip(truth, got)]))


def search_ids(idx, queries, k):
    return [[h.id for h in hits] for hits in idx.search(queries, k)]


def indexed_rowids(idx) -> np.ndarray:
    """The ids the loaded FAISS index holds (an ``IDMap`` index's map, or an IVF index's lists)."""
    index = idx.load()
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map)
    lists = faiss.extract_index_ivf(index).invlists
    return np.concatenate([faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                           for i in range(lists.nlist) if lists.list_size(i)])


@pytest.fixture
def fast_ivfpq(monkeypatch):
    """IVF-PQ training within seconds on a shared 2-core machine: one FAISS thread (OpenMP spins
    against the other processes), and no polysemous training (see test_ivfpq_skips_polysemous_training:
    the factory string turns it on, it costs minutes and search never uses it)."""
    def new_index(spec):
        index = types.new_index(spec)
        if hasattr(index, "do_polysemous_training"):
            index.do_polysemous_training = False
        return index

    monkeypatch.setattr(catalog_index_mod, "new_index", new_index)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_embedder():
    return make_tiny_embedder()


@pytest.fixture
def catalog(tmp_path) -> Path:
    """A 24-item synthetic catalog folder: styles.csv + images/<id>.jpg."""
    make_catalog(tmp_path / "catalog", 24)
    return tmp_path / "catalog"


@pytest.fixture
def index_cfg():
    from fashionlens.index.config import IndexConfig

    return IndexConfig(batch_size=8, workers=0, chunk_size=10)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "catalog" / "styles.csv").is_file():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny models, where threads only add overhead)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli_inprocess(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run ``fashionlens ARGS...`` in this process: (exit code, stdout, stderr); a traceback
    on stderr fails the test (bad input must give a clear message)."""
    import sys

    from fashionlens.cli import main

    monkeypatch.setattr(sys, "argv", ["fashionlens", *map(str, args)])
    try:
        main()
        rc = 0
    except SystemExit as exc:
        rc = exc.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return rc, captured.out, captured.err
