"""Training loop (thesis A): a tiny lite0 run on a synthetic catalog, resume, overrides, DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fashionlens.errors import UserError
from fashionlens.models.checkpoints import load_checkpoint
from fashionlens.training import TrainConfig, apply_overrides, load_train_config, train
from fashionlens.training.identities import make_split

N_IDS, PER_ID = 8, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    """8 identities (articleType|baseColour|gender) x 4 images of one colour each, 64 px."""
    root = tmp_path_factory.mktemp("catalog")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IDS):
        colour = np.array([(50 + 97 * i) % 256, (20 + 59 * i) % 256, (150 + 173 * i) % 256])
        for j in range(PER_ID):
            arr = np.clip(colour + rng.integers(-20, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
            path = root / "images" / f"{i}_{j}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(arr).save(path)
            rows.append({"id": f"{i}_{j}", "path": f"images/{i}_{j}.png", "articleType": f"type{i % 4}",
                         "baseColour": f"colour{i}", "gender": "Men" if i % 2 else "Women"})
    rows.append({"id": "lonely", "path": "images/0_0.png", "articleType": "single", "baseColour": "x", "gender": "Men"})
    with open(root / "styles.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "styles.csv"


def tiny_config(catalog: Path, out: Path, **kw) -> TrainConfig:
    data = {"model": {"backbone": "lite0", "pretrained": False, "input_size": 64,
                      "neck": {"type": "lan", "branches": 2, "dim": 16}},
            "catalog": str(catalog), "val_fraction": 0.25, "p": 3, "k": 2, "epochs": 2,
            "batches_per_epoch": 3, "lr": 1e-3, "out": str(out), "seed": 0,
            "augment": {"erase": 0.0, "rotate": 0.0}}
    data.update(kw)
    return TrainConfig(**data)


def read_metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_split_by_identity(catalog):
    split = make_split(catalog, ["articleType", "baseColour", "gender"], 2, 0.25, seed=0)
    assert len(split.train_identities) == 6 and len(split.val_identities) == 2
    assert not set(split.train_identities) & set(split.val_identities)
    assert len(split.train) == 24 and len(split.val) == 8
    assert split.dropped["small_identities"] == 1  # "single|x|Men" has one image
    again = make_split(catalog, ["articleType", "baseColour", "gender"], 2, 0.25, seed=0)
    assert again.val_identities == split.val_identities


def test_train_writes_run_folder_and_resumes(catalog, tmp_path):
    out = tmp_path / "run"
    events = []
    row = train(tiny_config(catalog, out), progress=events.append)
    assert np.isfinite(row["loss"]) and row["loss"] > 0
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert int(rows[-1]["step"]) == 6
    assert 0 <= float(rows[-1]["val_top1"]) <= float(rows[-1]["val_top4"]) <= 1
    assert float(rows[0]["valid_triplets"]) == 3 * 2 * 1 * 4  # P*K anchors, 1 positive, 4 negatives
    assert (out / "curves.png").stat().st_size > 1000
    assert yaml.safe_load((out / "config.yaml").read_text())["identities_per_batch"] == 3  # p, by its name now
    for name in ("last", "best"):
        model, model_cfg, extra = load_checkpoint(out / name)
        assert model_cfg.neck["dim"] == 16 and extra["epoch"] in (1, 2)
        assert model(torch.zeros(1, 3, 64, 64))["embedding"].shape == (1, 32)
    assert (out / "last" / "optimizer.safetensors").is_file()
    assert {e["event"] for e in events} == {"start", "step", "epoch"}

    # resume: only epoch 3 is trained; an orphan row of a later epoch is dropped first
    with open(out / "metrics.csv", "a") as fh:
        fh.write("7,99,1,1,0,1,1,,,1,1\n")
    events.clear()
    train(tiny_config(catalog, out, epochs=3), progress=events.append)
    assert [int(r["epoch"]) for r in read_metrics(out)] == [1, 2, 3]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [3]
    assert load_checkpoint(out / "last")[2]["step"] == 9

    # an uninterrupted 3-epoch run gives the same epoch 3 (same seeds, same batches)
    straight = tmp_path / "straight"
    train(tiny_config(catalog, straight, epochs=3))
    a, b = read_metrics(out)[2], read_metrics(straight)[2]
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4, abs=1e-6)


def _as_before_the_renames(run: Path) -> None:
    """Make a run folder look as the versions before the renames wrote it: the old setting names
    in config.yaml and the neck type 'lan' in the checkpoints' config.json."""
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["p"], saved["k"] = saved.pop("identities_per_batch"), saved.pop("images_per_identity")
    losses = saved.pop("losses")
    saved.update({"triplet": losses["triplet"]["weight"], "identity": losses.get("identity", {}).get("weight", 0.0),
                  "margin": losses["triplet"].get("margin", 0.2), "reducer": losses["triplet"].get("reducer", "all")})
    saved["model"]["neck"]["type"] = "lan"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    for folder in (run / "last", run / "best"):
        doc = json.loads((folder / "config.json").read_text())
        doc["model"]["neck"]["type"] = "lan"
        (folder / "config.json").write_text(json.dumps(doc))


def test_a_run_folder_from_before_the_renames_resumes(catalog, tmp_path):
    """Existing run folders keep working: the old names of a config and of a checkpoint's neck
    are read as the new ones, so the run continues where it stopped, as an uninterrupted one."""
    out = tmp_path / "old"
    train(tiny_config(catalog, out, epochs=1))
    _as_before_the_renames(out)
    old_settings = yaml.safe_load((out / "config.yaml").read_text())
    assert load_checkpoint(out / "last")[1].neck["type"] == "local_alignment"  # read under its name now
    train(TrainConfig(**{**old_settings, "epochs": 2}))
    straight = tmp_path / "straight"
    train(tiny_config(catalog, straight, epochs=2))
    a, b = read_metrics(out), read_metrics(straight)
    assert [r["epoch"] for r in a] == ["1", "2"] and a[1]["loss"] == b[1]["loss"]


def test_ema_validates_and_keeps_the_moving_average_and_resumes(catalog, tmp_path, monkeypatch):
    """ema: best/ holds the exponential moving average of the weights after each step (checked
    against the recurrence on recorded weights), last/ the raw weights, and a resumed run's
    average equals an uninterrupted one's."""
    from torch.optim.swa_utils import AveragedModel

    seen: list[dict] = []
    update = AveragedModel.update_parameters

    def recording(self, model):
        seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return update(self, model)

    monkeypatch.setattr(AveragedModel, "update_parameters", recording)
    out = tmp_path / "run"
    train(tiny_config(catalog, out, epochs=1, ema=0.6))
    assert len(seen) == 3  # once per optimizer step
    expected = dict(seen[0])
    for weights in seen[1:]:
        expected = {k: 0.6 * expected[k] + 0.4 * weights[k] for k in expected}
    raw, _, _ = load_checkpoint(out / "last")
    avg, _, _ = load_checkpoint(out / "best")
    raw_p, avg_p = dict(raw.named_parameters()), dict(avg.named_parameters())
    trained = [k for k in expected if not torch.equal(seen[0][k], seen[-1][k])]
    assert trained  # the test means something: some weights moved
    for k in trained:
        torch.testing.assert_close(avg_p[k], expected[k])
        torch.testing.assert_close(raw_p[k], seen[-1][k])
    assert any(not torch.allclose(avg_p[k], raw_p[k]) for k in trained)

    monkeypatch.setattr(AveragedModel, "update_parameters", update)
    train(tiny_config(catalog, out, epochs=2, ema=0.6))  # resumed: epoch 2 only
    straight = tmp_path / "straight"
    train(tiny_config(catalog, straight, epochs=2, ema=0.6))
    a = dict(load_checkpoint(out / "last")[0].named_parameters())
    b = dict(load_checkpoint(straight / "last")[0].named_parameters())
    from safetensors.torch import load_file
    ea, eb = load_file(str(out / "last" / "ema.safetensors")), load_file(str(straight / "last" / "ema.safetensors"))
    assert ea.keys() == eb.keys() and int(ea["n_averaged"]) == 6
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-4, atol=1e-6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    plain = tmp_path / "plain"
    train(tiny_config(catalog, plain, epochs=1))
    for run, other in ((plain, 0.6), (out, None), (out, 0.9)):  # a resume never mixes kinds of weights
        with pytest.raises(UserError, match="trained with ema="):
            train(tiny_config(catalog, run, epochs=3, ema=other))


def test_identity_loss_and_sgd(catalog, tmp_path):
    cfg = tiny_config(catalog, tmp_path / "id", epochs=1, batches_per_epoch=2, identity=1.0,
                      optimizer="sgd", reducer="nonzero", augment=None)
    row = train(cfg)
    assert np.isfinite(row["identity"]) and row["identity"] > 0
    _, model_cfg, _ = load_checkpoint(tmp_path / "id" / "last")
    assert model_cfg.num_identities == 6


def test_resume_refuses_other_model(catalog, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(catalog, out, epochs=1, batches_per_epoch=1))
    other = tiny_config(catalog, out, epochs=2, batches_per_epoch=1)
    other.model.neck = {"type": "lan", "branches": 2, "dim": 8}
    with pytest.raises(UserError, match="different model"):
        train(other)


def test_apply_overrides_and_load(tmp_path, catalog):
    base = {"model": {"neck": {"type": "lan", "dim": 256}}, "p": 7}
    got = apply_overrides(base, ["model.neck.dim=128", "p=3", "augment.hflip=0.0", "batches_per_epoch=null",
                                 "identity_columns=[a, b]"])
    assert got["model"]["neck"] == {"type": "lan", "dim": 128} and got["p"] == 3
    assert got["augment"] == {"hflip": 0.0} and got["batches_per_epoch"] is None
    assert got["identity_columns"] == ["a", "b"] and base["model"]["neck"]["dim"] == 256
    with pytest.raises(UserError):
        apply_overrides(base, ["p"])
    with pytest.raises(UserError):
        apply_overrides(base, ["p.x=1"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"catalog": str(catalog), "model": {"backbone": "lite0"}}))
    cfg = load_train_config(path, ["model.neck.dim=64", "epochs=5"], out=str(tmp_path / "o"))
    assert cfg.model.neck["dim"] == 64 and cfg.epochs == 5 and cfg.out == str(tmp_path / "o")
    with pytest.raises(UserError, match="epochs"):
        load_train_config(path, ["epochs=0"])
    assert "identity_columns" in TrainConfig.help_text()


@pytest.mark.slow
def test_two_process_ddp_on_cpu(catalog, tmp_path):
    out = tmp_path / "ddp"
    cfg = tiny_config(catalog, out, epochs=1, batches_per_epoch=2)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fashionlens", "train", str(path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1]
    assert int(rows[0]["step"]) == 2  # per-process steps
    assert load_checkpoint(out / "last")[2]["epoch"] == 1


def test_unreadable_image_is_replaced_by_same_identity(catalog, tmp_path):
    from fashionlens.data.transforms import Preprocess
    from fashionlens.training.identities import IdentityDataset

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good = catalog.parent / "images" / "0_1.png"
    ds = IdentityDataset([(bad, 0), (good, 0), (bad, 1)], Preprocess(32, (0.5,) * 3, (0.5,) * 3))
    with pytest.warns(UserWarning, match="unreadable"):
        x, label = ds[0]
    assert x.shape == (3, 32, 32) and label == 0
    with pytest.raises(UserError, match="no image of identity 1"):
        ds[2]


def test_a_trained_checkpoint_indexes_and_searches_through_model(catalog, tmp_path, monkeypatch):
    """`fashionlens index/search/evaluate --model CKPT`: the checkpoint is an embedder."""
    from fashionlens.index.config import IndexConfig
    from fashionlens.index.pipeline import build_index
    from fashionlens.index.query import Searcher

    train(tiny_config(catalog, tmp_path / "run", epochs=1, batches_per_epoch=1))
    ckpt = str(tmp_path / "run" / "best")
    report = build_index(catalog, tmp_path / "idx", IndexConfig(model=ckpt, optimize="none"))
    assert report.total == N_IDS * PER_ID + 1  # "lonely" reuses an image but has its own id
    searcher = Searcher(tmp_path / "idx", optimize="none")
    try:
        assert searcher.embedder.dim == 2 * 16 and searcher.embedder.preprocess.size == 64
        hits = searcher.search_paths([catalog.parent / "images" / "3_1.png"], 1)[0]
        assert hits[0].id == "3_1" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    finally:
        searcher.close()
    # the run folder names its best checkpoint: the index records that checkpoint, not the folder
    from fashionlens.index.catalog_index import CatalogIndex

    build_index(catalog, tmp_path / "idx2", IndexConfig(model=str(tmp_path / "run"), optimize="none"))
    # a checkpoint named relative to one folder serves from any other
    monkeypatch.chdir(tmp_path)
    build_index(catalog, tmp_path / "idx4", IndexConfig(model="run", optimize="none"))
    monkeypatch.chdir(catalog.parent)
    searcher = Searcher(tmp_path / "idx4", optimize="none")
    try:
        assert searcher.search_paths([catalog.parent / "images" / "3_1.png"], 1)[0][0].id == "3_1"
    finally:
        searcher.close()
    with pytest.raises(UserError, match="neither a checkpoint"):  # a folder that names no model: no index made
        build_index(catalog, tmp_path / "idx3", IndexConfig(model=str(tmp_path), optimize="none"))
    assert not (tmp_path / "idx3").exists()
    index, first = CatalogIndex(tmp_path / "idx2"), CatalogIndex(tmp_path / "idx")
    try:
        assert index.store.get_meta("config")["model"] == ckpt
        assert index.store.get_meta("embedder") == first.store.get_meta("embedder")
    finally:
        index.close()
        first.close()
