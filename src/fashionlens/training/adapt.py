"""``fashionlens adapt``: cross-domain mining rounds (docs/METHODS.md, retrieval 8).

From a trained model (round 0), each round r = 1..R:

1. mine pseudo-identities on the unlabeled target photos with the model of round r-1
   (:mod:`fashionlens.training.mining`): ``round-r/mined.csv``, ``round-r/mining.json``;
   with ``assign=source`` the mined groups, with ``assign=photo`` every target photo alone,
   join source identities by a vote of their nearest source photos instead;
2. retrain, starting from round r-1's weights, on the source identities + the mined ones
   (mined negatives join the batches as negatives only): ``round-r/train/`` is an ordinary
   training run folder (metrics.csv, curves.png, last/, best/ chosen on validation);
3. record the round's best validation row in ``round-r/round.json`` and ``rounds.csv``.

It stops after ``rounds`` rounds, or earlier when the validation metric (``train.select``:
by default ``query_macro_top4`` with ``train.val_queries``, else ``val_top1``) has not improved on
the best earlier round for ``patience`` rounds; with ``max_type_drop`` a round whose garment
types fall further than that below round 0's is never handed over. An interrupted run
continues: finished rounds (``round.json``) are kept, a round with its ``mined.csv`` is not
mined again, and its training resumes from ``last/``.
The best round's model is ``round-<best>/train/best`` (or ``init`` when no round beat it),
named in ``rounds.csv`` and ``best.json``.

Scaling ``group_size`` (m), ``negatives_from`` (i) and ``negatives_to`` (j) (the method's m = 10,
i = 30, j = 40, on a target of many items with few photos each): ranks 1..m should hold photos of
the query's own identity, and ranks i..j should lie just *beyond* them (hard negatives). With a
target of T photos in which an identity has about n photos, take m < n and i a little above n;
when identities are coarse (a category with hundreds of photos), ranks 30..40 are mostly the
query's own category and act as false negatives: raise i and j (or measure
``negative_same_label`` with ``target_labels``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Literal

import torch.distributed as dist
import yaml
from pydantic import Field, model_validator

from fashionlens.config import Config, apply_overrides, read_yaml_mapping
from fashionlens.errors import UserError
from fashionlens.evaluation.protocols import read_label_mapping
from fashionlens.files import atomic_write_dict_rows, atomic_write_json, atomic_write_text
from fashionlens.index.types import IndexTypeName
from fashionlens.models.checkpoints import CheckpointPath, is_checkpoint
from fashionlens.training.config import RENAMED, TrainConfig, migrate, migrate_sets, prepared
from fashionlens.training.engine import setup_distributed
from fashionlens.training.identities import split_for
from fashionlens.training.mining import SourceVote, TargetPhotos, mine, vote_photos
from fashionlens.training.pseudo_labels import (
    assignment_counts,
    assignment_precision,
    cap_assigned,
    label_precision,
    read_mined_csv,
    write_mined_csv,
)
from fashionlens.training.retrieval_task import checkpoint_embedder, train
from fashionlens.training.validation import QueryValidation, eligible, round_figures, validation_row

ADAPT_RENAMED = {"m": "group_size", "i": "negatives_from", "j": "negatives_to"}
"""Old setting name -> its name now (the method's symbols)."""
ROUND_COLUMNS = ["round", "query_top1", "query_top4", "query_macro_top1", "query_macro_top4", "query_worst_top4",
                 "query_worst_type", "val_top1", "val_top4", "epoch", "mined_identities", "positive_precision",
                 "negative_same_label", "assigned_groups", "assignment_precision", "labelled_photos",
                 "largest_identity_share", "eligible", "model"]
MEASURES = ("positive_precision", "negative_same_label", "assigned_groups", "assignment_precision", "labelled_photos",
            "largest_identity_share")


class AdaptConfig(Config):
    train: TrainConfig = Field(..., description="the retraining of each round (a mapping, or the path of a "
                               "train YAML): model, source catalog and identities, validation, loss, "
                               "epochs and batches per round; its 'out' is replaced by OUT/round-N/train")
    init: CheckpointPath = Field(..., description="round 0: a trained checkpoint folder (or its run folder) with the "
                                "same model config")
    target: str = Field(..., description="folder of unlabeled target-domain photos (e.g. buyers' photos)")
    target_labels: bool = Field(False, description="measurement only: each target photo's sub-folder is its "
                                "label; report each round's pseudo-label precision (never used to train)")
    queries: int = Field(1000, ge=1, description="target photos drawn as queries per round (the rest is the "
                         "gallery); assign=photo: unused, every target photo is a query")
    group_size: int = Field(10, ge=0, description="m in the mining method: ranks 1..m of a query are its "
                            "pseudo-positives; assign=photo: the target neighbours whose source votes each photo's "
                            "vote pools (old name m)")
    negatives_from: int = Field(30, ge=2, description="i in the mining method: ranks i..j of a query are its "
                                "identity's negatives (old name i)")
    negatives_to: int = Field(40, ge=2, description="j in the mining method: last rank of the negatives (old name j)")
    rounds: int = Field(4, ge=1, description="mining rounds after round 0")
    patience: int = Field(1, ge=1, description="stop after this many rounds without a better validation metric")
    assign: Literal["new", "source", "photo"] = Field("new", description="new: each mined group is a new identity "
                                                      "with its negatives (the method's); source: a group joins the "
                                                      "source identity that most of its vote_k nearest source photos "
                                                      "hold (at least vote_min_share of them; other groups are left "
                                                      "out), without negatives; photo: every target photo alone "
                                                      "joins the source identity most of the vote_k nearest source "
                                                      "photos of itself and its m nearest target photos hold")
    restart: Literal["previous", "init"] = Field("previous", description="what each round's training starts "
                                                 "from: the previous round's model, or init every round (the "
                                                 "latest model still mines)")
    vote_k: int = Field(20, ge=1, description="assign=source/photo: source photos searched per group or photo")
    vote_min_share: float = Field(0.5, gt=0, le=1, description="assign=source/photo: smallest share of the vote")
    vote_prior_power: float = Field(0.0, ge=0, le=1, description="assign=source/photo: each vote for a source "
                                    "identity weighs (its share of the source photos) ** -power, so that a large "
                                    "identity (a catalog's T-shirts) does not win a photo by its size alone; 0 = "
                                    "plain counts, 1 = votes divided by the identity's share (the weights are "
                                    "scaled so that a vote drawn from the source's own mix weighs 1 on average)")
    mined_cap: int | None = Field(None, ge=1, description="assign=source/photo: at most this many target photos "
                                  "join one source identity in a round (those with the largest vote shares); "
                                  "None = no cap")
    max_type_drop: float | None = Field(None, ge=0, le=1, description="with labelled val_queries: a round is "
                                        "handed over only when no garment type's validation top-4 lies more than "
                                        "this below round 0's (None: any round may be)")
    mined_share: float | None = Field(None, gt=0, lt=1, description="average share of a batch's P identities "
                                      "drawn from the mined ones (None: all identities alike, as the method)")
    index_type: IndexTypeName = Field("auto", description="target index (auto: exact up to flat_max photos, "
                                  "IVF-PQ above, its codes' own scores)")
    flat_max: int = Field(100_000, ge=1, description="largest target gallery searched exactly when auto")
    out: str = Field("runs/adapt", description="run folder: rounds.csv, best.json, round-N/")
    seed: int = Field(0, description="seed of the query draws (round r draws with seed + r)")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data):
        return migrate(data, ADAPT_RENAMED, {}) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check(self) -> AdaptConfig:
        m, i, j = self.group_size, self.negatives_from, self.negatives_to
        if self.assign != "photo" and not 0 < m < i <= j:
            raise ValueError(f"need 0 < group_size < negatives_from <= negatives_to (m < i <= j), got {m}, {i}, {j}")
        if self.assign != "new" and self.mined_share is not None:
            raise ValueError(f"mined_share is for assign=new (with assign={self.assign} the photos join source "
                             "identities)")
        if not self.train.val_queries and self.train.val_fraction == 0:
            raise ValueError("the rounds need a validation metric: set train.val_queries (+ val_mapping) "
                             "or train.val_fraction > 0")
        return self

    @classmethod
    def help_text(cls) -> str:
        return "\n\n".join(cls.help_lines(skip=("train",))
                             + ["train.<setting>: every setting of `fashionlens train --help`"])


def load_adapt_config(path: str | Path | None = None, sets: list[str] | None = None, **overrides) -> AdaptConfig:
    """Defaults -> YAML -> ``--set`` overrides (``train.lr=1e-4``) -> keyword overrides not None.
    ``train`` may be a mapping or the path of a training YAML."""
    data = migrate(read_yaml_mapping(path) if path is not None else {}, ADAPT_RENAMED, {})
    if isinstance(data.get("train"), str):
        data["train"] = read_yaml_mapping(Path(data["train"]))
    sets = migrate_sets(sets or [], ADAPT_RENAMED)
    own = [s for s in sets if not s.startswith("train.")]
    train_sets = [s.removeprefix("train.") for s in sets if s.startswith("train.")]
    if isinstance(data.get("train"), dict) or train_sets:
        data["train"] = prepared(data.get("train") or {}, train_sets, {}, renamed=RENAMED)
    data = apply_overrides(data, own)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return AdaptConfig.load(None, **data)


def _round_dir(cfg: AdaptConfig, r: int) -> Path:
    return Path(cfg.out) / f"round-{r}"


def _embedder(cfg: AdaptConfig, checkpoint: Path, device: str, extra_paths: list[Path], progress):
    """embed(paths) with the model of ``checkpoint`` (on cached maps when the run uses a cache)."""
    return checkpoint_embedder(cfg.train, checkpoint, device, extra_paths, progress)


def evaluate_checkpoint(cfg: AdaptConfig, checkpoint: Path, device: str, progress) -> dict:
    """The validation row of round 0 (the ``init`` model), as the trainer computes it each epoch."""
    t = cfg.train
    queries = QueryValidation.load(t.val_queries, t.val_mapping, t.catalog, t.val_field) if t.val_queries else None
    split = split_for(t)
    embed = _embedder(cfg, checkpoint, device, [p for p, _ in split.val] + (queries.all_paths() if queries else []),
                      progress)
    return validation_row(embed, split.val, queries)


def _source_vote(cfg: AdaptConfig) -> SourceVote:
    split = split_for(cfg.train)
    return SourceVote([p for p, _ in split.train], [split.train_identities[label] for _, label in split.train],
                      cfg.vote_k, cfg.vote_min_share, cfg.vote_prior_power)


def _assignment_check(cfg: AdaptConfig):
    """correct(target label, source identity): the identity's ``val_field`` value is one the
    label mapping allows for the label (measurement only); None when it cannot be told (no
    mapping, or val_field not among the identity columns)."""
    t = cfg.train
    if not t.val_mapping or t.val_field not in t.identity_columns:
        return None
    mapping = read_label_mapping(Path(t.val_mapping))
    at = t.identity_columns.index(t.val_field)
    return lambda label, identity: identity.split("|")[at] in mapping.get(label, ())


def _best_row(metrics_csv: Path, metric: str) -> dict:
    with open(metrics_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(metric) not in (None, "")]
    if not rows:
        raise UserError(f"{metrics_csv}: no epoch has {metric}")
    return max(rows, key=lambda r: float(r[metric]))


def _write_rounds(cfg: AdaptConfig, rows: list[dict], best: dict) -> None:
    out = Path(cfg.out)
    atomic_write_dict_rows(out / "rounds.csv", ROUND_COLUMNS, rows)
    atomic_write_json(out / "best.json", best)


# settings a continued run may change: how far it goes, not what a round does
_RESUMABLE = {"rounds", "patience", "out"}


def _check_resume(cfg: AdaptConfig) -> None:
    """A run folder continues only with the settings that made its rounds."""
    saved_path = Path(cfg.out) / "config.yaml"
    if not saved_path.is_file():
        return
    unused = {"queries", "negatives_from", "negatives_to"} if cfg.assign == "photo" else set()  # photo votes do not read them
    try:
        saved = AdaptConfig(**yaml.safe_load(saved_path.read_text())).model_dump(mode="json", exclude=_RESUMABLE
                                                                                 | unused)
    except Exception as exc:  # a damaged or foreign file: say so rather than guess
        raise UserError(f"{saved_path}: cannot read the settings of this run ({exc}); use a new out folder") from None
    mine = cfg.model_dump(mode="json", exclude=_RESUMABLE | unused)
    for settings in (mine, saved):  # train.out is replaced by round-N/train anyway
        settings.get("train", {}).pop("out", None)
    changed = sorted(k for k in mine if mine[k] != saved.get(k))
    if changed:
        raise UserError(f"{cfg.out}: its rounds were made with other settings ({', '.join(changed)}); "
                        "use a new out folder, or the same settings to continue")


def _on_rank0(world: int, fn):
    """Run ``fn`` on rank 0 only and give its result (or its error) to every rank, so that
    the other ranks never wait at a barrier for a rank that has failed."""
    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    if world > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise UserError(error)
    return result


def adapt(cfg: AdaptConfig, progress=None) -> list[dict]:
    """Run (or continue) the mining rounds of ``cfg``; returns one row per round, 0 first."""
    rank, world, owned, device = setup_distributed(cfg.train.device)
    emit = (progress or (lambda event: None)) if rank == 0 else (lambda event: None)
    try:
        return _adapt(cfg, emit, world, device)
    finally:
        if owned:
            dist.destroy_process_group()


def _adapt(cfg: AdaptConfig, emit, world: int, device: str) -> list[dict]:
    if not is_checkpoint(cfg.init):
        raise UserError(f"init {cfg.init}: not a checkpoint folder (config.json + model.safetensors)")
    target = TargetPhotos.read(cfg.target)
    if cfg.target_labels and not any(target.labels):
        raise UserError(f"target_labels: the photos of {cfg.target} lie in no sub-folders (no labels)")
    # the sizes every round needs, checked before anything is embedded
    if cfg.assign == "photo" and len(target.paths) < cfg.group_size + 1:
        raise UserError(f"target {cfg.target}: {len(target.paths)} photos, too few for group_size={cfg.group_size} "
                        "neighbours each (lower group_size)")
    if cfg.assign != "photo" and len(target.paths) < cfg.queries + cfg.negatives_to:
        raise UserError(f"target {cfg.target}: {len(target.paths)} photos, too few for {cfg.queries} queries and a "
                        f"gallery of at least negatives_to={cfg.negatives_to} (lower queries or negatives_to)")
    if cfg.assign != "new" and len(split_for(cfg.train).train) < cfg.vote_k:
        raise UserError(f"{cfg.train.catalog}: fewer training photos than the vote's vote_k={cfg.vote_k} "
                        "(lower vote_k)")
    out, metric = Path(cfg.out), cfg.train.best_metric

    def start():
        _check_resume(cfg)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    _on_rank0(world, start)

    def round_zero() -> dict:
        path = _round_dir(cfg, 0) / "round.json"
        if not path.is_file():
            emit({"event": "round", "round": 0, "what": "evaluating the initial model"})
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"round": 0, **evaluate_checkpoint(cfg, Path(cfg.init), device, emit),
                                     "model": str(cfg.init)})
        return json.loads(path.read_text())

    rows = [_on_rank0(world, round_zero)]
    # best.json hands the model over: round 0's (init) as an absolute path, valid from any folder
    best = {"round": 0, metric: rows[0].get(metric), "model": str(Path(cfg.init).resolve())}
    stale = 0
    emit({"event": "round_done", **rows[0]})

    for r in range(1, cfg.rounds + 1):
        folder, previous = _round_dir(cfg, r), Path(rows[-1]["model"])
        done = folder / "round.json"
        row = _on_rank0(world, lambda: json.loads(done.read_text()) if done.is_file() else None)
        if row is None:
            info = _on_rank0(world, lambda: _mine_round(cfg, r, folder, previous, target, device, emit))
            mined = read_mined_csv(folder / "mined.csv")
            if mined.source is None:
                what = f"training on the source + {len(mined)} mined identities"
            else:
                kind = "photos" if cfg.assign == "photo" else "mined groups"
                used = sum(name is not None for name in mined.source)
                what = f"training on the source + {used} of {len(mined)} {kind} given a source identity"
            emit({"event": "round", "round": r, "what": what, **{k: info.get(k) for k in MEASURES}})
            train_cfg = cfg.train.model_copy(update={"out": str(folder / "train")})
            start_from = Path(cfg.init) if cfg.restart == "init" else previous
            train(train_cfg, progress=emit, init=start_from, mined=mined, mined_share=cfg.mined_share)

            def finish() -> dict:
                best_epoch = _best_row(folder / "train" / "metrics.csv", metric)
                result = {"round": r, "mined_identities": len(mined), "model": str(folder / "train" / "best"),
                          "trained_from": str(start_from), "mined_with": str(previous),
                          **{k: info.get(k) for k in MEASURES}, **round_figures(best_epoch),
                          "epoch": int(best_epoch["epoch"])}
                atomic_write_json(done, result)
                return result

            row = _on_rank0(world, finish)
        row = {**row, "eligible": eligible(row, rows[0], cfg.max_type_drop)}
        rows.append(row)
        value = row.get(metric)
        if row["eligible"] and value is not None and (best[metric] is None or value > best[metric]):
            best, stale = {"round": r, metric: value, "model": row["model"]}, 0
        else:
            stale += 1
        _on_rank0(world, lambda: _write_rounds(cfg, rows, best))
        emit({"event": "round_done", **row})
        if stale >= cfg.patience:
            emit({"event": "stopped", "round": r, "best": best})
            break
    return rows


def _mine_round(cfg: AdaptConfig, r: int, folder: Path, previous: Path, target: TargetPhotos, device: str,
                emit) -> dict:
    """Mine round ``r`` with the model ``previous`` into ``folder/mined.csv`` (unless a run
    that was interrupted already did); returns what ``mining.json`` records."""
    mined_csv, info_path = folder / "mined.csv", folder / "mining.json"
    if mined_csv.is_file() and info_path.is_file():
        return json.loads(info_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    emit({"event": "round", "round": r, "what": f"mining with {previous}"})
    vote = _source_vote(cfg) if cfg.assign != "new" else None
    embed = _embedder(cfg, previous, device, target.paths + (vote.paths if vote else []), emit)
    step = lambda d, n: emit({"event": "mine_step", "done": d, "total": n})  # noqa: E731
    if cfg.assign == "photo":
        found = vote_photos(target.paths, embed, folder / ".target-vectors", vote, cfg.group_size, index_type=cfg.index_type,
                            flat_max=cfg.flat_max, seed=cfg.seed + r, progress=step)
    else:
        found = mine(target.paths, embed, folder / ".target-vectors", cfg.queries, cfg.group_size, cfg.negatives_from, cfg.negatives_to,
                     seed=cfg.seed + r, index_type=cfg.index_type, flat_max=cfg.flat_max, progress=step, vote=vote)
    if cfg.mined_cap is not None:
        cap_assigned(found, cfg.mined_cap)
    info = {"round": r, "queries": len(found.queries), "index": found.index, "model": str(previous),
            **assignment_counts(found, len(target.paths))}
    if cfg.target_labels:
        info.update(label_precision(found, target.labels))
        check = _assignment_check(cfg)
        if vote is not None and check is not None:
            info.update(assignment_precision(found, target.labels, check))
    write_mined_csv(mined_csv, found, target, with_labels=cfg.target_labels)
    atomic_write_json(info_path, info)  # last: its presence marks the mining as finished
    return info
