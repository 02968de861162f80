"""The ``fashionlens`` command, run as a user runs it: exit codes, one-line errors, JSON output.

Every command that loads the model spends ~15-20 s in TorchScript freezing on this 2-core
machine, so the module starts all its subprocesses at once (fixture ``runs``) and each test
then waits for, and checks, its own.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import SHARED, make_catalog, make_image

EXE = Path(sys.executable).parent / "fashionlens"
CMD = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "fashionlens"]
METADATA = ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year", "usage")
QUERY_LABELS = ("t-shirt", "shoes")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FASHIONLENS_DATA", "COLUMNS", "LINES")}
    env["OMP_NUM_THREADS"] = "1"  # several of these run side by side on 2 cores
    return env


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def error(self) -> str:
        """The error message, checked: exit 2, no traceback; whitespace removed (see one-line test)."""
        assert self.rc == 2, (self.rc, self.err)
        assert "Traceback" not in self.err, self.err
        return "".join(self.err.split())


class Run:
    def __init__(self, *args, cwd=None):
        self.proc = subprocess.Popen([*CMD, *map(str, args)], cwd=cwd, env=_env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._result = None

    def result(self) -> Result:
        if self._result is None:
            out, err = self.proc.communicate(timeout=400)
            self._result = Result(self.proc.returncode, out, err)
        return self._result


def squash(text: str) -> str:
    return "".join(str(text).split())


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite_index(tmp_path_factory):
    """A 12-item synthetic catalog indexed with the real default model at 64 px (fast, offline)."""
    from fashionlens.index.config import IndexConfig
    from fashionlens.index.pipeline import build_index
    from fashionlens.models.embedder import build_embedder

    root = tmp_path_factory.mktemp("lite")
    make_catalog(root / "catalog", 12, size=48)
    cfg = IndexConfig(input_size=64, workers=0)
    build_index(root / "catalog", root / "index", cfg, embedder=build_embedder("lite0", 64, optimize="none"))
    return root


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory, tiny_embedder):
    from fashionlens.index.config import IndexConfig
    from fashionlens.index.pipeline import build_index

    root = tmp_path_factory.mktemp("tiny")
    make_catalog(root / "catalog", 6)
    build_index(root / "catalog", root / "index", IndexConfig(workers=0), embedder=tiny_embedder)
    return root / "index"


def _shared_index(root: Path) -> tuple[Path, list[str]]:
    """12 rows of the shared catalog (4 T-shirts, 4 shoes, 4 others), indexed in place by path."""
    from fashionlens.index.config import IndexConfig
    from fashionlens.index.pipeline import build_index
    from fashionlens.models.embedder import build_embedder

    groups = {"tshirt": ["Tshirts"], "shoes": ["Casual Shoes", "Sports Shoes"], "other": ["Jeans", "Dresses"]}
    picked: dict[str, list[dict]] = {g: [] for g in groups}
    with open(SHARED / "catalog" / "styles.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            for group, types in groups.items():
                image = SHARED / "catalog" / "images" / f"{row['id']}.jpg"
                if row["articleType"] in types and len(picked[group]) < 4 and image.is_file():
                    picked[group].append({**row, "path": str(image)})
            if all(len(v) == 4 for v in picked.values()):
                break
    rows = [r for g in picked.values() for r in g]
    with open(root / "catalog.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["id", "path", *METADATA])
        writer.writeheader()
        writer.writerows(rows)
    # optimize="none": the eager model gives the vectors TorchScript gives (checked to 1e-3)
    build_index(root / "catalog.csv", root / "index", IndexConfig(workers=0),
                embedder=build_embedder(optimize="none"))
    return root / "index", [r["id"] for r in rows]


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, lite_index, tiny_index):
    """Start every subprocess of this module, side by side; tests read their own results."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "empty").mkdir()
    (tmp / "cwd").mkdir()
    photo = lite_index / "catalog" / "images" / "item-0003.jpg"
    data = photo.read_bytes()
    (tmp / "broken.jpg").write_bytes(data[: len(data) // 2])
    started = {
        "help": Run("--help"),
        "index_help": Run("index", "--help"),
        "not_an_index": Run("search", tmp / "empty", photo),
        "missing_photo": Run("search", lite_index / "index", tmp / "no-such-photo.jpg"),
        "broken_photo": Run("search", lite_index / "index", tmp / "broken.jpg"),
        "no_catalog": Run("index", tmp / "no-such-catalog", "--out", tmp / "out-none"),
        "bad_index_type": Run("index", lite_index / "catalog", "--out", tmp / "out-bad", "--index-type", "annoy"),
        "remove_unknown": Run("remove", tiny_index, "no-such-id"),
        "demo_no_data": Run("demo", "--no-download", cwd=tmp / "cwd"),
        "demo_empty_photos": Run("demo", "--photos", tmp / "empty", "--no-download", cwd=tmp / "cwd"),
    }
    wants_slow = any(item.get_closest_marker("slow") and item.module is request.module
                     for item in request.session.items)
    if wants_slow and (SHARED / "catalog" / "styles.csv").is_file():
        index, ids = _shared_index(tmp)
        queries = tmp / "queries"
        for label in QUERY_LABELS:
            (queries / label).mkdir(parents=True)
            for src in sorted((SHARED / "consumer" / "test" / label).iterdir())[:2]:
                (queries / label / src.name).symlink_to(src)
        own = SHARED / "catalog" / "images" / f"{ids[0]}.jpg"
        consumer = next((queries / "t-shirt").iterdir())
        started["shared_search"] = Run("search", index, own, consumer, "--json", "-k", "3")
        started["evaluate"] = Run("evaluate", "consumer", queries, "--index", index, "--mapping",
                                  SHARED / "consumer" / "catalog_types.csv", "--out", tmp / "eval")
        started["shared_ids"] = ids
    else:  # the happy path without the shared data (with it, the shared search covers it)
        started["happy"] = Run("search", lite_index / "index", photo,
                               lite_index / "catalog" / "images" / "item-0007.jpg", "--json", "-k", "3")
    started["tmp"] = tmp
    yield started
    for run in started.values():
        if isinstance(run, Run) and run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


# --- help --------------------------------------------------------------------------------------


def test_help_lists_the_commands(runs):
    res = runs["help"].result()
    assert res.rc == 0, res.err
    for command in ("index", "search", "evaluate", "demo", "remove"):
        assert command in res.out


def test_index_help_shows_the_settings(runs):
    res = runs["index_help"].result()
    assert res.rc == 0, res.err
    for setting in ("flat_max", "chunk_size", "index_type", "train_sample"):
        assert setting in squash(res.out)


# --- errors: exit 2, a message, no traceback ---------------------------------------------------


def test_search_a_folder_that_is_not_an_index(runs):
    assert "notafashionlensindex" in runs["not_an_index"].result().error()


def test_search_a_missing_photo(runs):
    assert "no-such-photo.jpg:nosuchfile" in runs["missing_photo"].result().error()


def test_search_a_broken_photo(runs):
    assert "broken.jpg:brokenimage" in runs["broken_photo"].result().error()


def test_index_a_missing_catalog(runs):
    assert squash(runs["tmp"] / "no-such-catalog") + ":nosuchfileorfolder" in runs["no_catalog"].result().error()


def test_bad_index_type(runs):
    assert "index_type" in runs["bad_index_type"].result().error()
    assert not (runs["tmp"] / "out-bad").exists()


def test_remove_an_unknown_id(runs, tiny_index):
    assert "notinthecatalog:no-such-id" in runs["remove_unknown"].result().error()
    from fashionlens.index import LocalStore

    with closing(LocalStore(tiny_index)) as idx:
        assert idx.store.count("embedded") == 6


def test_demo_without_data_and_without_download(runs):
    assert "nodata" in runs["demo_no_data"].result().error()
    assert not any((runs["tmp"] / "cwd").iterdir())


def test_demo_with_an_empty_photo_folder(runs):
    assert "noimagesfound" in runs["demo_empty_photos"].result().error()
    assert not any((runs["tmp"] / "cwd").iterdir())


@pytest.mark.parametrize("name", ["not_an_index", "missing_photo", "broken_photo", "no_catalog",
                                  "bad_index_type", "demo_no_data", "demo_empty_photos"])
def test_errors_are_one_line(runs, name):
    """UserError's promise: one line on stderr, whatever the terminal width (here: not a tty)."""
    lines = runs[name].result().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines


def test_search_refuses_an_index_made_by_another_model(tiny_index, tmp_path):
    """The tiny index records the default config (model lite0) but holds 8-d vectors of another
    model: searching it must be a clear UserError, not FAISS's dimension assertion."""
    from fashionlens.errors import UserError
    from fashionlens.index.query import Searcher

    photo = make_image(tmp_path / "q.jpg", 3)
    with pytest.raises(UserError):
        searcher = Searcher(tiny_index, optimize="none")
        try:
            searcher.search_paths([photo], 3)
        finally:
            searcher.close()


# --- happy paths -------------------------------------------------------------------------------


def _check_json(res: Result, ids: list[str], columns) -> list:
    assert res.rc == 0, res.err
    payload = json.loads(res.out)
    assert isinstance(payload, list) and len(payload) == 2
    for entry in payload:
        assert [r["rank"] for r in entry["results"]] == [1, 2, 3]
        for r in entry["results"]:
            assert r["id"] in ids and isinstance(r["score"], float) and Path(r["path"]).is_file()
            assert set(columns) <= set(r)
        scores = [r["score"] for r in entry["results"]]
        assert scores == sorted(scores, reverse=True)
    return payload


def test_search_json(runs):
    if "happy" not in runs:
        pytest.skip("covered by test_search_shared_catalog_json (one model load less)")
    payload = _check_json(runs["happy"].result(), [f"item-{i:04d}" for i in range(12)], ("articleType", "baseColour"))
    for entry, own in zip(payload, ("item-0003", "item-0007")):
        top = entry["results"][0]
        assert top["id"] == own and top["score"] == pytest.approx(1.0, abs=2e-3)
        assert top["baseColour"] == f"colour{int(own[-2:]):02d}"


@pytest.mark.slow
def test_search_shared_catalog_json(runs):
    if "shared_search" not in runs:
        pytest.skip("shared data not found")
    ids = runs["shared_ids"]
    payload = _check_json(runs["shared_search"].result(), ids, METADATA)
    own = payload[0]["results"][0]
    assert own["id"] == ids[0] and own["score"] == pytest.approx(1.0, abs=2e-3)
    assert payload[1]["results"][0]["score"] < 0.99  # a buyer's photo is not a catalog image


@pytest.mark.slow
def test_evaluate_consumer_writes_the_report(runs):
    if "evaluate" not in runs:
        pytest.skip("shared data not found")
    res = runs["evaluate"].result()
    assert res.rc == 0, res.err
    out = runs["tmp"] / "eval"
    for name in ("metrics.json", "hit_rate.png", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["overall"]["hit_rate"]) == {"1", "4", "10", "20"}
    assert metrics["overall"]["n_queries"] == 4 and set(metrics["per_category"]) == set(QUERY_LABELS)
    assert all(0.0 <= v <= 1.0 for v in metrics["overall"]["hit_rate"].values())
    assert metrics["index"]["items"] == 12
    # the printed table: the macro over the garment types beside the overall figure, and the worst type
    macro = metrics["macro"]["hit_rate"]["1"]
    assert f"macro ({len(QUERY_LABELS)} categories)" in res.out and f"{macro:.3f}" in res.out
    top4 = {c: g["hit_rate"]["4"] for c, g in metrics["per_category"].items()}
    worst = min(top4, key=lambda c: (top4[c], c))
    assert f"worst category at top-4: {worst} {top4[worst]:.3f}" in res.out
    assert (out / "hit_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
