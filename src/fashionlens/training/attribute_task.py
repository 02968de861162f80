"""Training the multi-head attribute classifier (docs/METHODS.md, attributes): ``fashionlens
train-attributes``, run by the training :mod:`engine <fashionlens.training.engine>`.

The model is a :class:`~fashionlens.models.builder.RetrievalModel` whose neck is the plain
global average pool (``{"type": "gap", "normalize": false}``) and whose attribute head has one
Linear per attribute (``model.attributes``, filled from the data's schema). Labels as the method
uses them: y = 1, n = 0, each ``m`` drawn as 1 or 0 with probability 0.5 every epoch (``maybe``);
an attribute not labeled for an image adds no loss (masked). Loss: sigmoid cross-entropy per
value (the method's), or softmax per attribute; with ``pointing_loss``, the pointing loss of the
street tags' CAMs against their masks. ``best/`` is the best mean validation accuracy; the
checkpoints' ``extra`` holds the run's config, the split and the validation metrics. Every epoch
reseeds shuffling, augmentation and the draw of the maybes from (seed, epoch), so a resumed run
draws what an uninterrupted one would. With ``model.freeze_backbone`` and ``feature_cache`` only
the heads (and the stages from ``model.trainable_from``) train, on cached maps: a linear probe
when nothing else trains.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fashionlens.data.fashionai import resolve_maybe
from fashionlens.data.street import yes_columns
from fashionlens.data.transforms import Preprocess
from fashionlens.errors import UserError
from fashionlens.evaluation.attribute_metrics import attribute_metrics
from fashionlens.losses import AttributeLoss
from fashionlens.losses.pointing import PointingLoss
from fashionlens.models.builder import ModelConfig
from fashionlens.models.checkpoints import load_attribute_classifier
from fashionlens.training.attribute_data import AttributeSet, read_attribute_set, split_rows
from fashionlens.training.attribute_masks import MaskedMapDataset, street_shares
from fashionlens.training.config import POINTING_SETTINGS, AttributeTrainConfig
from fashionlens.training.engine import run_task
from fashionlens.training.feature_cache import FeatureCache, prepare_cache
from fashionlens.training.model_outputs import make_embed
from fashionlens.training.retrieval_task import map_augment, train_dataset
from fashionlens.training.weights import init_from

COLUMNS = ["epoch", "step", "lr", "loss", "pointing", "val_loss", "val_accuracy", "val_precision", "val_map",
           "seconds", "images_per_second"]


def read_config_data(cfg: AttributeTrainConfig) -> tuple[AttributeSet, dict[str, np.ndarray]]:
    """The run's labeled images and their split into train / val / test rows."""
    data = read_attribute_set(cfg.data, cfg.format, cfg.labels, cfg.schema_file, cfg.attributes, cfg.min_tag_photos)
    return data, split_rows(data, cfg.split_seed, cfg.val_fraction, cfg.test_fraction)


def _data_geometry(model) -> tuple[int, tuple, tuple]:
    cfg = model.data_config
    return int(cfg["input_size"][-1]), cfg["mean"], cfg["std"]


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


def _model_config(cfg: AttributeTrainConfig, schema: dict[str, list[str]]) -> ModelConfig:
    if cfg.model.neck.get("type") != "gap" or cfg.model.neck.get("normalize", True):
        raise UserError("the attribute classifier needs model.neck {type: gap, normalize: false}: its heads are "
                        "linear on the pooled map, which is what the CAM boxes rely on")
    return cfg.model.model_copy(update={"attributes": schema, "num_identities": None})


class AttributeTask:
    """``fashionlens train-attributes`` as a :class:`~fashionlens.training.engine.Task`."""

    best_key = "best_accuracy"
    distributed = False  # every process would train on every batch
    model_change = "a different model or attribute schema"
    columns = COLUMNS
    curves = {"losses": ("loss", "pointing", "val_loss"), "scores": ("val_accuracy", "val_precision", "val_map"),
              "score_label": "mean over attributes"}

    def __init__(self, cfg: AttributeTrainConfig):
        self.cfg = cfg
        self.data, self.parts = read_config_data(cfg)
        if len(self.parts["train"]) < cfg.batch_size:
            raise UserError(f"{len(self.parts['train'])} training images, fewer than batch_size={cfg.batch_size}")
        self.model_cfg = _model_config(cfg, self.data.schema)
        self.split_info = {part: len(r) for part, r in self.parts.items()}
        self.last_val: dict | None = None

    def check_resume(self, extra: dict) -> None:
        saved = {k: (extra.get("config") or {}).get(k, AttributeTrainConfig.model_fields[k].default)
                 for k in POINTING_SETTINGS}
        if saved != {k: getattr(self.cfg, k) for k in POINTING_SETTINGS}:
            raise UserError(f"{Path(self.cfg.out) / 'last'}: trained with {saved}; resume with the same pointing "
                            "settings, or choose a new out folder")

    def init_weights(self, model) -> None:
        if self.cfg.init is not None:
            init_from(model, self.cfg.init, self.model_cfg, cached=bool(self.cfg.feature_cache))

    def prepare(self, model, evaluated, device: str, emit, rank: int, world: int) -> dict:
        cfg, data, parts = self.cfg, self.data, self.parts
        self.model, self.device = model, device
        size, mean, std = _data_geometry(model)
        cache = None
        if cfg.feature_cache:
            needed = [data.images[i] for i in np.concatenate([parts["train"], parts["val"]])]
            cache = prepare_cache(cfg.feature_cache, self.model_cfg, size, needed, device, cfg.workers, emit)
        self.cache = cache
        samples = [(data.images[i], int(i)) for i in parts["train"]]  # label = row of data: its targets
        self.pointing = self.yes = None
        if cfg.pointing_loss > 0:
            shares = street_shares(data, parts["train"], size, tuple(cache.shape[-2:]))
            if not shares:
                raise UserError(f"pointing_loss: none of the {len(parts['train'])} training photos of {cfg.data} "
                                "has a mask")
            self.train_ds = MaskedMapDataset(samples, cache, shares, len(data.schema), map_augment(cfg))
            self.pointing = PointingLoss(cells=cfg.pointing_cells)
            self.yes = torch.tensor(yes_columns(data), device=device)
        else:
            self.train_ds = train_dataset(cfg, samples, cache, size, mean, std)
        self.loss_fn = AttributeLoss(cfg.loss, list(data.slices.values()))
        self.mask = torch.from_numpy(data.mask)
        self.n_batches = len(self.train_ds) // cfg.batch_size
        return {"batches": self.n_batches, "attributes": len(data.schema), "images": self.split_info}

    def lr(self, epoch: int) -> float:
        cfg = self.cfg
        if cfg.schedule == "constant":
            return cfg.lr
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs))

    def batches(self, epoch: int):
        cfg = self.cfg
        self.targets = torch.from_numpy(resolve_maybe(self.data.targets, np.random.default_rng([cfg.seed, epoch]),
                                                      cfg.maybe))
        order = torch.randperm(len(self.train_ds)).tolist()
        batch_lists = [order[b * cfg.batch_size:(b + 1) * cfg.batch_size] for b in range(self.n_batches)]
        return DataLoader(self.train_ds, batch_sampler=batch_lists, num_workers=cfg.workers,
                          pin_memory=self.device.startswith("cuda"))

    def forward(self, net, batch):
        images, index, *masked = batch
        outputs = net(images.to(self.device, non_blocking=True), from_map=self.cache is not None,
                      return_map=self.pointing is not None)
        return outputs, (index, masked)

    def loss(self, outputs: dict, context):
        index, masked = context
        device = self.device
        loss = self.loss_fn(outputs["attr_logits"].float(), self.targets[index].to(device), self.mask[index].to(device))
        values = {}
        if self.pointing is not None:  # masked = (shares, has) of MaskedMapDataset
            has = masked[1].to(device)
            term = self.pointing(outputs["feature_map"][has].float(), self.model.attr_head.weight[self.yes],
                                 masked[0].to(device)[has])
            loss = loss + self.cfg.pointing_loss * term
            values["pointing"] = term.item()
        return loss, {"loss": loss.item(), **values}, len(index)

    def summary(self, sums: dict, batches: int, lr: float) -> dict:
        n = max(self.n_batches, 1)
        return {"lr": round(lr, 8), "loss": round(sums.get("loss", 0.0) / n, 6),
                "pointing": round(sums.get("pointing", 0.0) / n, 6) if self.pointing is not None else None}

    def validate(self, model) -> dict:
        cfg, parts = self.cfg, self.parts
        val = (evaluate_rows(model, self.data, parts["val"], cfg.loss, cfg.threshold, self.device, self.cache,
                             cfg.workers) if len(parts["val"]) else None)
        self.last_val = val
        mean_val = val["mean"] if val else {}
        return {"val_loss": mean_val.get("loss"), "val_accuracy": mean_val.get("accuracy"),
                "val_precision": mean_val.get(f"precision@{cfg.threshold:g}"), "val_map": mean_val.get("mAP")}

    def score(self, row: dict) -> float:
        return row["val_accuracy"] if row["val_accuracy"] is not None else -row["loss"]

    def extra(self, row: dict) -> dict:
        cfg = self.cfg
        return {"kind": "attributes", "val_metrics": self.last_val, "loss": cfg.loss, "threshold": cfg.threshold,
                "split": self.split_info, "config": cfg.model_dump(mode="json")}


def train_attributes(cfg: AttributeTrainConfig, progress=None) -> dict:
    """Train (or resume) the run of ``cfg``; returns the last epoch's metrics row. ``progress(event)``
    gets the engine's ``start``, ``step`` and ``epoch`` events and the feature cache's."""
    return run_task(AttributeTask(cfg), progress)


def load_attribute_run(path: str | Path, device: str = "cpu") -> tuple[object, AttributeTrainConfig, dict]:
    """(model in eval mode, the run's config, the checkpoint's extra) of a checkpoint written by
    :func:`train_attributes` (or its run folder: ``best/``); a clear error for any other folder."""
    model, extra = load_attribute_classifier(path, device)
    return model, AttributeTrainConfig.load(None, **extra["config"]), extra
