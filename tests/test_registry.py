"""Registries (fashionlens.registry) and plugins (fashionlens.plugins): a neck, a loss term, an
index type or a runtime of one's own is one file that registers itself; `fashionlens train`
trains a toy neck with a toy loss term from a plugin file, and the checkpoint it writes names
the plugin it needs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import brute_force, make_tiny_embedder, synthetic_index, unit
from fashionlens.errors import UserError
from fashionlens.index.types import INDEX_TYPES, IndexSettings, IndexSpec, IndexType, choose_spec
from fashionlens.losses import LOSS_TERMS, LossTerm, build_terms, check_losses
from fashionlens.models.necks import NECKS, build_neck
from fashionlens.models.runtimes import RUNTIMES, Runtime
from fashionlens.registry import Registry

TOY_PLUGIN = '''
"""A neck and a loss term of one's own, in one file."""
import torch
import torch.nn.functional as F

from fashionlens.losses.terms import LOSS_TERMS, LossTerm
from fashionlens.models.necks.base import Neck, check_map, register


@register("toy_max")
class ToyMaxNeck(Neck):
    """Global max pooling and a projection."""

    def __init__(self, in_channels: int, dim: int = 8):
        super().__init__()
        self.in_channels, self.out_dim = in_channels, dim
        self.proj = torch.nn.Linear(in_channels, dim)

    def forward(self, t):
        check_map(t, self.in_channels)
        return {"embedding": F.normalize(self.proj(t.amax(dim=(2, 3))), dim=1)}


@LOSS_TERMS.register("toy_spread")
class ToySpread(LossTerm):
    """Pushes the batch's embeddings apart: the mean cosine similarity, scaled."""

    stat_names = ("toy_calls",)

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale, self.calls = scale, 0

    def forward(self, outputs, targets):
        self.calls += 1
        e = outputs["embedding"].float()
        return self.scale * (e @ e.T).mean()

    def stats(self):
        return {"toy_calls": float(self.calls)}
'''


def test_registry_names_aliases_and_typed_settings():
    reg: Registry = Registry("widget")

    @reg.register("round", aliases=("circle",))
    class Round:
        def __init__(self, radius: float, sides: int = 0, label: str | None = None):
            self.radius = radius

    assert reg.names() == ["round"] and "circle" in reg and reg.canonical("circle") == "round"
    assert reg.get("circle") is Round
    # settings checked against the constructor: types converted, unknown and missing ones refused
    assert reg.arguments("round", {"radius": "2.5", "sides": 3}) == {"radius": 2.5, "sides": 3}
    with pytest.raises(UserError, match="radiu.*its settings: radius, sides, label"):
        reg.arguments("round", {"radiu": 1.0})
    with pytest.raises(UserError, match="radius"):
        reg.arguments("round", {})
    with pytest.raises(UserError, match="sides.*integer"):
        reg.arguments("round", {"radius": 1, "sides": 1.5})
    with pytest.raises(UserError, match="unknown widget 'square'; known: round"):
        reg.get("square")
    assert reg.describe() == "round(radius, sides=0, label=None) (also circle)"
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("circle")(type("Other", (), {}))
    reg.unregister("round")
    assert reg.names() == [] and "circle" not in reg


def test_builtin_entries_register_themselves():
    assert {"gap", "local_alignment", "stripes", "rings", "multi"} <= set(NECKS.names())
    assert NECKS.canonical("lan") == "local_alignment"  # the old name, as checkpoints may hold it
    assert {"triplet", "identity"} <= set(LOSS_TERMS.names())
    assert {"flat", "ivfflat", "ivfpq", "hnsw"} <= set(INDEX_TYPES.names())
    assert {"none", "jit"} <= set(RUNTIMES.names()) and RUNTIMES.canonical("torchscript") == "jit"


def test_loss_settings_are_checked_and_weight_zero_terms_are_left_out():
    assert check_losses({"triplet": {"margin": 0.3}}) == {"triplet": {"weight": 1.0, "margin": 0.3, "reducer": "all"}}
    terms = build_terms({"triplet": {"weight": 1.0}, "identity": {"weight": 0.0}})
    assert list(terms) == ["triplet"]
    for bad, message in (({"triplet": {"weight": -1}}, "weight"), ({"tripplet": {}}, "unknown loss term"),
                         ({"triplet": {"reducer": "max"}}, "reducer"), ({"identity": {"weight": 0}}, "nothing"),
                         ({"triplet": {"margin": -1}}, "greater than or equal to 0"),
                         ({"triplet": {"weight": "heavy"}}, "weight must be a number")):
        with pytest.raises(ValueError, match=message):
            check_losses(bad)


def test_a_term_named_like_a_column_or_with_parameters_is_refused():
    @LOSS_TERMS.register("seconds")
    class Clock(LossTerm):
        pass

    @LOSS_TERMS.register("toy_learned")
    class Learned(LossTerm):
        def __init__(self):
            super().__init__()
            self.centre = torch.nn.Parameter(torch.zeros(4))

    try:
        with pytest.raises(ValueError, match="metrics column"):
            check_losses({"seconds": {}})
        with pytest.raises(UserError, match="trainable parameters"):
            build_terms({"toy_learned": {}})
    finally:
        LOSS_TERMS.unregister("seconds")
        LOSS_TERMS.unregister("toy_learned")


def test_a_plugin_entry_meets_the_built_in_ones_whatever_loads_first():
    """Registering a name a built-in module holds fails on the spot, also in a fresh process where
    the built-in modules were not imported yet, not later as a half-loaded registry."""
    code = ("from fashionlens.index.types.base import INDEX_TYPES, IndexType\n"
            "try:\n    INDEX_TYPES.register('flat')(type('MyFlat', (IndexType,), {}))\n"
            "except ValueError as exc:\n    print('refused:', exc)\n"
            "print(sorted(INDEX_TYPES.names()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: index type 'flat' is registered twice" in proc.stdout
    assert "['flat', 'hnsw', 'ivfflat', 'ivfpq']" in proc.stdout


@pytest.fixture
def toy_entries():
    """An index type and a runtime of the test's own, registered for the test."""
    @INDEX_TYPES.register("toy_exact")
    class ToyExact(IndexType):
        """Exact search under another name: the structure a new type would give."""

        def spec(self, n: int, dim: int, settings: IndexSettings) -> IndexSpec:
            return IndexSpec("toy_exact", dim, "IDMap2,Flat")

    calls = []

    @RUNTIMES.register("toy_counting")
    class Counting(Runtime):
        def prepare(self, model, probe):
            def run(x):
                calls.append(len(x))
                return model(x)
            return run

    yield calls
    INDEX_TYPES.unregister("toy_exact")
    RUNTIMES.unregister("toy_counting")


def test_an_index_type_of_ones_own_indexes_and_searches(tmp_path, toy_entries):
    assert choose_spec(10, 4, "toy_exact").factory == "IDMap2,Flat"
    rng = np.random.default_rng(0)
    data, queries = unit(rng, 300, 16), unit(rng, 5, 16)
    with closing(synthetic_index(tmp_path / "toy", data, index_type="toy_exact")) as idx:
        assert idx.spec.kind == "toy_exact"
        truth, scores = brute_force(idx, queries, 10)
        hits = idx.search(queries, 10)
        assert [[h.id for h in row] for row in hits] == truth
        np.testing.assert_allclose([[h.score for h in row] for row in hits], scores, rtol=1e-5)
    from fashionlens.index.config import IndexConfig

    assert IndexConfig(index_type="toy_exact").index_type == "toy_exact"
    with pytest.raises(UserError, match="index type"):
        IndexConfig.load(None, index_type="no_such_type")


def test_a_runtime_of_ones_own_embeds_what_eager_does(toy_entries):
    eager = make_tiny_embedder()
    images = [Image.fromarray(np.full((40, 30, 3), v, np.uint8)) for v in (10, 120, 240)]
    want = eager.embed_images(images)
    fast = make_tiny_embedder()
    assert fast.optimize("toy_counting") == "toy_counting"
    np.testing.assert_allclose(fast.embed_images(images), want, atol=1e-6)
    assert toy_entries and toy_entries[-1] == 3  # the runtime ran the batch


def _catalog(root: Path) -> Path:
    rows, rng = [], np.random.default_rng(0)
    for i in range(6):
        colour = np.array([(40 * i) % 256, (90 + 70 * i) % 256, (200 - 30 * i) % 256])
        for j in range(3):
            path = root / "images" / f"{i}_{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(colour + rng.integers(-15, 15, (48, 48, 3)), 0, 255).astype(np.uint8)).save(path)
            rows.append({"id": f"{i}_{j}", "path": f"images/{i}_{j}.png", "articleType": f"type{i}"})
    with open(root / "styles.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "styles.csv"


def _fashionlens(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command in a child process, with no plugins but those of ``env``."""
    full = {**os.environ, "OMP_NUM_THREADS": "1"}
    full.pop("FASHIONLENS_PLUGINS", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "fashionlens", *map(str, args)], capture_output=True, text=True,
                          env=full, timeout=300)


@pytest.mark.slow
def test_fashionlens_train_trains_a_neck_and_a_loss_term_from_one_plugin_file(tmp_path):
    plugin = tmp_path / "toy_plugin.py"
    plugin.write_text(textwrap.dedent(TOY_PLUGIN))
    catalog = _catalog(tmp_path / "catalog")
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "plugins": [str(plugin)],
        "model": {"backbone": "lite0", "pretrained": False, "input_size": 48, "neck": {"type": "toy_max", "dim": 8}},
        "catalog": str(catalog), "identity_columns": ["articleType"], "val_fraction": 0.0,
        "identities_per_batch": 3, "images_per_identity": 2, "epochs": 1, "batches_per_epoch": 2,
        "losses": {"triplet": {"weight": 1.0}, "toy_spread": {"weight": 0.5, "scale": 2.0}},
        "augment": {"erase": 0.0, "rotate": 0.0}, "out": str(tmp_path / "run")}))
    proc = _fashionlens("train", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1"] and rows[0]["step"] == "2"
    assert np.isfinite(float(rows[0]["toy_spread"])) and float(rows[0]["toy_spread"]) != 0
    assert float(rows[0]["toy_calls"]) == 1.5  # the term's own number, averaged over the epoch's 2 batches
    doc = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert doc["model"]["neck"] == {"type": "toy_max", "dim": 8} and doc["extra"]["plugins"] == [str(plugin)]

    # the checkpoint needs the plugin where it is used: a clear message without it, an index with it
    proc = _fashionlens("index", catalog, "--out", tmp_path / "index", "--model", tmp_path / "run" / "last")
    assert proc.returncode == 2 and "toy_max" in proc.stderr and "FASHIONLENS_PLUGINS" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _fashionlens("index", catalog, "--out", tmp_path / "index", "--model", tmp_path / "run" / "last",
                        env={"FASHIONLENS_PLUGINS": str(plugin)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _fashionlens("search", tmp_path / "index", catalog.parent / "images" / "2_1.png", "-k", "3", "--json",
                        env={"FASHIONLENS_PLUGINS": str(plugin)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)[0]["results"][0]["id"] == "2_1"  # the photo itself comes first


def test_a_plugin_that_cannot_load_is_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('my bug')\n")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"plugins": [str(broken)], "catalog": "x"}))
    proc = _fashionlens("train", config)
    assert proc.returncode == 2 and proc.stderr.startswith("error: plugin") and "my bug" in proc.stderr
    config.write_text(yaml.safe_dump({"plugins": [str(tmp_path / "absent.py")], "catalog": "x"}))
    proc = _fashionlens("train", config)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_a_neck_of_ones_own_needs_no_other_edit():
    """The toy neck registers itself; the builder, the attention figure and training need nothing else."""
    namespace: dict = {}
    exec(compile(textwrap.dedent(TOY_PLUGIN), "toy_plugin_inline", "exec"), namespace)
    try:
        neck = build_neck({"type": "toy_max", "dim": 4}, in_channels=6)
        out = neck(torch.randn(2, 6, 3, 3))
        assert out["embedding"].shape == (2, 4) and neck.attention_outputs() == [] and neck.describe() == "toy_max"
        from fashionlens.models.builder import ModelConfig, build_model

        model, _ = build_model(ModelConfig(backbone="lite0", pretrained=False, input_size=32,
                                           neck={"type": "toy_max", "dim": 4}, num_identities=3))
        assert model(torch.randn(2, 3, 32, 32))["id_logits"].shape == (2, 3)
    finally:
        NECKS.unregister("toy_max")
        LOSS_TERMS.unregister("toy_spread")
