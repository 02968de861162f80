"""Training settings: :class:`TrainConfig` (``fashionlens train``) and :class:`AttributeTrainConfig`
(``fashionlens train-attributes``), loadable from YAML with ``--set a.b=value`` overrides.

Settings renamed since earlier versions keep working under their old names, in YAML files, in
``--set`` and in the ``config.yaml`` of old run folders (:data:`RENAMED`): ``p`` / ``k`` are
``identities_per_batch`` / ``images_per_identity``, and the loss weights ``triplet`` / ``identity``
with ``margin`` and ``reducer`` are settings of the loss terms under ``losses``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fashionlens.config import Config, apply_overrides, read_yaml_mapping
from fashionlens.data.fashionai import MAYBE_POLICIES
from fashionlens.errors import UserError
from fashionlens.losses.terms import LOSS_TERMS, check_losses
from fashionlens.models.builder import ModelConfig
from fashionlens.models.checkpoints import CheckpointPath
from fashionlens.models.necks import NECKS
from fashionlens.plugins import load_plugins

DEFAULT_LOSSES = {"triplet": {"weight": 1.0, "margin": 0.2, "reducer": "all"}}
RENAMED = {"p": "identities_per_batch", "k": "images_per_identity", "triplet": "losses.triplet.weight",
           "identity": "losses.identity.weight", "margin": "losses.triplet.margin", "reducer": "losses.triplet.reducer"}
"""Old setting name -> where it lives now (a dotted path)."""


def _nested(data: dict, dotted: str):
    """The value at ``dotted`` in ``data`` (None when a part is missing)."""
    node = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _absent_term(data: dict, target: str) -> str | None:
    """The loss term a setting path ``losses.<term>.<setting>`` belongs to when ``data`` lacks that
    term and the setting is not its weight (an old name such as ``margin`` may not add a term)."""
    parts = target.split(".")
    if len(parts) == 3 and parts[0] == "losses" and parts[2] != "weight" and _nested(data, f"losses.{parts[1]}") is None:
        return parts[1]
    return None


def _nested_set(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"config setting {dotted!r}: {key!r} is not a group of settings")
    node[last] = value


def migrate(data: dict, renamed: dict[str, str], defaults: dict[str, object]) -> dict:
    """``data`` with each old setting name of ``renamed`` moved to its new place (``defaults``: the
    groups to start from when an old name moves into a group the data does not give). An old name
    given beside its new one is refused, and so is a setting of a loss term the config does not
    have (``margin`` without a triplet term): only a weight adds a term."""
    old = [key for key in renamed if key in data]
    if not old:
        return data
    given, data = data, copy.deepcopy(data)
    for key in old:
        target = renamed[key]
        group, *rest = target.split(".")
        if _nested(given, target) is not None:
            raise UserError(f"config: {key} and {target} name the same setting ({key} is its old name): give one")
        if rest and group not in data and group in defaults:
            data[group] = copy.deepcopy(defaults[group])
        if term := _absent_term(data, target):
            raise UserError(f"config: {key} is a setting of the {term} loss term ({target}), which these losses "
                            "do not have")
        _nested_set(data, target, data.pop(key))
    return data


def migrate_sets(sets: list[str], renamed: dict[str, str], prefix: str = "") -> list[str]:
    """``--set`` overrides with old setting names (under ``prefix``, e.g. ``train.``) renamed."""
    out = []
    for item in sets or []:
        key, sep, value = item.partition("=")
        name = key.strip()
        if sep and name.startswith(prefix) and name[len(prefix):] in renamed:
            name = prefix + renamed[name[len(prefix):]]
        out.append(f"{name}{sep}{value}" if sep else item)
    return out


class RunSettings(Config):
    """Where and how a training run runs: the settings every trainer shares (listed last)."""

    plugins: list[str] = Field([], description="modules or .py files of your own necks and loss terms, imported "
                               "before the run (fashionlens.plugins); recorded in its checkpoints")
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
        then the shared ones; required ones marked; then the registered neck types."""
        shared = tuple(RunSettings.model_fields)
        return "\n\n".join(ModelConfig.help_lines("model.") + cls.help_lines(skip=("model", *shared))
                           + RunSettings.help_lines()
                           + [f"neck types: {NECKS.describe(skip=('in_channels', 'num_classes'))}"])


SelectMetric = Literal["auto", "query_macro_top4", "query_macro_top1", "query_worst_top4", "query_top1", "query_top4",
                       "val_top1", "val_top4"]


class TrainConfig(RunSettings):
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model to train (see ModelConfig); "
                               "num_identities is set by the trainer when a loss term asks for an identity head")
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
    identities_per_batch: int = Field(7, ge=2, description="P of the P x K batches: identities per batch (old name p)")
    images_per_identity: int = Field(10, ge=2, description="K of the P x K batches: images per identity in a batch "
                                     "(old name k)")
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
    losses: dict[str, dict] = Field(default_factory=lambda: copy.deepcopy(DEFAULT_LOSSES), description=(
        "loss terms summed with their weights, each {weight: w, its settings}, replacing the default as a whole "
        "(triplet: batch-all triplet loss, margin on the Euclidean distance of L2-normalised embeddings, reducer "
        "'all' (the method's mean over all valid triplets) or 'nonzero'; identity: softmax loss of an identity "
        "head; old names: triplet, identity (their weights), margin, reducer). Terms: "
        "triplet(margin=0.2, reducer='all'), identity(label_smoothing=0.0), anchor() (keeps the batch's "
        "similarities close to the untrained backbone's pooled feature), or a plugin's"))
    augment: dict | None = Field(None, description="AugmentConfig fields (None = the retrieval method's defaults)")
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
    select: SelectMetric = Field("auto", description=(
        "validation column that picks best/ (and adapt's handed-over round): auto = query_macro_top4 with "
        "val_queries (each garment type's top-4 weighs the same, so a model that trades rare types for "
        "common ones cannot win it), else val_top1; query_top1 = overall top-1 (the choice before 2026-12-07)"))
    # run
    out: str = Field("runs/train", description="run folder: metrics.csv, curves.png, config.yaml, last/, best/")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data):
        return migrate(data, RENAMED, {"losses": DEFAULT_LOSSES}) if isinstance(data, dict) else data

    @field_validator("losses")
    @classmethod
    def _losses(cls, value: dict) -> dict:
        return check_losses(value)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        self.check_cache()
        if bool(self.val_queries) != bool(self.val_mapping):
            raise ValueError("val_queries and val_mapping go together")
        if self.select.startswith("query_") and not self.val_queries:
            raise ValueError(f"select={self.select} needs val_queries (labelled query photos)")
        return self

    @property
    def best_metric(self) -> str:
        """The validation column that picks ``best/`` (``select``; auto: query_macro_top4 with
        val_queries, else val_top1)."""
        if self.select != "auto":
            return self.select
        return "query_macro_top4" if self.val_queries else "val_top1"

    @classmethod
    def help_text(cls) -> str:
        return super().help_text() + f"\n\nloss terms: {LOSS_TERMS.describe()}"


ATTRIBUTE_AUGMENT = {"rot180": 0.0, "erase": 0.0, "crop": 0.5, "crop_min": 0.6}
"""The attribute method's random crop and rotation; no 180 degree turn or erasing (they change what is seen)."""
POINTING_SETTINGS = ("pointing_loss", "pointing_cells")
"""Settings a resumed attribute run must share with its checkpoint (runs saved before they existed: the defaults)."""


def _attribute_model() -> ModelConfig:
    return ModelConfig(neck={"type": "gap", "normalize": False})


class AttributeTrainConfig(RunSettings):
    model: ModelConfig = Field(default_factory=_attribute_model, description="backbone and settings (see "
                               "ModelConfig); neck: gap without normalisation; attributes are set from the data")
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
                                           "probability 0.5 each epoch (the method's); positive / negative / half = 1 / 0 / 0.5")
    loss: Literal["sigmoid", "softmax"] = Field("sigmoid", description="sigmoid cross-entropy per value "
                                                "(the method's) or softmax cross-entropy per attribute")
    threshold: float = Field(0.6, gt=0, lt=1, description="precision is measured at this score")
    epochs: int = Field(10, ge=1, description="total epochs (a resumed run continues up to this number; the "
                        "cosine schedule spans them, so raising it on resume changes the remaining rates)")
    batch_size: int = Field(32, ge=2, description="images per batch")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd (momentum 0.9, the method's) or adam (AdamW)")
    lr: float = Field(0.01, gt=0, description="learning rate (peak of the schedule)")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning rate per epoch")
    augment: dict | None = Field(None, description=f"AugmentConfig fields (None = {ATTRIBUTE_AUGMENT} over "
                                 "the retrieval method's defaults)")
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


def with_model_defaults(data: dict, model: ModelConfig | None = None) -> dict:
    """``data`` with the model's defaults under its own ``model`` settings, so that
    ``--set model.neck.dim=128`` edits the default neck (a neck given in the YAML still
    replaces the default neck as a whole)."""
    data = dict(data)
    if isinstance(data.get("model", {}), dict):
        data["model"] = {**(model or ModelConfig()).model_dump(mode="json"), **(data.get("model") or {})}
    return data


def prepared(data: dict, sets: list[str] | None, overrides: dict, model: ModelConfig | None = None,
             renamed: dict[str, str] | None = None) -> dict:
    """YAML data -> old names migrated -> model (and loss) defaults filled in -> ``--set`` overrides
    -> keyword overrides that are not None; its plugins imported (they may register the neck)."""
    if renamed:
        data = migrate(data, renamed, {"losses": DEFAULT_LOSSES})
        data.setdefault("losses", copy.deepcopy(DEFAULT_LOSSES))
    data = with_model_defaults(data, model)
    for item in sets or []:
        new = migrate_sets([item], renamed or {})[0]
        if new != item and (term := _absent_term(data, new.partition("=")[0].strip())):
            raise UserError(f"--set {item!r}: a setting of the {term} loss term, which these losses do not have")
        data = apply_overrides(data, [new])
    data.update({k: v for k, v in overrides.items() if v is not None})
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list):
        raise UserError("config setting 'plugins': a list of modules or .py files")
    load_plugins(plugins)
    return data


def load_train_config(path: str | Path | None = None, sets: list[str] | None = None, **overrides) -> TrainConfig:
    """Defaults -> YAML file (if any) -> ``--set`` overrides -> keyword overrides that are not None."""
    data = read_yaml_mapping(path) if path is not None else {}
    return TrainConfig.load(None, **prepared(data, sets, overrides, renamed=RENAMED))


def load_attribute_config(path: str | Path | None = None, sets: list[str] | None = None,
                          **overrides) -> AttributeTrainConfig:
    """Defaults -> YAML -> ``--set`` overrides -> keyword overrides that are not None."""
    data = read_yaml_mapping(path) if path is not None else {}
    return AttributeTrainConfig.load(None, **prepared(data, sets, overrides, model=_attribute_model()))
