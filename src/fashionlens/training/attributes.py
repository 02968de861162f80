"""Training the multi-head attribute classifier of thesis B: ``fashionlens train-attributes``.

The model is a :class:`~fashionlens.models.builder.RetrievalModel` whose neck is the plain
global average pool (``{"type": "gap", "normalize": false}``) and whose attribute head has one
Linear per attribute (``model.attributes``, filled from the data's schema). Labels as the
thesis uses them: y = 1, n = 0, each ``m`` drawn as 1 or 0 with probability 0.5 every epoch
(``maybe``); an attribute not labeled for an image adds no loss (masked). Loss: sigmoid
cross-entropy per value (thesis), or softmax per attribute. SGD, lr 0.01, weight decay 5e-4.

The run folder follows the retrieval trainer's conventions (:mod:`fashionlens.training.trainer`):
``config.yaml``, ``metrics.csv`` (one row per epoch), ``curves.png``, ``last/`` (with the
optimizer state, every epoch) and ``best/`` (best mean validation accuracy), safetensors
checkpoints whose ``extra`` holds the run's config, the split and the validation metrics.
An interrupted run resumes from ``last/``; every epoch reseeds shuffling, augmentation and the
draw of the maybes from (seed, epoch), so a resumed run draws what an uninterrupted one would.
With ``model.freeze_backbone`` and ``feature_cache`` only the heads (and the stages from
``model.trainable_from``) train, on cached maps: a linear probe when nothing else trains.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import Field, model_validator
from torch.utils.data import DataLoader

from fashionlens.config import read_yaml_mapping
from fashionlens.data.fashionai import MAYBE_POLICIES, resolve_maybe
from fashionlens.data.transforms import Preprocess
from fashionlens.errors import UserError
from fashionlens.evaluation.attributes import attribute_metrics
from fashionlens.losses import AttributeLoss
from fashionlens.models.builder import (CheckpointPath, ModelConfig, build_model, is_checkpoint, load_checkpoint,
                                        resolve_checkpoint, save_checkpoint)
from fashionlens.training.attribute_data import AttributeSet, read_attribute_set, split_rows
from fashionlens.training.config import RunSettings, apply_overrides
from fashionlens.training.feature_cache import FeatureCache, prepare_cache
from fashionlens.training.run_files import load_optimizer, plot_curves, read_rows, save_optimizer, write_rows
from fashionlens.losses.pointing import PointingLoss
from fashionlens.data.street import yes_columns
from fashionlens.training.attribute_masks import MaskedMapDataset, street_shares
from fashionlens.training.embed import make_embed
from fashionlens.training.trainer import check_frozen_stages, map_augment, seed_epoch, train_dataset

COLUMNS = ["epoch", "step", "lr", "loss", "pointing", "val_loss", "val_accuracy", "val_precision", "val_map",
           "seconds", "images_per_second"]
POINTING_SETTINGS = ("pointing_loss", "pointing_cells")
"""Settings a resumed run must share with its checkpoint (runs saved before they existed: the defaults)."""
ATTRIBUTE_AUGMENT = {"rot180": 0.0, "erase": 0.0, "crop": 0.5, "crop_min": 0.6}
"""Thesis B's random crop and rotation; no 180 degree turn or erasing (they change what is seen)."""


def _default_model() -> ModelConfig:
    return ModelConfig(neck={"type": "gap", "normalize": False})


class AttributeTrainConfig(RunSettings):
    model: ModelConfig = Field(default_factory=_default_model, description="backbone and settings (see ModelConfig); "
                               "neck: gap without normalisation; attributes are set from the data")
    init: CheckpointPath | None = Field(None, description="checkpoint folder (or its run folder) whose backbone "
                                       "weights (and attribute heads, when of the same attributes) start the run, "
                                       "e.g. a linear probe's best/")
    data: str = Field(..., description="folder of labeled images: FashionAI format (Annotations/label.csv, "
                      "attributes.json) or street tags (tags.csv, labels.txt)")
    format: Literal["fashionai", "street"] = Field("fashionai", description="layout of data")
    labels: str | None = Field(None, description="label CSV instead of data/Annotations/label.csv")
    schema_file: str | None = Field(None, description="attributes.json instead of data's own (or the 8 FashionAI ones)")
    attributes: list[str] | None = Field(None, description="train these attributes only (None = all of the schema)")
    min_tag_photos: int = Field(20, ge=1, description="street: tags on fewer photos are left out")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of images for validation (picks best/)")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="share of images held out for testing")
    split_seed: int = Field(0, description="seed of the split by image (stable: a hash of seed and path)")
    maybe: Literal[MAYBE_POLICIES] = Field("random", description="an m label: random = 1 or 0 with "
                                           "probability 0.5 each epoch (thesis); positive / negative / half = 1 / 0 / 0.5")
    loss: Literal["sigmoid", "softmax"] = Field("sigmoid", description="sigmoid cross-entropy per value "
                                                "(thesis) or softmax cross-entropy per attribute")
    threshold: float = Field(0.6, gt=0, lt=1, description="precision is measured at this score")
    epochs: int = Field(10, ge=1, description="total epochs (a resumed run continues up to this number; the "
                        "cosine schedule spans them, so raising it on resume changes the remaining rates)")
    batch_size: int = Field(32, ge=2, description="images per batch")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd (momentum 0.9, thesis) or adam (AdamW)")
    lr: float = Field(0.01, gt=0, description="learning rate (peak of the schedule)")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning rate per epoch")
    augment: dict | None = Field(None, description=f"AugmentConfig fields (None = {ATTRIBUTE_AUGMENT} over "
                                 "the thesis A defaults)")
    feature_cache: str | None = Field(None, description="folder of cached backbone maps (with model.freeze_backbone)")
    pointing_loss: float = Field(0.0, ge=0, description="street, with feature_cache: weight of the pointing loss "
                                 "on training photos with masks (each present tag's CAM, as a softmax over the map's "
                                 "cells, should put its mass on the tag's mask; fashionlens.losses.pointing); 0 = off")
    pointing_cells: Literal["touched", "share"] = Field("touched", description="pointing loss: every cell the "
                                                        "mask touches counts fully, or each by the share it covers")
    out: str = Field("runs/attributes", description="run folder: metrics.csv, curves.png, config.yaml, last/, best/")

    @model_validator(mode="after")
    def _check(self) -> AttributeTrainConfig:
        self.check_cache()
        if self.pointing_loss > 0 and (self.format != "street" or not self.feature_cache):
            raise ValueError("pointing_loss needs pixel masks (format: street) and feature_cache (the "
                             "map-level augmentations are applied to maps and masks together)")
        if self.augment is None:
            self.augment = dict(ATTRIBUTE_AUGMENT)
        return self



def load_attribute_config(path: str | Path | None = None, sets: list[str] | None = None,
                          **overrides) -> AttributeTrainConfig:
    """Defaults -> YAML -> ``--set`` overrides -> keyword overrides that are not None."""
    data = read_yaml_mapping(path) if path is not None else {}
    if isinstance(data.get("model", {}), dict):
        data["model"] = {**_default_model().model_dump(mode="json"), **(data.get("model") or {})}
    data = apply_overrides(data, sets or [])
    data.update({k: v for k, v in overrides.items() if v is not None})
    return AttributeTrainConfig.load(None, **data)


def read_config_data(cfg: AttributeTrainConfig) -> tuple[AttributeSet, dict[str, np.ndarray]]:
    """The run's labeled images and their split into train / val / test rows."""
    data = read_attribute_set(cfg.data, cfg.format, cfg.labels, cfg.schema_file, cfg.attributes, cfg.min_tag_photos)
    return data, split_rows(data, cfg.split_seed, cfg.val_fraction, cfg.test_fraction)


def predict_logits(model, paths: list[Path], device: str, cache: FeatureCache | None = None,
                   workers: int = 0, batch_size: int = 32, flip: bool = False) -> torch.Tensor:
    """Attribute logits (N, total values) of ``paths``; NaN rows for unreadable images;
    ``flip``: mean logits of each photo and its mirror image."""
    size, mean, std = _data_geometry(model)
    predict = make_embed(model, device, cache, Preprocess(size, mean, std), batch_size, workers,
                         key="attr_logits", dim=model.attr_head.out_dim, flip=flip)
    return predict(paths)


def evaluate_rows(model, data: AttributeSet, rows: np.ndarray, mode: str, threshold: float, device: str,
                  cache: FeatureCache | None = None, workers: int = 0, flip: bool = False) -> dict:
    """:func:`attribute_metrics` of ``model`` on ``rows`` of ``data`` (unreadable images left out)."""
    part = data.subset(rows)
    logits = predict_logits(model, part.images, device, cache, workers, flip=flip)
    ok = ~torch.isnan(logits).any(1)
    metrics = attribute_metrics(logits[ok], torch.from_numpy(part.targets)[ok], torch.from_numpy(part.mask)[ok],
                                data.slices, mode, threshold)
    metrics["unreadable"] = [str(p) for p, good in zip(part.images, ok.tolist()) if not good]
    return metrics


def _data_geometry(model) -> tuple[int, tuple, tuple]:
    cfg = model.data_config
    return int(cfg["input_size"][-1]), cfg["mean"], cfg["std"]


def _lr(cfg: AttributeTrainConfig, epoch: int) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs))


def _optimizer(cfg: AttributeTrainConfig, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _model_config(cfg: AttributeTrainConfig, schema: dict[str, list[str]]) -> ModelConfig:
    if cfg.model.neck.get("type") != "gap" or cfg.model.neck.get("normalize", True):
        raise UserError("the attribute classifier needs model.neck {type: gap, normalize: false}: its heads are "
                        "linear on the pooled map, which is what the CAM boxes rely on")
    return cfg.model.model_copy(update={"attributes": schema, "num_identities": None})


def init_from(model, init: str | Path, model_cfg: ModelConfig, cached: bool = False) -> None:
    """Copy the weights of checkpoint ``init`` into ``model``: its backbone (any fashionlens model
    of the same backbone and input size: a retrieval run, another attribute run), and its
    attribute heads too when they are of the same attributes and values (a linear probe's
    heads start a fine-tuning run: "linear probing, then fine-tuning")."""
    if not is_checkpoint(init):
        raise UserError(f"{init}: not a checkpoint folder (no config.json + model.safetensors)")
    source, source_cfg, _ = load_checkpoint(init)
    if (source_cfg.backbone, source_cfg.input_size) != (model_cfg.backbone, model_cfg.input_size):
        raise UserError(f"{init}: backbone {source_cfg.backbone} at {source_cfg.input_size}, this run "
                        f"{model_cfg.backbone} at {model_cfg.input_size}")
    prefixes = ("backbone.", "attr_head.") if source_cfg.attributes == model_cfg.attributes else ("backbone.",)
    state = {k: v for k, v in source.state_dict().items() if k.startswith(prefixes)}
    if cached:
        check_frozen_stages(model, state, init)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith(prefixes) for k in missing):
        raise UserError(f"{init}: its weights do not fit this model")


def train_attributes(cfg: AttributeTrainConfig, progress=None) -> dict:
    """Train (or resume) the run of ``cfg``; returns the last epoch's metrics row.

    ``progress(event)`` gets ``start``, ``step`` (epoch, batch, batches, loss) and ``epoch``
    (the row) events, and the feature cache's events, like :func:`fashionlens.training.train`.
    """
    emit = progress or (lambda event: None)
    out = Path(cfg.out)
    last_dir, best_dir = out / "last", out / "best"
    data, parts = read_config_data(cfg)
    if len(parts["train"]) < cfg.batch_size:
        raise UserError(f"{len(parts['train'])} training images, fewer than batch_size={cfg.batch_size}")
    model_cfg = _model_config(cfg, data.schema)
    start_epoch, step, best, extra = 1, 0, float("-inf"), {}
    torch.manual_seed(cfg.seed)
    if is_checkpoint(last_dir):
        model, saved_cfg, extra = load_checkpoint(last_dir)
        if saved_cfg.model_dump(exclude={"pretrained"}) != model_cfg.model_dump(exclude={"pretrained"}):
            raise UserError(f"{last_dir}: trained with a different model or schema; choose a new out folder")
        saved = {k: (extra.get("config") or {}).get(k, AttributeTrainConfig.model_fields[k].default)
                 for k in POINTING_SETTINGS}
        if saved != {k: getattr(cfg, k) for k in POINTING_SETTINGS}:
            raise UserError(f"{last_dir}: trained with {saved}; resume with the same pointing settings, "
                            "or choose a new out folder")
        start_epoch, step = int(extra["epoch"]) + 1, int(extra["step"])
        best = float(extra["best_accuracy"]) if extra.get("best_accuracy") is not None else float("-inf")
    else:
        model, _ = build_model(model_cfg)
        if cfg.init is not None:
            init_from(model, cfg.init, model_cfg, cached=bool(cfg.feature_cache))
    size, mean, std = _data_geometry(model)
    model.to(cfg.device).train()
    optimizer = _optimizer(cfg, model)
    if extra:
        load_optimizer(last_dir, optimizer, extra["optimizer_param_groups"])
    cache = None
    if cfg.feature_cache:
        needed = [data.images[i] for i in np.concatenate([parts["train"], parts["val"]])]
        cache = prepare_cache(cfg.feature_cache, model_cfg, size, needed, cfg.device, cfg.workers, emit)
    samples = [(data.images[i], int(i)) for i in parts["train"]]  # label = row of data: its targets
    pointing = yes = None
    if cfg.pointing_loss > 0:
        shares = street_shares(data, parts["train"], size, tuple(cache.shape[-2:]))
        if not shares:
            raise UserError(f"pointing_loss: none of the {len(parts['train'])} training photos of {cfg.data} has a mask")
        train_ds = MaskedMapDataset(samples, cache, shares, len(data.schema), map_augment(cfg))
        pointing, yes = PointingLoss(cells=cfg.pointing_cells), torch.tensor(yes_columns(data), device=cfg.device)
    else:
        train_ds = train_dataset(cfg, samples, cache, size, mean, std)
    loss_fn = AttributeLoss(cfg.loss, list(data.slices.values()))
    mask = torch.from_numpy(data.mask)
    use_amp = cfg.amp and cfg.device.startswith("cuda")
    batches = len(train_ds) // cfg.batch_size
    rows = read_rows(out / "metrics.csv", start_epoch - 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    split_info = {part: len(r) for part, r in parts.items()}
    emit({"event": "start", "start_epoch": start_epoch, "epochs": cfg.epochs, "batches": batches,
          "attributes": len(data.schema), "images": split_info, "device": cfg.device})
    row: dict = rows[-1] if rows else {}
    for epoch in range(start_epoch, cfg.epochs + 1):
        seed_epoch(cfg.seed, epoch)
        targets = torch.from_numpy(resolve_maybe(data.targets, np.random.default_rng([cfg.seed, epoch]), cfg.maybe))
        order = torch.randperm(len(train_ds)).tolist()
        batch_lists = [order[b * cfg.batch_size:(b + 1) * cfg.batch_size] for b in range(batches)]
        loader = DataLoader(train_ds, batch_sampler=batch_lists, num_workers=cfg.workers,
                            pin_memory=cfg.device.startswith("cuda"))
        lr = _lr(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total, pointed, n_images, t0 = 0.0, 0.0, 0, time.perf_counter()
        for b, (images, index, *masked) in enumerate(loader, 1):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                outputs = model(images.to(cfg.device, non_blocking=True), from_map=cache is not None,
                                return_map=pointing is not None)
            loss = loss_fn(outputs["attr_logits"].float(), targets[index].to(cfg.device), mask[index].to(cfg.device))
            if pointing is not None:  # masked = (shares, has) of MaskedMapDataset
                has = masked[1].to(cfg.device)
                term = pointing(outputs["feature_map"][has].float(), model.attr_head.weight[yes],
                                masked[0].to(cfg.device)[has])
                loss = loss + cfg.pointing_loss * term
                pointed += term.item()
            if not torch.isfinite(loss):
                raise RuntimeError(f"epoch {epoch}: the loss is {float(loss)}; lower lr?")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step, total, n_images = step + 1, total + loss.item(), n_images + len(index)
            emit({"event": "step", "epoch": epoch, "batch": b, "batches": batches, "loss": total / b})
        seconds = time.perf_counter() - t0
        val = (evaluate_rows(model, data, parts["val"], cfg.loss, cfg.threshold, cfg.device, cache, cfg.workers)
               if len(parts["val"]) else None)
        mean_val = val["mean"] if val else {}
        row = {"epoch": epoch, "step": step, "lr": round(lr, 8), "loss": round(total / max(batches, 1), 6),
               "pointing": round(pointed / max(batches, 1), 6) if pointing is not None else None,
               "val_loss": mean_val.get("loss"), "val_accuracy": mean_val.get("accuracy"),
               "val_precision": mean_val.get(f"precision@{cfg.threshold:g}"), "val_map": mean_val.get("mAP"),
               "seconds": round(seconds, 3), "images_per_second": round(n_images / seconds, 2) if seconds else None}
        rows.append(row)
        write_rows(out / "metrics.csv", rows, COLUMNS)
        plot_curves(rows, out / "curves.png", losses=("loss", "pointing", "val_loss"),
                    scores=("val_accuracy", "val_precision", "val_map"), score_label="mean over attributes")
        score = row["val_accuracy"] if row["val_accuracy"] is not None else -row["loss"]
        improved = score > best
        best = max(best, score)
        ckpt_extra = {"kind": "attributes", "epoch": epoch, "step": step, "metrics": row, "best_accuracy": best,
                      "val_metrics": val, "data_config": model.data_config, "loss": cfg.loss,
                      "threshold": cfg.threshold, "split": split_info, "config": cfg.model_dump(mode="json")}
        ckpt_extra["optimizer_param_groups"] = save_optimizer(last_dir.mkdir(parents=True, exist_ok=True) or last_dir,
                                                              optimizer)
        save_checkpoint(last_dir, model, model_cfg, ckpt_extra)
        if improved:
            save_checkpoint(best_dir, model, model_cfg, ckpt_extra)
        emit({"event": "epoch", **row})
    return row


def load_attribute_model(path: str | Path, device: str = "cpu") -> tuple[object, AttributeTrainConfig, dict]:
    """(model in eval mode, the run's config, the checkpoint's extra) of a checkpoint written by
    :func:`train_attributes` (or its run folder: ``best/``); a clear error for any other folder."""
    if not is_checkpoint(path := resolve_checkpoint(path)):
        raise UserError(f"{path}: not a model checkpoint (needs model.safetensors and config.json)")
    try:
        model, _, extra = load_checkpoint(path, device)
    except (RuntimeError, AssertionError) as exc:  # e.g. a cuda device without a GPU
        raise UserError(f"{path}: cannot load the model on {device} ({' '.join(str(exc).split())[:200]})") from None
    if extra.get("kind") != "attributes" or model.attr_head is None:
        raise UserError(f"{path}: not an attribute classifier (written by 'fashionlens train-attributes')")
    return model, AttributeTrainConfig.load(None, **extra["config"]), extra
