"""Retrieval training (``fashionlens train``): P x K batches of catalog identities, the configured
loss terms (batch-all triplet, identity ...), validation each epoch; run by the training
:mod:`engine <fashionlens.training.engine>`, which also writes the run folder.

``best/`` is the epoch with the best ``select`` column: by default the macro top-4 over the
garment types of the labelled query photos (e.g. buyers', against the whole catalog:
``val_queries``) when queries are given, else the best ``val_top1`` (held-out identities). Each
epoch the sampler is reseeded with (seed, epoch), so a resumed run draws what an uninterrupted
one would.

Cached maps: with ``model.freeze_backbone`` and ``feature_cache``, rank 0 first computes the
backbone's maps of every training, validation and query image (:mod:`feature_cache`); training
and validation then run the neck and heads on the maps (``model(maps, from_map=True)``). With
``feature_cache_views`` it also caches that many augmented views of each training photo, and each
batch item is the plain map or one of its views.

Mined identities (``fashionlens adapt``): pseudo-identities of target photos trained beside the
source identities; their negatives join the batches as negatives only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from fashionlens.data.augment import AugmentConfig, TrainPreprocess
from fashionlens.data.sampler import PKSampler
from fashionlens.data.transforms import Preprocess
from fashionlens.errors import UserError
from fashionlens.losses import Targets, WeightedSum, build_terms
from fashionlens.models.builder import build_model
from fashionlens.training.config import TrainConfig
from fashionlens.training.engine import run_task
from fashionlens.training.feature_cache import (
    CachedMapDataset,
    FeatureCache,
    MapAugment,
    fill_cache,
    prepare_cache,
    view_cache,
)
from fashionlens.training.identities import IdentityDataset, MinedIdentities, split_for, with_mined
from fashionlens.training.model_outputs import make_embed
from fashionlens.training.validation import QueryValidation, validation_columns, validation_row
from fashionlens.training.weights import init_weights


def map_augment(cfg) -> MapAugment:
    """The map-level augmentations of ``cfg.augment`` (flip, 180 degree rotation, crop)."""
    aug = AugmentConfig(**(cfg.augment or {}))
    return MapAugment(aug.hflip, aug.rot180, aug.crop, aug.crop_min)


def train_dataset(cfg, samples, cache: FeatureCache | None, size: int, mean, std, views: list[FeatureCache] = ()):
    """The training set with its augmentations: cached maps (flip, 180 degree rotation, crop on
    the map, and the augmented ``views``) when ``cache`` is given, else decoded photos (every
    augmentation of ``cfg.augment``)."""
    if cache is not None:
        return CachedMapDataset(samples, cache, map_augment(cfg), views)
    return IdentityDataset(samples, TrainPreprocess(size, mean, std, AugmentConfig(**(cfg.augment or {}))))


def shared_cache(make: Callable[[], FeatureCache], paths, device: str, workers: int, emit, rank: int,
                 world: int) -> FeatureCache:
    """The cache ``make`` opens, with the maps of ``paths``: only rank 0 computes them, the other
    processes open the cache once it is complete."""
    cache = fill_cache(make(), paths, device, workers, emit) if rank == 0 else None
    if world > 1:
        dist.barrier()
    return cache if cache is not None else make()


def share_weights(labels: list[int], n_source: int, share: float) -> dict[int, float]:
    """Identity weights that give the mined identities (labels >= n_source) ``share`` of the
    draws on average, counting only identities the sampler can draw (two photos or more)."""
    counts: dict[int, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    drawable = [label for label, n in counts.items() if label >= 0 and n >= 2]
    mined = [label for label in drawable if label >= n_source]
    source = [label for label in drawable if label < n_source]
    if not mined or not source:
        return {label: 1.0 for label in drawable}
    return {**{label: share / len(mined) for label in mined}, **{label: (1 - share) / len(source) for label in source}}


class RetrievalTask:
    """``fashionlens train`` as a :class:`~fashionlens.training.engine.Task`.

    ``init``: a checkpoint whose weights start a new run (default ``cfg.init``; its identity
    classifier is kept when it was trained on the same identities). ``mined``: pseudo-identities of
    target photos trained beside the source identities (cross-domain mining). ``mined_share``: the
    share of a batch's P identities drawn from the mined ones on average (None: all identities
    alike, as the method's)."""

    best_key = "best_top1"

    def __init__(self, cfg: TrainConfig, init: str | Path | None = None, mined: MinedIdentities | None = None,
                 mined_share: float | None = None):
        self.cfg, self.init, self.mined, self.mined_share = cfg, init or cfg.init, mined, mined_share
        self.split = split_for(cfg)
        if len(self.split.train_identities) < cfg.identities_per_batch:
            raise UserError(f"{len(self.split.train_identities)} training identities, fewer than "
                            f"identities_per_batch={cfg.identities_per_batch}")
        self.terms = build_terms(cfg.losses)
        self.weighted = WeightedSum({name: weight for name, (weight, _) in self.terms.items()})
        update: dict = {"num_identities": None}
        for _, term in self.terms.values():
            update.update(term.model_settings(len(self.split.train_identities)))
        self.model_cfg = cfg.model.model_copy(update=update)
        self.stat_names = [name for _, term in self.terms.values() for name in term.stat_names]
        needs = [term.reference for _, term in self.terms.values() if term.reference is not None]
        if len({repr(n) for n in needs}) > 1:
            raise UserError("the loss terms ask for different reference models; one run has one")
        self.reference_neck = needs[0] if needs else None
        self.reference = None
        self._set_columns(None)
        self.curves = {"losses": ("loss", *self.terms)}

    def _set_columns(self, queries: QueryValidation | None) -> None:
        self.columns = ["epoch", "step", "loss", *self.terms, *self.stat_names, *validation_columns(queries),
                        "seconds", "images_per_second"]

    def check_resume(self, extra: dict) -> None:
        pass  # the engine compares the model; the rest of the settings may change between calls

    def init_weights(self, model) -> None:
        if self.init is not None:
            init_weights(model, self.init, self.model_cfg, self.split.train_identities,
                         cached=bool(self.cfg.feature_cache))

    def prepare(self, model, evaluated, device: str, emit, rank: int, world: int) -> dict:
        cfg, split, mined = self.cfg, self.split, self.mined
        self.device = device
        for _, term in self.terms.values():
            term.to(device)  # buffers of its own, if any (a term has no trainable parameters: build_terms)
        if self.reference_neck is not None:
            self.reference = reference_model(self.model_cfg, self.reference_neck, device)
        data_cfg = model.data_config
        size, mean, std = int(data_cfg["input_size"][-1]), data_cfg["mean"], data_cfg["std"]
        self.queries = (QueryValidation.load(cfg.val_queries, cfg.val_mapping, cfg.catalog, cfg.val_field)
                        if cfg.val_queries else None)
        self._set_columns(self.queries)
        cache = None
        if cfg.feature_cache:
            needed = ([p for p, _ in split.train + split.val] + (self.queries.all_paths() if self.queries else [])
                      + (mined.paths() if mined else []))
            cache = shared_cache(lambda: FeatureCache.for_model(cfg.feature_cache, self.model_cfg, size), needed,
                                 device, cfg.workers, emit, rank, world)
        self.cache = cache
        self.n_source = len(split.train_identities)
        samples, extras, weights = split.train, None, None
        if mined is not None:
            if cache is not None:  # unreadable photos are not in the cache: leave them out first
                mined = MinedIdentities([[p for p in g if p in cache] for g in mined.positives],
                                        [[p for p in g if p in cache] for g in mined.negatives], mined.source)
            source = [(p, label) for p, label in split.train if cache is None or p in cache]
            samples, extras = with_mined(source, self.n_source, mined,
                                         {name: label for label, name in enumerate(split.train_identities)})
            if self.mined_share is not None and extras:
                weights = share_weights([label for _, label in samples], self.n_source, self.mined_share)
        self.extras = extras
        views = []
        if cache is not None and cfg.feature_cache_views:
            views = [shared_cache(lambda v=v: view_cache(cfg.feature_cache, self.model_cfg, size, cfg.augment, v),
                                  [p for p, _ in samples], device, cfg.workers, emit, rank, world)
                     for v in range(1, cfg.feature_cache_views + 1)]
        train_ds = train_dataset(cfg, samples, cache, size, mean, std, views)
        self.val_samples = [(p, label) for p, label in split.val if cache is None or p in cache]
        self.embed = make_embed(evaluated, device, cache, Preprocess(size, mean, std), workers=cfg.workers)
        self.sampler = PKSampler(train_ds.labels, cfg.identities_per_batch, cfg.images_per_identity, cfg.seed,
                                 cfg.batches_per_epoch, extra_negatives=extras, rank=rank, world_size=world,
                                 identity_weights=weights, photo_keys=[str(p) for p, _ in samples] if extras else None)
        self.loader = DataLoader(train_ds, batch_sampler=self.sampler, num_workers=cfg.workers,
                                 pin_memory=device.startswith("cuda"), persistent_workers=cfg.workers > 0)
        return {"batches": len(self.sampler), "train_images": len(train_ds),
                "train_identities": len(split.train_identities),
                "mined_identities": len(mined) if mined is not None else 0, "val_images": len(self.val_samples),
                "val_identities": len(split.val_identities), "dropped": split.dropped}

    def lr(self, epoch: int) -> None:
        return None  # constant: the optimizer's own

    def batches(self, epoch: int):
        self.sampler.set_epoch(epoch)
        return self.loader

    def forward(self, net, batch):
        images, labels = (t.to(self.device, non_blocking=True) for t in batch)
        outputs = net(images, from_map=self.cache is not None)
        if self.reference is not None:
            with torch.no_grad():
                outputs = {**outputs, "reference": self.reference(images, from_map=self.cache is not None)["embedding"]}
        return outputs, labels

    def loss(self, outputs: dict, labels: torch.Tensor):
        anchors = None
        if self.extras:  # mined negatives at the batch's end: negatives only ("M+N")
            labels, anchors = self.sampler.mark_extras(labels)
        targets = Targets(labels, anchors, self.n_source)
        loss, values = self.weighted({name: term(outputs, targets) for name, (_, term) in self.terms.items()})
        values = {"loss": values.pop("total"), **values}
        for _, term in self.terms.values():
            values.update(term.stats())
        return loss, values, len(labels)

    def summary(self, sums: dict, batches: int, lr) -> dict:
        return {key: round(sums.get(key, 0.0) / max(batches, 1), 6) for key in ("loss", *self.terms, *self.stat_names)}

    def validate(self, model) -> dict:
        return validation_row(self.embed, self.val_samples, self.queries)

    def score(self, row: dict) -> float | None:
        return row[self.cfg.best_metric]

    def extra(self, row: dict) -> dict:
        return {"train_identities": self.split.train_identities}


def reference_model(model_cfg, neck: dict, device: str):
    """The frozen reference model of a loss term (:attr:`LossTerm.reference`): the run's backbone
    with its pretrained weights (the stages a cached map skips are the same frozen ones), ``neck``,
    no heads, in eval mode."""
    cfg = model_cfg.model_copy(update={"neck": neck, "num_identities": None, "attributes": None, "pretrained": True})
    model, _ = build_model(cfg)
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def train(cfg: TrainConfig, progress=None, init: str | Path | None = None,
          mined: MinedIdentities | None = None, mined_share: float | None = None) -> dict:
    """Train (or resume) the run of ``cfg`` (see :class:`RetrievalTask`); returns the last epoch's
    metrics row. ``progress(event: dict)`` gets the engine's events on rank 0."""
    return run_task(RetrievalTask(cfg, init, mined, mined_share), progress)


def checkpoint_embedder(cfg: TrainConfig, checkpoint: str | Path, device: str, extra_paths: list[Path], progress,
                        key: str = "embedding"):
    """embed(paths) with the weights of ``checkpoint`` in the model of run config ``cfg``, on the
    run's cached maps when it uses a cache (filled for ``extra_paths`` first). The checkpoint may
    come from a run with fewer trainable stages (e.g. a frozen recipe evaluated in a run that
    trains the last stage); its frozen stages must be the pretrained ones. ``key``: the model's
    embedding, or one neck's (``"gap.embedding"``: a recipe's untrained ImageNet pooled feature)."""
    model_cfg = cfg.model.model_copy(update={"num_identities": None})
    model, _ = build_model(model_cfg)
    init_weights(model, checkpoint, model_cfg, None, cached=bool(cfg.feature_cache))
    model.to(device).eval()
    data_cfg = model.data_config
    size = int(data_cfg["input_size"][-1])
    cache = (prepare_cache(cfg.feature_cache, cfg.model, size, extra_paths, device, cfg.workers, progress)
             if cfg.feature_cache else None)
    dim = None if key == "embedding" else model.output_dim(key)
    return make_embed(model, device, cache, Preprocess(size, data_cfg["mean"], data_cfg["std"]), workers=cfg.workers,
                      key=key, dim=dim)
