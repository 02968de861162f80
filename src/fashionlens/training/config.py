"""Training settings: :class:`TrainConfig`, loadable from YAML with ``--set a.b=value`` overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from fashionlens.config import Config, read_yaml_mapping
from fashionlens.errors import UserError
from fashionlens.models.builder import CheckpointPath, ModelConfig


class RunSettings(Config):
    """Where and how a training run runs: the settings every trainer shares (listed last)."""

    device: str = Field("cpu", description="torch device: cpu, cuda (DDP: cuda:LOCAL_RANK)")
    amp: bool = Field(True, description="bfloat16 autocast (CUDA only)")
    workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes")
    seed: int = Field(0, description="seed of the split, the sampler, the initialisation and augmentation")

    def check_cache(self) -> None:
        """A feature cache holds maps of a frozen, pretrained backbone."""
        if getattr(self, "feature_cache", None):
            if not self.model.freeze_backbone:
                raise ValueError("feature_cache needs model.freeze_backbone: true (cached maps are of the frozen backbone)")
            if not self.model.pretrained:
                raise ValueError("feature_cache needs model.pretrained: true (maps of random weights differ per run)")
        elif getattr(self, "feature_cache_views", 0):
            raise ValueError("feature_cache_views needs feature_cache (the views are kept beside its maps)")

    @classmethod
    def help_text(cls) -> str:
        """The settings for ``--help``: the model's as ``model.<name>``, then the run's own,
        then the shared ones; required ones marked."""
        shared = tuple(RunSettings.model_fields)
        return "\n\n".join(ModelConfig.help_lines("model.") + cls.help_lines(skip=("model", *shared))
                            + RunSettings.help_lines())


class TrainConfig(RunSettings):
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model to train (see ModelConfig); "
                               "num_identities is set by the trainer when the identity loss is on")
    init: CheckpointPath | None = Field(None, description="checkpoint folder (or its run folder) whose weights start "
                                       "a new run (same backbone, input size and neck; e.g. a frozen-backbone run "
                                       "before training from trainable_from)")
    # data
    catalog: str = Field(..., description="catalog CSV / folder (open_catalog) with the identity columns")
    identity_columns: list[str] = Field(["articleType", "baseColour", "gender"], min_length=1,
                                        description="metadata columns whose values, joined with '|', make an identity")
    min_images_per_identity: int = Field(2, ge=2, description="identities with fewer images are dropped")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of identities held out for validation")
    max_val_images: int = Field(1000, ge=2, description="validation uses at most this many held-out images")
    # sampler
    p: int = Field(7, ge=2, description="identities per batch")
    k: int = Field(10, ge=2, description="images per identity in a batch")
    # optimisation
    epochs: int = Field(10, ge=1, description="total epochs (a resumed run continues up to this number)")
    lr: float = Field(3e-4, gt=0, description="learning rate")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam = torch AdamW (decoupled weight decay); sgd = SGD with momentum 0.9")
    batches_per_epoch: int | None = Field(None, ge=1, description="batches per epoch (per process); None = one pass over the identities")
    ema: float | None = Field(None, gt=0, lt=1, description="decay per step of an exponential moving average of "
                              "the trained weights (torch.optim.swa_utils.AveragedModel); validation and best/ use "
                              "the average, training continues on the raw weights (last/, with the average beside "
                              "them in last/ema.safetensors for resume; BatchNorm statistics are the raw model's); None = no average")
    # loss
    triplet: float = Field(1.0, ge=0, description="weight of the batch-all triplet loss")
    identity: float = Field(0.0, ge=0, description="weight of the identity (softmax) loss; > 0 adds an identity head")
    margin: float = Field(0.2, ge=0, description="triplet margin (Euclidean distance on L2-normalised embeddings)")
    reducer: Literal["all", "nonzero"] = Field("all", description="mean over all valid triplets (thesis) or the non-zero ones")
    augment: dict | None = Field(None, description="AugmentConfig fields (None = thesis defaults)")
    feature_cache: str | None = Field(None, description="folder of cached backbone feature maps: with "
                                      "model.freeze_backbone, train the necks (and the stages from model.trainable_from) on maps computed once (built "
                                      "on first use, reused by later runs); hflip, rot180 and crop act on the maps, the other augmentations only through feature_cache_views")
    feature_cache_views: int = Field(0, ge=0, le=64, description="with feature_cache: also cache this many "
                                     "augmented views of each training photo (every augmentation of `augment`, "
                                     "one backbone pass per photo and view); each batch item is the plain map "
                                     "or one of its views at random")
    # cross-domain validation (selects the best checkpoint when given)
    val_queries: str | None = Field(None, description="labelled query photos (folder of <label>/ folders), "
                                    "searched against the whole catalog each epoch, e.g. consumer/validation")
    val_mapping: str | None = Field(None, description="CSV label -> catalog values that count as a hit "
                                    "(consumer/catalog_types.csv); needed with val_queries")
    val_field: str = Field("articleType", description="catalog metadata column the mapping's values refer to")
    # run
    out: str = Field("runs/train", description="run folder: metrics.csv, curves.png, config.yaml, last/, best/")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        self.check_cache()
        if bool(self.val_queries) != bool(self.val_mapping):
            raise ValueError("val_queries and val_mapping go together")
        return self

    @property
    def best_metric(self) -> str:
        """The validation column that picks ``best/``: query_top1 with val_queries, else val_top1."""
        return "query_top1" if self.val_queries else "val_top1"



def _set_path(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise UserError(f"--set {dotted!r}: empty key")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif hasattr(child, "model_dump"):
            child = node[key] = child.model_dump()
        elif not isinstance(child, dict):
            raise UserError(f"--set {dotted!r}: {key!r} is a value, not a group of settings")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of ``data`` with each ``"a.b.c=value"`` applied (value parsed by yaml.safe_load:
    ``128`` -> int, ``true`` -> bool, ``[a, b]`` -> list, ``null`` -> None)."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected key=value, e.g. model.neck.dim=128")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item!r}: cannot parse the value ({exc})") from None
        _set_path(out, key.strip(), value)
    return out


def with_model_defaults(data: dict) -> dict:
    """``data`` with the model's defaults under its own ``model`` settings, so that
    ``--set model.neck.dim=128`` edits the default neck (a neck given in the YAML still
    replaces the default neck as a whole)."""
    data = dict(data)
    if isinstance(data.get("model", {}), dict):
        data["model"] = {**ModelConfig().model_dump(mode="json"), **(data.get("model") or {})}
    return data


def load_train_config(path: str | Path | None = None, sets: list[str] | None = None, **overrides) -> TrainConfig:
    """Defaults -> YAML file (if any) -> ``--set`` overrides -> keyword overrides that are not None."""
    data = with_model_defaults(read_yaml_mapping(path) if path is not None else {})
    data = apply_overrides(data, sets or [])
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.load(None, **data)
