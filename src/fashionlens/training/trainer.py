"""The training loop: P x K batches, batch-all triplet (+ identity) loss, per-epoch validation.

Run folder ``cfg.out``: ``config.yaml`` (the run's settings), ``metrics.csv`` (one row per
epoch), ``curves.png``, ``last/`` (every epoch) and ``best/`` checkpoints. ``best/`` is the
epoch with the best ``query_top1`` (labelled query photos, e.g. buyers', against the whole
catalog: ``val_queries``) when queries are given, else the best ``val_top1`` (held-out identities).
A checkpoint is :func:`save_checkpoint`'s folder plus ``optimizer.safetensors`` (the
optimizer state flattened to ``state.<param>.<name>`` tensors; ``param_groups`` go to the
checkpoint's JSON ``extra``): no pickle anywhere.

Resume: when ``out/last`` exists, training continues from the epoch after it (rows of later
epochs in ``metrics.csv`` are dropped first). Every epoch reseeds torch with (seed, epoch,
rank) and the sampler with (seed, epoch), so a resumed run draws what an uninterrupted
one would.

DDP: when ``torch.distributed`` is initialised, or ``WORLD_SIZE`` > 1 (torchrun), each
process trains on its share of the batches (nccl on CUDA, gloo on CPU); rank 0 validates and
writes every file. Logged losses are rank 0's.

Cached maps: with ``model.freeze_backbone`` and ``feature_cache``, rank 0 first computes the
backbone's maps of every training, validation and query image (:mod:`feature_cache`); training
and validation then run the neck and heads on the maps (``model(maps, from_map=True)``). With
``feature_cache_views`` it also caches that many augmented views of each training photo, and each
batch item is the plain map or one of its views.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from fashionlens.data.augment import AugmentConfig, TrainPreprocess
from fashionlens.data.sampler import PKSampler
from fashionlens.data.transforms import Preprocess
from fashionlens.errors import UserError
from fashionlens.losses import BatchAllTripletLoss, IdentityLoss, MeanAllValid, MeanNonZero, WeightedSum
from fashionlens.models.builder import build_model, is_checkpoint, load_checkpoint, save_checkpoint
from fashionlens.training.config import TrainConfig
from fashionlens.training.data import IdentityDataset, MinedIdentities, split_for, with_mined
from fashionlens.training.feature_cache import (CachedMapDataset, FeatureCache, MapAugment, fill_cache,
                                               prepare_cache, view_cache)
from fashionlens.training.embed import make_embed
from fashionlens.training.run_files import (load_optimizer, plot_curves, read_rows, save_average, save_optimizer,
                                           start_average, write_rows)
from fashionlens.training.validation import QueryValidation, validation_row

def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, bool, str]:
    """(rank, world_size, whether we initialised the group, device)."""
    device, owned = cfg.device, False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a long timeout: rank 0 alone builds feature caches and mines targets while the others wait
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=6))
        owned = True
    if not dist.is_initialized():
        return 0, 1, False, device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), owned, device


def _optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def identity_terms(outputs: dict, labels: torch.Tensor, id_loss, num_classes: int | None = None) -> torch.Tensor:
    """Identity loss of the embedding's classifier plus the mean over the stripe classifiers
    (each stripe of a stripes neck has one, thesis A chapter 4), when there are any.

    With ``num_classes``, only samples labelled 0..num_classes-1 count (mined target identities
    and their negatives have no classifier); 0, attached to the graph, when the batch has none."""
    if num_classes is not None:
        keep = (labels >= 0) & (labels < num_classes)
        if not bool(keep.any()):  # 0, with every classifier in the graph (DDP expects their gradients)
            stripes = [t.sum() for key, value in outputs.items() if key.endswith("stripe_logits") for t in value]
            return (outputs["id_logits"].sum() + sum(stripes)) * 0.0
        if not bool(keep.all()):
            outputs = {key: (value[keep] if key == "id_logits" else
                             [t[keep] for t in value] if key.endswith("stripe_logits") else value)
                       for key, value in outputs.items()}
            labels = labels[keep]
    loss = id_loss(outputs["id_logits"].float(), labels)
    stripe_logits = [t for key, value in outputs.items() if key.endswith("stripe_logits") for t in value]
    if stripe_logits:
        loss = loss + torch.stack([id_loss(t.float(), labels) for t in stripe_logits]).mean()
    return loss


def triplet_loss_for(cfg: TrainConfig) -> BatchAllTripletLoss:
    """The run's batch-all triplet loss: its margin, the mean over all valid triplets or over the non-zero ones."""
    return BatchAllTripletLoss(cfg.margin, reducer=MeanAllValid() if cfg.reducer == "all" else MeanNonZero())


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Reseed torch for ``epoch`` of process ``rank``: a resumed run draws what an uninterrupted one would."""
    torch.manual_seed(seed * 1_000_003 + epoch * 1009 + rank)


def map_augment(cfg) -> MapAugment:
    """The map-level augmentations of ``cfg.augment`` (flip, 180 degree rotation, crop)."""
    aug = AugmentConfig(**(cfg.augment or {}))
    return MapAugment(aug.hflip, aug.rot180, aug.crop, aug.crop_min)


def _shared_cache(make: Callable[[], FeatureCache], paths, device: str, workers: int, emit, rank: int,
                  world: int) -> FeatureCache:
    """The cache ``make`` opens, with the maps of ``paths``: only rank 0 computes them, the other
    processes open the cache once it is complete."""
    cache = fill_cache(make(), paths, device, workers, emit) if rank == 0 else None
    if world > 1:
        dist.barrier()
    return cache if cache is not None else make()


def train_dataset(cfg: TrainConfig, samples, cache: FeatureCache | None, size: int, mean, std,
                  views: list[FeatureCache] = ()):
    """The training set with its augmentations: cached maps (flip, 180 degree rotation, crop on
    the map, and the augmented ``views``) when ``cache`` is given, else decoded photos (every
    augmentation of ``cfg.augment``)."""
    if cache is not None:
        return CachedMapDataset(samples, cache, map_augment(cfg), views)
    return IdentityDataset(samples, TrainPreprocess(size, mean, std, AugmentConfig(**(cfg.augment or {}))))


def train(cfg: TrainConfig, progress=None, init: str | Path | None = None,
          mined: MinedIdentities | None = None, mined_share: float | None = None) -> dict:
    """Train (or resume) the run of ``cfg``; returns the last epoch's metrics row.

    ``init``: a checkpoint whose weights start a new run (default ``cfg.init``; same backbone,
    input size and neck; its identity classifier is kept when it was trained on the same identities). ``mined``: pseudo-identities
    of target photos trained beside the source identities (cross-domain mining); their negatives
    join the batches as negatives only. ``mined_share``: the share of a batch's P identities
    drawn from the mined ones on average (None: all identities alike, as the thesis).

    ``progress(event: dict)`` is called on rank 0 with ``{"event": "start", ...}``,
    ``{"event": "step", "epoch", "batch", "batches", "loss"}`` and ``{"event": "epoch", **row}``.
    """
    rank, world, owned, device = _setup_distributed(cfg)
    try:
        return _train(cfg, progress if rank == 0 else None, rank, world, device, init or cfg.init, mined, mined_share)
    finally:
        if owned:
            dist.destroy_process_group()


def _is_classifier(key: str) -> bool:
    """Identity classifiers: the id head and the stripes' classifiers (one class per identity)."""
    return key.startswith("id_head.") or ".classifiers." in key


def _share_weights(labels: list[int], n_source: int, share: float) -> dict[int, float]:
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


def check_frozen_stages(model: torch.nn.Module, state: dict, init: str | Path) -> None:
    """Refuse ``state`` (the weights of checkpoint ``init``) when its frozen backbone stages differ
    from ``model``'s pretrained ones: a feature cache holds maps of the pretrained weights, so the
    saved model would not compute what it was trained on."""
    current = model.state_dict()
    frozen = [name for name, p in model.named_parameters() if name.startswith("backbone.") and not p.requires_grad]
    changed = [name for name in frozen if name in state and not torch.equal(state[name].to(current[name].device),
                                                                              current[name])]
    if changed:
        raise UserError(f"{init}: its frozen backbone stages differ from the pretrained weights the feature "
                        f"cache holds (e.g. {changed[0]}); train without feature_cache, or start from a "
                        "checkpoint whose backbone was frozen at least as far")


def init_weights(model: torch.nn.Module, init: str | Path, model_cfg, identities: list[str] | None,
                 cached: bool = False) -> None:
    """Copy the weights of checkpoint ``init`` into ``model`` (see :func:`train`). With ``cached``
    (the frozen stages' maps come from a feature cache of the pretrained backbone), the
    checkpoint's frozen stages must be those pretrained weights, or the cached maps would not be
    what the saved model computes."""
    if not is_checkpoint(init):
        raise UserError(f"{init}: not a checkpoint folder (no config.json + model.safetensors)")
    source, source_cfg, extra = load_checkpoint(init)
    # settings that do not change the weights' shapes: a frozen run may start a partly trainable one
    skip = {"pretrained", "num_identities", "freeze_backbone", "freeze_batchnorm", "trainable_from"}
    if source_cfg.model_dump(exclude=skip) != model_cfg.model_dump(exclude=skip):
        raise UserError(f"{init}: its model config differs from this run's model; "
                        f"set the run's model to the checkpoint's ({source_cfg.model_dump(exclude=skip)})")
    state = source.state_dict()
    if extra.get("train_identities") != identities or source_cfg.num_identities != model_cfg.num_identities:
        state = {k: v for k, v in state.items() if not _is_classifier(k)}
    if cached:
        check_frozen_stages(model, state, init)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_classifier(k)]
    if missing or unexpected:
        raise UserError(f"{init}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")


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
    dim = None if key == "embedding" else model.neck.necks[key.removesuffix(".embedding")].out_dim
    return make_embed(model, device, cache, Preprocess(size, data_cfg["mean"], data_cfg["std"]), workers=cfg.workers,
                      key=key, dim=dim)


def _train(cfg: TrainConfig, progress, rank: int, world: int, device: str, init=None,
           mined: MinedIdentities | None = None, mined_share: float | None = None) -> dict:
    out = Path(cfg.out)
    last_dir, best_dir = out / "last", out / "best"
    emit = progress or (lambda event: None)
    split = split_for(cfg)
    if len(split.train_identities) < cfg.p:
        raise UserError(f"{len(split.train_identities)} training identities, fewer than p={cfg.p}")
    model_cfg = cfg.model.model_copy(update={"num_identities": len(split.train_identities) if cfg.identity > 0 else None})

    start_epoch, step, best, extra = 1, 0, float("-inf"), {}
    torch.manual_seed(cfg.seed)
    if is_checkpoint(last_dir):
        model, saved_cfg, extra = load_checkpoint(last_dir)
        mine = model_cfg.model_dump(exclude={"pretrained"})
        if saved_cfg.model_dump(exclude={"pretrained"}) != mine:
            raise UserError(f"{last_dir}: trained with a different model config; choose a new out folder")
        start_epoch, step = int(extra["epoch"]) + 1, int(extra["step"])
        best = float("-inf") if extra.get("best_top1") is None else float(extra["best_top1"])
    else:
        model, _ = build_model(model_cfg)
        if init is not None:
            init_weights(model, init, model_cfg, split.train_identities, cached=bool(cfg.feature_cache))
    data_cfg = model.data_config
    size, mean, std = int(data_cfg["input_size"][-1]), data_cfg["mean"], data_cfg["std"]
    model.to(device).train()
    optimizer = _optimizer(cfg, model)
    if extra:
        load_optimizer(last_dir, optimizer, extra["optimizer_param_groups"])
    averaged = start_average(model, cfg.ema, last_dir if extra else None, extra, step)  # None without ema
    evaluated = averaged.module if averaged is not None else model
    net = DistributedDataParallel(model) if world > 1 else model

    queries = (QueryValidation.load(cfg.val_queries, cfg.val_mapping, cfg.catalog, cfg.val_field)
               if cfg.val_queries else None)
    cache = None
    if cfg.feature_cache:
        needed = ([p for p, _ in split.train + split.val] + (queries.all_paths() if queries else [])
                  + (mined.paths() if mined else []))
        cache = _shared_cache(lambda: FeatureCache.for_model(cfg.feature_cache, model_cfg, size), needed,
                              device, cfg.workers, emit, rank, world)
    n_source = len(split.train_identities)
    samples, extras, weights = split.train, None, None
    if mined is not None:
        if cache is not None:  # unreadable photos are not in the cache: leave them out first
            mined = MinedIdentities([[p for p in g if p in cache] for g in mined.positives],
                                    [[p for p in g if p in cache] for g in mined.negatives], mined.source)
        source = [(p, label) for p, label in split.train if cache is None or p in cache]
        samples, extras = with_mined(source, n_source, mined,
                                     {name: label for label, name in enumerate(split.train_identities)})
        if mined_share is not None and extras:
            weights = _share_weights([label for _, label in samples], n_source, mined_share)
    views = []
    if cache is not None and cfg.feature_cache_views:
        views = [_shared_cache(lambda v=v: view_cache(cfg.feature_cache, model_cfg, size, cfg.augment, v),
                               [p for p, _ in samples], device, cfg.workers, emit, rank, world)
                 for v in range(1, cfg.feature_cache_views + 1)]
    train_ds = train_dataset(cfg, samples, cache, size, mean, std, views)
    val_samples = [(p, label) for p, label in split.val if cache is None or p in cache]
    embed = make_embed(evaluated, device, cache, Preprocess(size, mean, std), workers=cfg.workers)
    sampler = PKSampler(train_ds.labels, cfg.p, cfg.k, cfg.seed, cfg.batches_per_epoch, extra_negatives=extras,
                        rank=rank, world_size=world, identity_weights=weights,
                        photo_keys=[str(p) for p, _ in samples] if extras else None)
    loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.workers,
                        pin_memory=device.startswith("cuda"), persistent_workers=cfg.workers > 0)
    triplet_loss = triplet_loss_for(cfg)
    id_loss, weighted = IdentityLoss(), WeightedSum({"triplet": cfg.triplet, "identity": cfg.identity})
    use_amp = cfg.amp and device.startswith("cuda")

    rows = read_rows(out / "metrics.csv", start_epoch - 1)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    emit({"event": "start", "start_epoch": start_epoch, "epochs": cfg.epochs, "batches": len(sampler),
          "train_images": len(train_ds), "train_identities": len(split.train_identities),
          "mined_identities": len(mined) if mined is not None else 0,
          "val_images": len(val_samples), "val_identities": len(split.val_identities), "dropped": split.dropped,
          "world_size": world, "device": device})
    row: dict = rows[-1] if rows else {}
    for epoch in range(start_epoch, cfg.epochs + 1):
        seed_epoch(cfg.seed, epoch, rank)
        sampler.set_epoch(epoch)
        sums = {"loss": 0.0, "triplet": 0.0, "identity": 0.0, "valid_triplets": 0.0, "positive_fraction": 0.0}
        n_batches = n_images = 0
        t0 = time.perf_counter()
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                outputs = net(images, from_map=cache is not None)
            terms = {}
            anchors = None
            if extras:  # mined negatives at the batch's end: negatives only ("M+N")
                labels, anchors = sampler.mark_extras(labels)
            if cfg.triplet > 0:
                terms["triplet"] = triplet_loss(outputs["embedding"].float(), labels, anchor_mask=anchors)
            if cfg.identity > 0:
                terms["identity"] = identity_terms(outputs, labels, id_loss, n_source)
            loss, values = weighted(terms)
            if not torch.isfinite(loss):
                raise RuntimeError(f"epoch {epoch}: the loss is {float(loss)}; lower lr?")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if averaged is not None:
                averaged.update_parameters(model)
            step += 1
            n_batches += 1
            n_images += len(labels) * world
            sums["loss"] += values["total"]
            for name in ("triplet", "identity"):
                sums[name] += values.get(name, 0.0)
            for name in ("valid_triplets", "positive_fraction"):
                sums[name] += float(triplet_loss.last_stats.get(name, 0.0)) if cfg.triplet > 0 else 0.0
            emit({"event": "step", "epoch": epoch, "batch": n_batches, "batches": len(sampler), "loss": values["total"]})
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "step": step, **{k: round(v / max(n_batches, 1), 6) for k, v in sums.items()},
               "seconds": round(seconds, 3), "images_per_second": round(n_images / seconds, 2) if seconds else None}
        if rank == 0:
            row.update(validation_row(embed, val_samples, queries))
            rows.append(row)
            write_rows(out / "metrics.csv", rows)
            plot_curves(rows, out / "curves.png")
            improved = row[cfg.best_metric] is not None and row[cfg.best_metric] > best
            best = row[cfg.best_metric] if improved else best
            ckpt_extra = {"epoch": epoch, "step": step, "ema": cfg.ema, "metrics": row, "best_top1": None if best == float("-inf") else best,
                          "data_config": data_cfg, "train_identities": split.train_identities}
            ckpt_extra["optimizer_param_groups"] = save_optimizer(last_dir.mkdir(parents=True, exist_ok=True) or last_dir, optimizer)
            if averaged is not None:
                save_average(last_dir, averaged)
            save_checkpoint(last_dir, model, model_cfg, ckpt_extra)
            if improved:
                save_checkpoint(best_dir, evaluated, model_cfg, ckpt_extra)
            emit({"event": "epoch", **row})
        if world > 1:
            dist.barrier()
    return row


def main(argv: list[str] | None = None) -> None:
    """``python -m fashionlens.training.trainer CONFIG.yaml [a.b=value ...]`` (also under torchrun)."""
    import sys

    from fashionlens.training.config import load_train_config

    args = sys.argv[1:] if argv is None else argv
    row = train(load_train_config(args[0], args[1:]))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
