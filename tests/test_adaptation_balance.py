"""Adaptation that keeps rare garment types (issue 26): per-type figures, selection that the
common types cannot win, a vote corrected for the catalog's class prior, a cap per identity, the
relational anchor to the untrained model, and the adapt rounds that use them."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_mining import _adapt_yaml, domains, initial  # noqa: F401  (module fixtures)

from fashionlens.losses import LOSS_TERMS
from fashionlens.losses.anchor import similarity_gap
from fashionlens.training.adapt import adapt, load_adapt_config
from fashionlens.training.config import TrainConfig
from fashionlens.training.mining import Mined, SourceVote, _majority, vote_photos
from fashionlens.training.pseudo_labels import assignment_counts, cap_assigned
from fashionlens.training.validation import QueryValidation, eligible, type_drops, type_figures

pytestmark = pytest.mark.usefixtures("one_thread")


# --- per-type figures ----------------------------------------------------------------------------

def test_type_figures_against_a_loop():
    rng = np.random.default_rng(0)
    types = [str(t) for t in rng.choice(["coat", "dress", "tee"], 40, p=[0.1, 0.2, 0.7])]
    hits = torch.from_numpy(rng.random((40, 4)) < 0.3)
    got = type_figures(hits, types, ["coat", "dress", "hat", "tee"])
    per = {}
    for t in ("coat", "dress", "tee"):
        rows = [h for h, x in zip(hits.tolist(), types) if x == t]
        per[t] = {k: sum(any(r[:k]) for r in rows) / len(rows) for k in (1, 4)}
        for k in (1, 4):
            assert got[f"query_top{k}.{t}"] == pytest.approx(per[t][k], abs=1e-6)
    for k in (1, 4):
        assert got[f"query_top{k}"] == pytest.approx(np.mean([any(r[:k]) for r in hits.tolist()]), abs=1e-6)
        assert got[f"query_macro_top{k}"] == pytest.approx(np.mean([per[t][k] for t in per]), abs=1e-6)
    worst = min(per, key=lambda t: (per[t][4], t))
    assert got["query_worst_type"] == worst and got["query_worst_top4"] == pytest.approx(per[worst][4], abs=1e-6)
    assert got["query_top1.hat"] is None and got["query_top4.hat"] is None  # a type without a query


def test_macro_is_not_won_by_the_common_type():
    """90 common queries all hit, 10 rare all miss: overall 0.9, macro 0.5."""
    hits = torch.tensor([[True] * 4] * 90 + [[False] * 4] * 10)
    got = type_figures(hits, ["tee"] * 90 + ["coat"] * 10, ["coat", "tee"])
    assert got["query_top1"] == pytest.approx(0.9) and got["query_macro_top1"] == pytest.approx(0.5)
    assert got["query_worst_type"] == "coat" and got["query_worst_top4"] == 0.0


def test_query_validation_reports_each_type():
    table = {"q0": [1.0, 0.0], "q1": [0.0, 1.0], "q2": [0.0, 1.0], "g0": [1.0, 0.05], "g1": [0.05, 1.0]}
    qv = QueryValidation([Path("q0"), Path("q1"), Path("q2")], [frozenset("a"), frozenset("b"), frozenset("a")],
                         [Path("g0"), Path("g1")], ["a", "b"], ["tee", "coat", "coat"])
    got = qv.evaluate(lambda ps: torch.tensor([table[str(p)] for p in ps]), ks=(1, 4))
    # q0 (tee) hits at 1; q1 (coat) hits at 1; q2 (coat) wants a, found at rank 2
    assert got["query_top1"] == pytest.approx(2 / 3) and got["query_top1.tee"] == 1.0
    assert got["query_top1.coat"] == 0.5 and got["query_top4.coat"] == 1.0
    assert got["query_macro_top1"] == pytest.approx(0.75) and got["query_worst_type"] == "coat"
    assert list(got) == qv.columns()


# --- selection -------------------------------------------------------------------------------------

def test_selection_defaults_to_macro_top4_and_needs_queries(tmp_path):
    base = {"catalog": str(tmp_path / "c.csv")}
    assert TrainConfig(**base).best_metric == "val_top1"
    queried = {**base, "val_queries": "q", "val_mapping": "m.csv"}
    assert TrainConfig(**queried).best_metric == "query_macro_top4"
    assert TrainConfig(**queried, select="query_top1").best_metric == "query_top1"
    with pytest.raises(ValueError, match="needs val_queries"):
        TrainConfig(**base, select="query_macro_top4")


def test_a_round_is_handed_over_only_within_the_floor():
    start = {"query_top4.coat": 0.50, "query_top4.tee": 0.80, "query_top1.coat": 0.3}
    row = {"query_top4.coat": 0.47, "query_top4.tee": 0.95, "query_top1.coat": 0.1}
    assert type_drops(row, start) == {"coat": pytest.approx(0.03), "tee": pytest.approx(-0.15)}
    assert eligible(row, start, None) and eligible(row, start, 0.03)
    assert not eligible(row, start, 0.02)


# --- the vote and its prior --------------------------------------------------------------------------

def test_vote_weights_undo_the_class_prior():
    vote = SourceVote([Path(f"s{i}") for i in range(40)], ["big"] * 36 + ["small"] * 4, k=5)
    assert vote.weights(["big", "small"]) is None  # power 0: plain counts
    for power in (0.5, 1.0):
        vote.prior_power = power
        w = vote.weights(["big", "small"])
        share = np.array([0.9, 0.1])
        assert float((share * w).sum()) == pytest.approx(1.0)  # a vote from the source's mix weighs 1
        assert w[1] / w[0] == pytest.approx((0.9 / 0.1) ** power)


def test_weighted_majority_and_plain_counts():
    votes = np.array([0, 0, 0, 1, -1])
    assert _majority(votes) == (0, 3.0, 5.0)  # plain: count, of all five (an abstention counts)
    assert _majority(votes, np.array([0.5, 3.0])) == (1, 3.0, 5.5)
    assert _majority(np.array([1, 0, 0, 1])) == (1, 2.0, 4.0)  # a tie: the nearer
    assert _majority(np.array([-1, -1])) == (-1, 0, 2.0)


def _line_embed(angles: dict[str, float]):
    return lambda paths: torch.tensor([[math.cos(angles[str(p)]), math.sin(angles[str(p)])] for p in paths])


def test_the_prior_correction_gives_a_photo_to_the_rare_identity(tmp_path):
    """The photo's 6 nearest catalog photos: 4 of a large identity, 2 of a small one. The plain
    vote gives it to the large one; divided by the prior, to the small one."""
    angles = {"t0": 0.0, "t1": 3.0}
    near = ["big", "big", "small", "small", "big", "big"]
    source, names = [], []
    for i, name in enumerate(near):
        angles[f"n{i}"] = 0.01 * (i + 1)
        source.append(Path(f"n{i}")), names.append(name)
    for i in range(30):  # the rest of the large identity, and one more small photo, far away
        angles[f"f{i}"] = 1.5 + 0.01 * i
        source.append(Path(f"f{i}")), names.append("big")
    angles["fs"] = 2.0
    source.append(Path("fs")), names.append("small")
    embed = _line_embed(angles)
    plain = vote_photos([Path("t0"), Path("t1")], embed, tmp_path / "w", SourceVote(source, names, 6, 0.3), m=0)
    assert plain.assigned[0] == "big" and plain.assigned_share[0] == pytest.approx(4 / 6)
    fair = vote_photos([Path("t0"), Path("t1")], embed, tmp_path / "w",
                       SourceVote(source, names, 6, 0.3, prior_power=1.0), m=0)
    w = SourceVote(source, names, 6, 0.3, prior_power=1.0).weights(["big", "small"])
    assert fair.assigned[0] == "small"
    assert fair.assigned_share[0] == pytest.approx(2 * w[1] / (4 * w[0] + 2 * w[1]))


def test_cap_keeps_the_surest_photos_of_each_identity():
    shares = [0.9, 0.4, 0.8, 0.5, 0.7, 0.6]
    names = ["big", "big", "big", "small", "big", None]
    empty = [np.zeros(0, np.int64)] * 6
    mined = Mined(np.arange(6), empty, empty, empty, empty, empty, {}, list(names), list(shares))
    cap_assigned(mined, 2)
    assert mined.assigned == ["big", None, "big", "small", None, None]
    counts = assignment_counts(mined, 10)
    assert counts == {"labelled_photos": 0.3, "largest_identity_share": pytest.approx(2 / 3),
                      "identity_photos": {"big": 2, "small": 1}}


# --- the anchor ----------------------------------------------------------------------------------------

def test_similarity_gap_against_a_double_loop():
    g = torch.Generator().manual_seed(0)
    e, r = torch.randn(6, 5, generator=g), torch.randn(6, 9, generator=g)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j]
    expect = sum((cos(e[i], e[j]) - cos(r[i], r[j])) ** 2 for i, j in pairs) / len(pairs)
    assert float(similarity_gap(e, r)) == pytest.approx(expect, rel=1e-5)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    assert float(similarity_gap(e @ q, e)) == pytest.approx(0.0, abs=1e-6)  # a rotation keeps every similarity
    assert float(similarity_gap(e[:1], r[:1])) == 0.0
    term = LOSS_TERMS.get("anchor")()
    assert float(term({"embedding": e, "reference": r}, None)) == pytest.approx(expect, rel=1e-5)
    with pytest.raises(KeyError, match="reference"):
        term({"embedding": e}, None)


# --- adapt, end to end ---------------------------------------------------------------------------------

def test_adapt_with_prior_cap_floor_and_anchor_reports_every_type(domains, initial, tmp_path):  # noqa: F811
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("label,types\n" + "".join(f"label{i},type{i}\n" for i in range(4)))
    path = _adapt_yaml(domains, initial, tmp_path / "a.yaml", assign="photo", rounds=2, vote_k=2,
                       vote_min_share=0.3, vote_prior_power=0.5, mined_cap=3, max_type_drop=0.0)
    data = yaml.safe_load(path.read_text())
    data["train"].update({"val_queries": str(domains / "target"), "val_mapping": str(mapping),
                          "losses": {"triplet": {"weight": 1.0}, "anchor": {"weight": 5.0}}})
    path.write_text(yaml.safe_dump(data))
    cfg = load_adapt_config(path)
    assert cfg.train.best_metric == "query_macro_top4"
    rows = adapt(cfg)
    out = tmp_path / "adapt"
    for r in (1, 2):
        info = json.loads((out / f"round-{r}" / "mining.json").read_text())
        assert info["identity_photos"] and max(info["identity_photos"].values()) <= 3  # the cap
        assert info["labelled_photos"] == pytest.approx(sum(info["identity_photos"].values()) / 24)
        with open(out / f"round-{r}" / "train" / "metrics.csv", newline="") as fh:
            metrics = list(csv.DictReader(fh))
        assert float(metrics[0]["anchor"]) >= 0 and metrics[0]["query_macro_top4"] != ""
        assert {f"query_top4.label{i}" for i in range(4)} <= set(metrics[0])
    with open(out / "rounds.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert table[0]["query_macro_top4"] != "" and table[1]["query_worst_type"].startswith("label")
    best = json.loads((out / "best.json").read_text())
    allowed = [r for r in rows if r["round"] == 0 or eligible(r, rows[0], 0.0)]
    assert best["round"] in [r["round"] for r in allowed]
    assert best["query_macro_top4"] == max(r["query_macro_top4"] for r in allowed)
