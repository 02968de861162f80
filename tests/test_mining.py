"""Cross-domain mining (thesis A, 3.2.4): mined batches and their loss masking against a
brute-force triple loop, mining against exact search, the mined CSV, and `fashionlens adapt`
end to end (rounds, files, resume) on a tiny synthetic source and target."""

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
from conftest import run_cli_inprocess
from PIL import Image

from fashionlens.data.sampler import PKSampler
from fashionlens.errors import UserError
from fashionlens.losses import BatchAllTripletLoss, IdentityLoss
from fashionlens.losses.classification import identity_terms
from fashionlens.training import train
from fashionlens.training.adapt import adapt, load_adapt_config
from fashionlens.training.identities import MinedIdentities, with_mined
from fashionlens.training.mining import TargetPhotos, mine
from fashionlens.training.pseudo_labels import label_precision, read_mined_csv, to_identities, write_mined_csv

pytestmark = pytest.mark.usefixtures("one_thread")


# --- batches of source + mined identities -------------------------------------------------

def _mined_dataset():
    source = [(Path(f"s{i}_{j}.jpg"), i) for i in range(4) for j in range(3)]
    mined = MinedIdentities(
        positives=[[Path("t0.jpg"), Path("t1.jpg"), Path("t2.jpg")],
                   [Path("t3.jpg"), Path("t4.jpg")],
                   [Path("t5.jpg")],  # a lone query: no positive pair, left out
                   [Path("t6.jpg"), Path("t7.jpg"), Path("t0.jpg")]],
        negatives=[[Path("t8.jpg"), Path("t9.jpg"), Path("t3.jpg")],
                   [Path("t8.jpg"), Path("t10.jpg")],
                   [Path("t11.jpg")],
                   []])
    return source, mined


def test_with_mined_labels_and_negative_pool():
    source, mined = _mined_dataset()
    samples, extras = with_mined(source, 4, mined)
    assert samples[:len(source)] == source
    labels = [label for _, label in samples]
    assert labels.count(4) == 3 and labels.count(5) == 2 and labels.count(7) == 3
    assert 6 not in labels and 6 not in extras  # the lone query
    # each negative photo once, under -1, shared by the identities that list it
    pool = {p: i for i, (p, label) in enumerate(samples) if label == -1}
    assert sorted(p.name for p in pool) == ["t10.jpg", "t3.jpg", "t8.jpg", "t9.jpg"]
    assert extras == {4: [pool[Path("t8.jpg")], pool[Path("t9.jpg")], pool[Path("t3.jpg")]],
                      5: [pool[Path("t8.jpg")], pool[Path("t10.jpg")]]}


def test_sampler_never_draws_the_negative_pool_and_honours_weights():
    source, mined = _mined_dataset()
    samples, extras = with_mined(source, 4, mined)
    labels = [label for _, label in samples]
    sampler = PKSampler(labels, p=2, k=2, seed=1, batches_per_epoch=400, extra_negatives=extras)
    assert -1 not in sampler.identities and set(sampler.identities) == {0, 1, 2, 3, 4, 5, 7}
    for batch in sampler:
        assert all(labels[i] != -1 for i in batch[:4])  # regular positions: drawn identities only
        assert all(labels[i] == -1 for i in batch[4:])
    weights = {label: (0.75 / 3 if label >= 4 else 0.25 / 4) for label in range(8)}
    weighted = PKSampler(labels, p=2, k=2, seed=1, batches_per_epoch=2000, identity_weights=weights)
    drawn = [labels[b[0]] for b in weighted] + [labels[b[2]] for b in weighted]
    share = np.mean([d >= 4 for d in drawn])
    assert 0.70 < share < 0.80  # 0.75 asked (P distinct per batch bends it slightly)
    with pytest.raises(ValueError, match="identity_weights"):
        PKSampler(labels, p=2, k=2, identity_weights={0: 1.0})


def _brute_force_thesis(emb: torch.Tensor, ids: list[int], extra: list[bool], margin: float) -> torch.Tensor:
    """Thesis A's batch with mined negatives, as a triple loop: a and p are regular images of one
    identity; n is any image of another identity, or any extra (identity "M+N"), never anchor."""
    losses = []
    n = len(ids)
    for a in range(n):
        for p in range(n):
            if a == p or extra[a] or extra[p] or ids[a] != ids[p]:
                continue
            for q in range(n):
                if extra[q] or ids[q] != ids[a]:
                    d_ap = torch.linalg.vector_norm(emb[a] - emb[p])
                    d_an = torch.linalg.vector_norm(emb[a] - emb[q])
                    losses.append(torch.relu(d_ap - d_an + margin))
    return torch.stack(losses).mean()


def test_mined_batches_loss_matches_brute_force():
    source, mined = _mined_dataset()
    samples, extras = with_mined(source, 4, mined)
    labels = torch.tensor([label for _, label in samples])
    # photo t3 is a negative of identity 4 *and* a positive of identity 5: its flag follows the position
    photos = [str(p) for p, _ in samples]
    sampler = PKSampler(labels, p=3, k=2, seed=3, batches_per_epoch=30, extra_negatives=extras, photo_keys=photos)
    loss_fn = BatchAllTripletLoss(margin=0.3)
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for batch in sampler:
        if len(batch) == sampler.regular_size:
            continue
        emb = torch.nn.functional.normalize(torch.randn(len(samples), 5, generator=gen), dim=1)[batch]
        batch_labels, anchors = sampler.mark_extras(labels[batch])
        got = loss_fn(emb, batch_labels, anchor_mask=anchors)
        extra = [sampler.is_extra_position(i) for i in range(len(batch))]
        # an extra is never a photo already in the batch (it would be its own identity's negative)
        regular_photos = {photos[i] for i, e in zip(batch, extra) if not e}
        extra_photos = [photos[i] for i, e in zip(batch, extra) if e]
        assert not regular_photos & set(extra_photos) and len(set(extra_photos)) == len(extra_photos)
        want = _brute_force_thesis(emb, labels[batch].tolist(), extra, 0.3)
        torch.testing.assert_close(got, want)
        checked += 1
    assert checked > 5


def test_extras_that_are_batch_members_are_left_out():
    # identity 0's negative photo "x" is a member of identity 1: drawn together, "x" is not an extra
    labels = [0, 0, 1, 1, -1]
    photos = ["a", "b", "x", "c", "x"]
    sampler = PKSampler(labels, p=2, k=2, seed=0, batches_per_epoch=3, extra_negatives={0: [4]}, photo_keys=photos)
    assert all(len(batch) == 4 for batch in sampler)
    without = PKSampler(labels, p=2, k=2, seed=0, batches_per_epoch=3, extra_negatives={0: [4]})
    assert all(len(batch) == 5 for batch in without)


def testshare_weights_count_only_drawable_identities():
    from fashionlens.training.retrieval_task import share_weights

    labels = [0, 0, 1, 1, 2, 3, 3, 4, 4, 4, 5, -1, -1]  # source 0..2 (2 has one photo), mined 3..5 (5 has one)
    w = share_weights(labels, 3, 0.6)
    assert set(w) == {0, 1, 3, 4}
    assert w[3] + w[4] == pytest.approx(0.6) and w[0] + w[1] == pytest.approx(0.4)


def test_identity_terms_ignore_mined_labels():
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 3, 5, -1, 2, 9])
    got = identity_terms({"id_logits": logits}, labels, IdentityLoss(), num_classes=4)
    want = torch.nn.functional.cross_entropy(logits[[0, 1, 4]], labels[[0, 1, 4]])
    torch.testing.assert_close(got, want)
    stripes = [torch.randn(6, 4, requires_grad=True)]
    none = identity_terms({"id_logits": logits, "stripe_logits": stripes}, torch.tensor([4, 5, -1, 6, 7, 8]),
                          IdentityLoss(), num_classes=4)
    assert float(none.detach()) == 0.0 and none.requires_grad
    none.backward()  # every classifier gets a (zero) gradient, as DDP expects
    assert torch.equal(stripes[0].grad, torch.zeros(6, 4)) and torch.equal(logits.grad, torch.zeros(6, 4))


# --- mining ------------------------------------------------------------------------------

def _fake_target(n: int, dim: int = 8, seed: int = 0, unreadable: tuple[int, ...] = ()):
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    paths = [Path(f"/target/{i % 3}/p{i}.jpg") for i in range(n)]
    table = {p: i for i, p in enumerate(paths)}

    def embed(batch):
        out = torch.from_numpy(vecs[[table[p] for p in batch]].copy())
        for k, p in enumerate(batch):
            if table[p] in unreadable:
                out[k] = float("nan")
        return out

    return paths, vecs, embed


def test_mine_matches_exact_search(tmp_path):
    paths, vecs, embed = _fake_target(120, unreadable=(7, 50))
    found = mine(paths, embed, tmp_path / "work", queries=15, m=3, i=6, j=9, seed=4, chunk_size=32)
    assert not (tmp_path / "work").exists()  # scratch vectors are removed
    assert len(found.queries) == 15 and len(set(found.queries.tolist())) == 15
    assert not set(found.queries.tolist()) & {7, 50}
    gallery = np.array([r for r in range(120) if r not in set(found.queries.tolist()) | {7, 50}])
    for q, pos, neg, ranks, pos_s in zip(found.queries, found.positives, found.negatives, found.negative_ranks,
                                         found.positive_scores):
        scores = vecs[gallery] @ vecs[q]
        order = gallery[np.argsort(-scores, kind="stable")]
        assert pos.tolist() == order[:3].tolist()
        assert neg.tolist() == order[5:9].tolist() and ranks.tolist() == [6, 7, 8, 9]
        np.testing.assert_allclose(pos_s, np.sort(scores)[::-1][:3], rtol=1e-5)


def test_mine_refuses_too_small_targets_and_bad_ranks(tmp_path):
    paths, _, embed = _fake_target(20)
    with pytest.raises(UserError, match="too few"):
        mine(paths, embed, tmp_path / "w", queries=12, m=2, i=5, j=10)
    with pytest.raises(UserError, match="0 < m < i <= j"):
        mine(paths, embed, tmp_path / "w", queries=2, m=5, i=5, j=10)


@pytest.mark.parametrize("index_type, kind", [("auto", "ivfflat"), ("ivfpq", "ivfpq")])
def test_mine_with_ivf_index(tmp_path, index_type, kind):
    # a target above flat_max gets an IVF-Flat index (IVF-PQ above ivf_flat_max, or asked for):
    # approximate, but the true neighbour is near the top
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 16)).astype(np.float32)
    vecs = centres[np.arange(1200) % 40] + 0.05 * rng.normal(size=(1200, 16)).astype(np.float32)
    paths = [Path(f"/t/p{i}.jpg") for i in range(1200)]
    table = {p: i for i, p in enumerate(paths)}
    found = mine(paths, lambda b: torch.from_numpy(vecs[[table[p] for p in b]]), tmp_path / "w",
                 queries=50, m=5, i=40, j=45, flat_max=100, index_type=index_type)
    assert found.index["kind"] == kind
    same = [np.mean(pos % 40 == q % 40) for q, pos in zip(found.queries, found.positives)]
    assert np.mean(same) > 0.9


def test_mined_csv_round_trip_and_precision(tmp_path):
    paths, vecs, embed = _fake_target(60)
    target = TargetPhotos(paths, [p.parent.name for p in paths])
    found = mine(paths, embed, tmp_path / "w", queries=6, m=4, i=10, j=12, seed=2)
    write_mined_csv(tmp_path / "mined.csv", found, target, with_labels=True)
    back = read_mined_csv(tmp_path / "mined.csv")
    want = to_identities(found, target)
    assert back.positives == want.positives and back.negatives == want.negatives
    assert all(len(g) == 5 for g in back.positives) and all(len(g) == 3 for g in back.negatives)
    with open(tmp_path / "mined.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["role"] for r in rows} == {"query", "positive", "negative"}
    assert all(r["label"] == Path(r["path"]).parent.name for r in rows)
    # precision by hand
    same_pos = [target.labels[r] == target.labels[q] for q, rs in zip(found.queries, found.positives) for r in rs]
    same_neg = [target.labels[r] == target.labels[q] for q, rs in zip(found.queries, found.negatives) for r in rs]
    got = label_precision(found, target.labels)
    assert got["positive_precision"] == pytest.approx(np.mean(same_pos))
    assert got["negative_same_label"] == pytest.approx(np.mean(same_neg))
    (tmp_path / "bad.csv").write_text("identity,role,path\n0,anchor,x.jpg\n")
    with pytest.raises(UserError, match="not a mined-identities CSV"):
        read_mined_csv(tmp_path / "bad.csv")


# --- fashionlens adapt, end to end -------------------------------------------------------------

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def _photo(path: Path, colour, rng) -> None:
    arr = np.clip(np.array(colour) + rng.integers(-25, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """A source catalog of 4 colour identities x 4 photos, and a target of 4 labelled
    folders x 6 photos of the same colours, darker (another 'domain')."""
    root = tmp_path_factory.mktemp("domains")
    rng = np.random.default_rng(0)
    rows = []
    for i, colour in enumerate(COLOURS):
        for j in range(4):
            _photo(root / "catalog" / "images" / f"{i}_{j}.png", colour, rng)
            rows.append({"id": f"{i}_{j}", "articleType": f"type{i}"})
        for j in range(6):
            _photo(root / "target" / f"label{i}" / f"{j}.png", [c // 2 for c in colour], rng)
    with open(root / "catalog" / "styles.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "articleType"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def _train_section(root: Path, out: Path) -> dict:
    return {"model": {"backbone": "lite0", "pretrained": False, "input_size": 48,
                      "neck": {"type": "lan", "branches": 2, "dim": 16}},
            "catalog": str(root / "catalog"), "identity_columns": ["articleType"], "val_fraction": 0.5,
            "p": 2, "k": 2, "epochs": 1, "batches_per_epoch": 2, "lr": 1e-3, "identity": 1.0,
            "out": str(out), "augment": {"erase": 0.0, "rotate": 0.0}}


@pytest.fixture(scope="module")
def initial(domains, tmp_path_factory):
    from fashionlens.training.config import load_train_config

    out = tmp_path_factory.mktemp("init") / "run"
    train(load_train_config(None, [], **_train_section(domains, out)))
    return out / "best"


def _adapt_yaml(domains, initial, path: Path, **kw) -> Path:
    data = {"init": str(initial), "target": str(domains / "target"), "target_labels": True,
            "queries": 4, "m": 2, "i": 4, "j": 5, "rounds": 2, "patience": 2, "out": str(path.parent / "adapt"),
            "train": _train_section(domains, path.parent / "ignored"), **kw}
    path.write_text(yaml.safe_dump(data))
    return path


def test_adapt_rounds_files_and_resume(domains, initial, tmp_path):
    cfg = load_adapt_config(_adapt_yaml(domains, initial, tmp_path / "adapt.yaml"))
    events = []
    rows = adapt(cfg, progress=events.append)
    out = tmp_path / "adapt"
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["model"] == str(initial)
    for r in (1, 2):
        folder = out / f"round-{r}"
        mined = read_mined_csv(folder / "mined.csv")
        assert len(mined) == 4 and all(len(g) == 3 for g in mined.positives)
        info = json.loads((folder / "mining.json").read_text())
        assert 0 <= info["positive_precision"] <= 1 and info["queries"] == 4
        assert (folder / "train" / "best" / "model.safetensors").is_file()
        with open(folder / "train" / "metrics.csv", newline="") as fh:
            assert len(list(csv.DictReader(fh))) == 1
        assert rows[r]["model"] == str(folder / "train" / "best")
    assert rows[2]["trained_from"] == rows[2]["mined_with"] == str(out / "round-1" / "train" / "best")
    # round 2 mined with round 1's model
    assert json.loads((out / "round-2" / "mining.json").read_text())["model"] == str(out / "round-1" / "train" / "best")
    with open(out / "rounds.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [t["round"] for t in table] == ["0", "1", "2"] and table[1]["positive_precision"]
    best = json.loads((out / "best.json").read_text())
    assert best["val_top1"] == max(r["val_top1"] for r in rows)
    assert best["round"] == min(r["round"] for r in rows if r["val_top1"] == best["val_top1"])
    assert yaml.safe_load((out / "config.yaml").read_text())["group_size"] == 2  # m, by its name now
    assert any(e["event"] == "step" for e in events)  # the training progress goes through

    # the mining's precision is what mined.csv's labels say
    with open(out / "round-1" / "mined.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    query_label = {t["identity"]: t["label"] for t in table if t["role"] == "query"}
    pos = [t["label"] == query_label[t["identity"]] for t in table if t["role"] == "positive"]
    assert rows[1]["positive_precision"] == pytest.approx(np.mean(pos))

    # interrupted in round 2 (after its mining): a rerun keeps round 1 and round 2's mining
    mined_before = (out / "round-2" / "mined.csv").read_bytes()
    (out / "round-2" / "round.json").unlink()
    events.clear()
    again = adapt(cfg, progress=events.append)
    assert [r["round"] for r in again] == [0, 1, 2]
    assert not [e for e in events if e["event"] == "round" and "mining" in e["what"]]
    assert (out / "round-2" / "mined.csv").read_bytes() == mined_before
    assert again[2]["val_top1"] == rows[2]["val_top1"] and again[2]["epoch"] == rows[2]["epoch"]


def test_adapt_restart_from_init(domains, initial, tmp_path):
    cfg = load_adapt_config(_adapt_yaml(domains, initial, tmp_path / "a.yaml", restart="init"))
    rows = adapt(cfg)
    assert [r["trained_from"] for r in rows[1:]] == [str(initial)] * 2
    assert rows[2]["mined_with"] == rows[1]["model"]


def test_adapt_stops_when_validation_stalls(domains, initial, tmp_path):
    # patience 1 with an lr of ~0: round 1 cannot beat round 0, so round 2 never runs
    cfg = load_adapt_config(_adapt_yaml(domains, initial, tmp_path / "a.yaml", patience=1, rounds=3),
                            ["train.lr=1e-12"])
    events = []
    rows = adapt(cfg, progress=events.append)
    assert [r["round"] for r in rows] == [0, 1]
    assert events[-1]["event"] == "stopped" and events[-1]["best"]["round"] == 0
    assert not (tmp_path / "adapt" / "round-2").exists()


def test_an_adapt_run_from_before_the_renames_continues(domains, initial, tmp_path):
    """A run folder whose config.yaml holds the old names (m, i, j; p, k and the flat loss weights
    of its training) continues with the same settings under their new names."""
    first = adapt(load_adapt_config(_adapt_yaml(domains, initial, tmp_path / "a.yaml", rounds=1)))
    saved_path = tmp_path / "adapt" / "config.yaml"
    saved = yaml.safe_load(saved_path.read_text())
    for new, old in (("group_size", "m"), ("negatives_from", "i"), ("negatives_to", "j")):
        saved[old] = saved.pop(new)
    train = saved["train"]
    train["p"], train["k"] = train.pop("identities_per_batch"), train.pop("images_per_identity")
    losses = train.pop("losses")
    train.update({"triplet": losses["triplet"]["weight"], "margin": losses["triplet"]["margin"],
                  "reducer": losses["triplet"]["reducer"], "identity": losses.get("identity", {}).get("weight", 0.0)})
    saved_path.write_text(yaml.safe_dump(saved))
    more = adapt(load_adapt_config(tmp_path / "a.yaml", ["rounds=2"]))
    assert more[:2] == first and len(more) == 3


def test_adapt_resume_needs_the_same_settings(domains, initial, tmp_path):
    cfg = load_adapt_config(_adapt_yaml(domains, initial, tmp_path / "a.yaml", rounds=1))
    first = adapt(cfg)
    more = adapt(load_adapt_config(tmp_path / "a.yaml", ["rounds=2"]))  # going further is fine
    assert more[:2] == first and len(more) == 3
    with pytest.raises(UserError, match=r"other settings \(group_size\)"):
        adapt(load_adapt_config(tmp_path / "a.yaml", ["m=1"]))
    with pytest.raises(UserError, match="train"):
        adapt(load_adapt_config(tmp_path / "a.yaml", ["train.lr=0.5"]))


def test_cached_run_refuses_an_init_with_other_frozen_weights(domains, tmp_path):
    from fashionlens.models.builder import ModelConfig, build_model
    from fashionlens.models.checkpoints import save_checkpoint

    model_section = {"backbone": "lite0", "pretrained": True, "input_size": 48, "freeze_backbone": True,
                     "trainable_from": "blocks.6", "neck": {"type": "gap"}}
    tuned, _ = build_model(ModelConfig(**{**model_section, "freeze_backbone": False, "trainable_from": None}))
    with torch.no_grad():
        tuned.backbone.conv_stem.weight.add_(0.1)  # as a full fine-tune would leave it
    save_checkpoint(tmp_path / "tuned", tuned, ModelConfig(**{**model_section, "freeze_backbone": False,
                                                             "trainable_from": None}), {})
    from fashionlens.training.config import load_train_config
    section = {**_train_section(domains, tmp_path / "run"), "model": model_section,
               "feature_cache": str(tmp_path / "cache"), "init": str(tmp_path / "tuned"), "identity": 0.0}
    with pytest.raises(UserError, match="frozen backbone stages differ"):
        train(load_train_config(None, [], **section))


def test_adapt_refuses_a_checkpoint_of_another_model(domains, initial, tmp_path):
    cfg = load_adapt_config(_adapt_yaml(domains, initial, tmp_path / "a.yaml"),
                            ["train.model.neck={type: gap}", "rounds=1"])
    with pytest.raises(UserError, match="model config differs"):
        adapt(cfg)


def _run_cli(monkeypatch, capsys, *args):
    rc, out, err = run_cli_inprocess(monkeypatch, capsys, "adapt", *args)
    return rc, out + err


def test_adapt_cli_bad_settings_give_clear_errors(domains, initial, tmp_path, monkeypatch, capsys):
    cfg = _adapt_yaml(domains, initial, tmp_path / "a.yaml")
    rc, text = _run_cli(monkeypatch, capsys, cfg, "--set", "m=5", "--set", "i=4")
    assert rc != 0 and "m < i <= j" in text
    rc, text = _run_cli(monkeypatch, capsys, cfg, "--set", f"init={tmp_path}")
    assert rc != 0 and "not a checkpoint" in text
    rc, text = _run_cli(monkeypatch, capsys, cfg, "--set", f"target={tmp_path / 'nowhere'}")
    assert rc != 0 and "not a folder" in text
    rc, text = _run_cli(monkeypatch, capsys, cfg, "--set", "assign=source", "--set", "mined_share=0.3")
    assert rc != 0 and "mined_share is for assign=new" in text
    rc, text = _run_cli(monkeypatch, capsys, cfg, "--set", "queries=30")
    assert rc != 0 and "too few" in text
    assert not (tmp_path / "adapt" / "round-1" / "round.json").exists()


# --- groups voted onto source identities (assign=source) -----------------------------------------

def test_vote_assigns_groups_by_the_majority_of_source_neighbours(tmp_path):
    from fashionlens.training.mining import SourceVote

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(4, 8)).astype(np.float32)
    target = centres[np.arange(80) % 4] + 0.3 * rng.normal(size=(80, 8)).astype(np.float32)
    source = centres[np.arange(40) % 4] + 0.3 * rng.normal(size=(40, 8)).astype(np.float32)
    names = [f"id{i % 4}" for i in range(40)]
    names[:6] = ["mixed"] * 6  # some source photos under another identity: shares below 1
    t_paths = [Path(f"/t/{i}.jpg") for i in range(80)]
    s_paths = [Path(f"/s/{i}.jpg") for i in range(40)]
    table = {**{p: target[i] for i, p in enumerate(t_paths)}, **{p: source[i] for i, p in enumerate(s_paths)}}

    def embed(batch):
        return torch.from_numpy(np.stack([table[p] for p in batch]))

    vote = SourceVote(s_paths, names, k=7, min_share=0.6)
    found = mine(t_paths, embed, tmp_path / "w", queries=10, m=3, i=5, j=6, seed=1, vote=vote)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    for q, pos, name, share in zip(found.queries, found.positives, found.assigned, found.assigned_share):
        centroid = unit(unit(target[[q, *pos]]).mean(axis=0))
        near = np.argsort(-(unit(source) @ centroid), kind="stable")[:7]
        votes = [names[r] for r in near]
        counts = {v: votes.count(v) for v in votes}
        top = next(v for v in votes if counts[v] == max(counts.values()))  # ties: the nearer photo wins
        assert share == pytest.approx(votes.count(top) / 7)
        assert name == (top if share >= 0.6 else None)
    assert any(a is not None for a in found.assigned)
    target_photos = TargetPhotos(t_paths, [f"id{i % 4}" for i in range(80)])
    write_mined_csv(tmp_path / "mined.csv", found, target_photos, with_labels=True)
    back = read_mined_csv(tmp_path / "mined.csv")
    assert back.source == found.assigned
    from fashionlens.training.pseudo_labels import assignment_precision
    got = assignment_precision(found, target_photos.labels, lambda label, ident: label == ident)
    groups = [[q, *p] for q, p, a in zip(found.queries, found.positives, found.assigned) if a is not None]
    right = sum(target_photos.labels[r] == a for g, a in zip(groups, [a for a in found.assigned if a]) for r in g)
    assert got["assignment_precision"] == pytest.approx(right / sum(len(g) for g in groups))


def test_with_mined_source_mode():
    source = [(Path(f"s{i}.jpg"), i % 3) for i in range(6)]
    mined = MinedIdentities([[Path("t0.jpg"), Path("t1.jpg")], [Path("t2.jpg"), Path("t3.jpg")], [Path("t4.jpg")]],
                            [[Path("t9.jpg")], [Path("t8.jpg")], []], ["b", None, "c"])
    samples, extras = with_mined(source, 3, mined, {"a": 0, "b": 1, "c": 2})
    assert extras == {}
    assert samples[6:] == [(Path("t0.jpg"), 1), (Path("t1.jpg"), 1), (Path("t4.jpg"), 2)]
    with pytest.raises(UserError, match="not a source identity"):
        with_mined(source, 3, mined, {"a": 0, "b": 1})


def test_adapt_with_source_assignment(domains, initial, tmp_path):
    cfg = load_adapt_config(_adapt_yaml(domains, initial, tmp_path / "a.yaml", assign="source", rounds=1,
                                        vote_k=2, vote_min_share=0.5))
    rows = adapt(cfg)
    assert [r["round"] for r in rows] == [0, 1]
    mined = read_mined_csv(tmp_path / "adapt" / "round-1" / "mined.csv")
    assert mined.source is not None and len(mined.source) == 4
    assert all(name is None or name.startswith("type") for name in mined.source)


@pytest.mark.parametrize("k, m, min_share", [(5, 4, 0.5), (2, 1, 0.5), (3, 0, 2 / 3)])
def test_vote_photos_against_brute_force(tmp_path, k, m, min_share):
    """assign=photo: each photo's vote pools the k nearest source photos of itself and of its m
    nearest target photos; only the photo itself gets the label (checked by brute force, with
    unreadable photos among the target and the source, and with small k and m so that ties and
    shares of exactly min_share occur)."""
    from fashionlens.training.mining import SourceVote, vote_photos
    from fashionlens.training.pseudo_labels import assignment_precision

    rng = np.random.default_rng(11)
    centres = rng.normal(size=(3, 8)).astype(np.float32)
    target = centres[np.arange(60) % 3] + 0.6 * rng.normal(size=(60, 8)).astype(np.float32)
    source = centres[np.arange(45) % 3] + 0.6 * rng.normal(size=(45, 8)).astype(np.float32)
    names = [f"id{i % 3}" for i in range(45)]
    names[:9] = ["other"] * 9
    t_paths = [Path(f"/t/{i}.jpg") for i in range(60)]
    s_paths = [Path(f"/s/{i}.jpg") for i in range(45)]
    table = {**dict(zip(t_paths, target)), **dict(zip(s_paths, source))}
    t_paths.insert(7, Path("/t/broken.jpg"))  # unreadable: rows after it differ from positions among the readable
    s_paths.insert(3, Path("/s/broken.jpg"))
    names.insert(3, "broken")  # an identity only an unreadable source photo holds: never voted

    def embed(batch):  # an unreadable photo embeds to NaN, as the real embedders do
        return torch.from_numpy(np.stack([table.get(p, np.full(8, np.nan, np.float32)) for p in batch]))

    vote = SourceVote(s_paths, names, k=k, min_share=min_share)
    found = vote_photos(t_paths, embed, tmp_path / "w", vote, m=m, chunk_size=16)
    readable = [r for r in range(61) if r != 7]
    assert found.queries.tolist() == readable  # rows of t_paths, the broken one left out
    assert all(len(p) == 0 for p in found.positives) and all(len(n) == 0 for n in found.negatives)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    t_rows = np.array(readable)
    t = unit(np.stack([table[t_paths[r]] for r in readable]))
    s_ok = [r for r in range(46) if r != 3]
    src = unit(np.stack([table[s_paths[r]] for r in s_ok]))
    ties = 0
    for pos, (row, name, share) in enumerate(zip(found.queries, found.assigned, found.assigned_share)):
        assert row == t_rows[pos]
        sims = t @ t[pos]
        sims[pos] = -np.inf
        group = [pos, *np.argsort(-sims, kind="stable")[:m]]
        pooled = [names[s_ok[r]] for g in group for r in np.argsort(-(src @ t[g]), kind="stable")[:k]]
        counts = {v: pooled.count(v) for v in pooled}
        ties += list(counts.values()).count(max(counts.values())) > 1
        top = next(v for v in pooled if counts[v] == max(counts.values()))  # ties: the one reached first
        assert share == pytest.approx(counts[top] / (k * (m + 1)))
        assert name == (top if share >= min_share else None)
    assert "broken" not in found.assigned
    assert sum(a is None for a in found.assigned) < 60
    if min_share > 0.5 or m > 1:
        assert sum(a is None for a in found.assigned) > 0  # the threshold leaves some out
    if k * (m + 1) <= 4:
        assert ties > 1 and any(s == min_share for s in found.assigned_share)  # the cases the test is for
    labels = [f"id{int(p.stem) % 3}" if p.stem.isdigit() else "id0" for p in t_paths]
    photos = TargetPhotos(t_paths, labels)
    write_mined_csv(tmp_path / "mined.csv", found, photos, with_labels=True)
    back = read_mined_csv(tmp_path / "mined.csv")
    assert back.positives == [[t_paths[r]] for r in readable] and back.source == found.assigned
    samples, _ = with_mined([(s_paths[0], 0)], 1, back, {"id0": 0, "id1": 1, "id2": 2, "other": 3})
    assert len(samples) == 1 + sum(a is not None for a in found.assigned)  # one sample a labelled photo
    got = assignment_precision(found, labels, lambda label, ident: label == ident)
    kept = [(r, a) for r, a in zip(found.queries, found.assigned) if a is not None]
    assert got["assignment_precision"] == pytest.approx(np.mean([labels[r] == a for r, a in kept]))
    with pytest.raises(UserError, match="too few"):
        vote_photos(t_paths[:3], embed, tmp_path / "w", vote, m=4)


def test_adapt_with_photo_assignment(domains, initial, tmp_path):
    cfg = load_adapt_config(_adapt_yaml(domains, initial, tmp_path / "a.yaml", assign="photo", rounds=1,
                                        vote_k=2, vote_min_share=0.5))
    rows = adapt(cfg)
    assert [r["round"] for r in rows] == [0, 1]
    out = tmp_path / "adapt" / "round-1"
    mined = read_mined_csv(out / "mined.csv")
    target = TargetPhotos.read(domains / "target")
    assert sorted(g[0] for g in mined.positives) == sorted(target.paths) and all(len(g) == 1 for g in mined.positives)
    assert all(name is None or name.startswith("type") for name in mined.source)
    info = json.loads((out / "mining.json").read_text())
    assert info["queries"] == len(target.paths) and info["positive_precision"] is None  # no positives
    # settings photo votes do not read (queries, i, j) neither block a continued run nor need m < i
    again = load_adapt_config(_adapt_yaml(domains, initial, tmp_path / "a.yaml", assign="photo", rounds=1,
                                          vote_k=2, vote_min_share=0.5, queries=3, m=6, i=3, j=3))
    with pytest.raises(UserError, match="other settings \\(group_size\\)"):
        adapt(again)  # only m (group_size) changed what the rounds were
    with pytest.raises(UserError, match="too few for group_size=99 neighbours each \\(lower group_size\\)"):
        adapt(again.model_copy(update={"group_size": 99, "out": str(tmp_path / "b")}))
    assert not (tmp_path / "b" / "round-0").exists()  # refused before anything was embedded
    same = again.model_copy(update={"group_size": cfg.group_size})
    assert [r["round"] for r in adapt(same)] == [0, 1]


def _torchrun_adapt(config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fashionlens", "adapt", str(config)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_adapt_under_two_process_ddp(domains, initial, tmp_path):
    proc = _torchrun_adapt(_adapt_yaml(domains, initial, tmp_path / "a.yaml", rounds=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "adapt"
    assert json.loads((out / "round-1" / "round.json").read_text())["round"] == 1
    assert len(read_mined_csv(out / "round-1" / "mined.csv")) == 4
    # a failure on rank 0 (too few target photos to mine) ends both processes with its message
    (tmp_path / "b").mkdir()
    proc = _torchrun_adapt(_adapt_yaml(domains, initial, tmp_path / "b" / "b.yaml", queries=30))
    assert proc.returncode != 0 and "too few" in proc.stderr


def test_adapt_cli_runs_and_reports_rounds(domains, initial, tmp_path, monkeypatch, capsys):
    cfg = _adapt_yaml(domains, initial, tmp_path / "a.yaml", rounds=1)
    rc, text = _run_cli(monkeypatch, capsys, cfg, "--out", tmp_path / "via-cli")
    assert rc == 0, text
    assert "round 1 done" in text and "pseudo-label precision" in text
    assert (tmp_path / "via-cli" / "rounds.csv").is_file()
