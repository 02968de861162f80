"""Trainable retrieval model: backbone feature map -> neck -> optional heads; checkpoints.

* :class:`ModelConfig` - what to build (backbone, neck config, heads), stored in checkpoints.
* :class:`RetrievalModel` - ``forward(x)`` -> dict (``"embedding"`` and the neck's outputs,
  ``"id_logits"`` / ``"attr_logits"`` when heads exist, ``"feature_map"`` on request).
* :class:`EmbeddingOnly` - wraps a model so that ``model(batch)`` is the embedding tensor,
  which is what :class:`fashionlens.models.embedder.Embedder` expects.
* :func:`build_model`, :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`is_checkpoint`,
  :func:`resolve_checkpoint` (a run folder -> its chosen checkpoint).

A checkpoint is a folder with ``model.safetensors`` (the state_dict; never a pickle) and
``config.json`` (``{"model": ModelConfig, "extra": {...}, "checkpoint_id": ...}``). Each
file is written to a temporary name and renamed into place; both carry the same random
``checkpoint_id`` so that a save interrupted between the two renames is detected on load.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from fashionlens.config import Config
from fashionlens.errors import UserError
from fashionlens.models.backbones import create_backbone, is_model_name, split_backbone
from fashionlens.models.heads import AttributeHead, IdentityHead
from fashionlens.models.necks import NECK_TYPES, build_neck

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ModelConfig(Config):
    backbone: str = Field("lite0", description="'lite0' (offline ImageNet EfficientNet-Lite0) or a timm CNN name")
    pretrained: bool = Field(True, description="start from ImageNet weights (timm downloads them for non-lite0 names)")
    input_size: int | None = Field(None, ge=32, le=1024, description="image size; None = the backbone's own (224)")
    neck: dict = Field({"type": "lan", "branches": 4, "dim": 256},
                       description=f"neck config: type ({', '.join(NECK_TYPES)}) and its arguments")
    num_identities: int | None = Field(None, ge=1, description="adds an identity (BNNeck softmax) head when set")
    attributes: dict[str, list[str]] | None = Field(None, description="attribute -> values; adds an attribute head")
    freeze_backbone: bool = Field(False, description="no gradients into the backbone, its BatchNorms kept in eval")
    freeze_batchnorm: bool = Field(False, description="the backbone's BatchNorms keep their ImageNet running "
                                   "statistics (eval mode) while everything trains; for small batches and "
                                   "for a target domain other than the training photos")
    trainable_from: str | None = Field(None, description="with freeze_backbone: the backbone stage from which "
                                       "it trains again (e.g. blocks.6 for lite0, layer4 for a ResNet); the "
                                       "stages before stay frozen, and feature_cache stores their output")

    @model_validator(mode="after")
    def _trainable_from_needs_freeze(self) -> ModelConfig:
        if self.trainable_from and not self.freeze_backbone:
            raise ValueError("trainable_from needs freeze_backbone: true (the stages before it are the frozen part)")
        return self

    @field_validator("neck")
    @classmethod
    def _neck_type(cls, value: dict) -> dict:
        if value.get("type") not in NECK_TYPES:
            raise ValueError(f"neck type must be one of {', '.join(NECK_TYPES)}")
        return value


class RetrievalModel(nn.Module):
    """Backbone used as a feature-map extractor (timm ``forward_features``) + neck + heads."""

    def __init__(self, backbone: nn.Module, neck: nn.Module, id_head: nn.Module | None = None,
                 attr_head: nn.Module | None = None, freeze_backbone: bool = False,
                 freeze_batchnorm: bool = False, trainable_from: str | None = None, input_size: int = 64):
        super().__init__()
        self.backbone, self.neck = backbone, neck
        self.id_head, self.attr_head = id_head, attr_head
        self.embedding_dim = getattr(neck, "out_dim", None)
        self.data_config: dict = {}  # set by build_model: timm's input size / mean / std
        self.freeze_backbone, self.freeze_batchnorm = freeze_backbone, freeze_batchnorm
        # (frozen stages, trainable stages) of the backbone when it is split; a plain tuple, so
        # that the modules are not registered twice (the state_dict keeps the backbone's names)
        self._split: tuple[nn.Sequential, nn.Sequential] | None = None
        if trainable_from:
            self._split = split_backbone(backbone, trainable_from, input_size)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
            if self._split is not None:
                self._split[1].requires_grad_(True)
                self._train_tail(True)

    def _train_tail(self, mode: bool) -> None:
        tail = self._split[1]
        tail.train(mode)
        if self.freeze_batchnorm:
            for module in tail.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def train(self, mode: bool = True) -> RetrievalModel:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen BatchNorm statistics stay frozen
            if self._split is not None:
                self._train_tail(mode)
        elif self.freeze_batchnorm:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def cached_map(self, x: torch.Tensor) -> torch.Tensor:
        """What a feature cache stores for images ``x``: the frozen stages' output."""
        return self._split[0](x) if self._split is not None else self.feature_map(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        t = self._split[1](self._split[0](x)) if self._split is not None else self.backbone.forward_features(x)
        if t.dim() != 4:
            raise ValueError(f"the backbone gives features of shape {tuple(t.shape)}, not a CNN "
                             "feature map (N, C, H, W); use a convolutional backbone")
        return t

    def forward(self, x: torch.Tensor, return_map: bool = False, from_map: bool = False) -> dict:
        """Outputs for images ``x``; with ``from_map=True`` ``x`` is already the backbone's
        feature map (cached maps of a frozen backbone), and only the neck and heads run."""
        if from_map:  # a cached map: the frozen stages' output
            t = self._split[1](x) if self._split is not None else x
        else:
            t = self.feature_map(x)
        out = dict(self.neck(t))
        if self.id_head is not None:
            out["id_logits"] = self.id_head(out["embedding"])
        if self.attr_head is not None:
            out["attr_logits"] = self.attr_head(out["embedding"])
        if return_map:
            out["feature_map"] = t
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised embedding (N, D) alone (no heads computed)."""
        return self.neck(self.feature_map(x))["embedding"]


class EmbeddingOnly(nn.Module):
    """``forward(x)`` = ``model.embed(x)``: a trained model as an :class:`Embedder` model."""

    def __init__(self, model: RetrievalModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


def _stripe_classes(neck: dict, num_identities: int | None) -> dict:
    """The neck config with ``num_classes = num_identities`` for every stripes neck (thesis A:
    each stripe has its own identity classifier, over the same identities as the model's)."""
    if not num_identities:
        return neck
    neck = dict(neck)
    if neck.get("type") == "stripes":
        neck["num_classes"] = num_identities
    elif neck.get("type") == "multi":
        neck["necks"] = {name: _stripe_classes(sub, num_identities) for name, sub in neck.get("necks", {}).items()}
    return neck


def build_model(cfg: ModelConfig) -> tuple[RetrievalModel, dict]:
    """The model for ``cfg`` and timm's data config (input_size / mean / std ...) for it.

    The backbone is :func:`create_backbone`'s (classifier removed); the model only ever calls
    its ``forward_features``, so its pooling is unused and has no weights.
    """
    backbone, data_cfg = create_backbone(cfg.backbone, pretrained=cfg.pretrained)
    data_cfg = dict(data_cfg)
    if cfg.input_size is not None:
        data_cfg["input_size"] = (3, cfg.input_size, cfg.input_size)
    try:
        neck = build_neck(_stripe_classes(cfg.neck, cfg.num_identities), int(backbone.num_features))
    except (ValueError, TypeError) as exc:
        raise UserError(f"neck config {cfg.neck!r}: {exc}") from None
    dim = getattr(neck, "out_dim", None)
    if dim is None and (cfg.num_identities or cfg.attributes):
        raise UserError("this neck does not declare its embedding size (out_dim); heads need it")
    id_head = IdentityHead(dim, cfg.num_identities) if cfg.num_identities else None
    try:
        attr_head = AttributeHead(dim, cfg.attributes) if cfg.attributes else None
    except ValueError as exc:
        raise UserError(f"attributes: {exc}") from None
    model = RetrievalModel(backbone, neck, id_head, attr_head, cfg.freeze_backbone, cfg.freeze_batchnorm,
                           cfg.trainable_from, int(data_cfg["input_size"][-1]))
    model.data_config = data_cfg
    return model, data_cfg


def _tensors_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict on CPU, contiguous, with no two entries sharing memory (safetensors
    refuses shared storage; a tied weight is stored twice and loads back into both keys)."""
    seen: set[int] = set()
    out = {}
    for key, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def _json_default(obj):
    if hasattr(obj, "tolist"):  # numpy arrays / scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"checkpoint extra: {type(obj).__name__} is not JSON serialisable")


def _replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def save_checkpoint(path_dir: str | Path, model: RetrievalModel, cfg: ModelConfig,
                    extra: dict | None = None) -> Path:
    """Write ``path_dir/model.safetensors`` + ``path_dir/config.json``; returns the folder.

    ``extra`` (epoch, metrics, data config ...) must be JSON-serialisable (numpy / torch
    values are converted). Other files in the folder are left alone.
    """
    folder = Path(path_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: a checkpoint is a folder, and this is a file")
    folder.mkdir(parents=True, exist_ok=True)
    ckpt_id = uuid.uuid4().hex
    doc = {"format": "fashionlens-checkpoint", "version": 1, "checkpoint_id": ckpt_id,
           "model": cfg.model_dump(mode="json"), "extra": dict(extra or {})}
    text = json.dumps(doc, indent=2, default=_json_default)  # fails before anything is written
    suffix = f".tmp-{os.getpid()}"
    weights_tmp = folder / (WEIGHTS_FILE + suffix)
    config_tmp = folder / (CONFIG_FILE + suffix)
    try:
        save_file(_tensors_for_saving(model), str(weights_tmp),
                  metadata={"format": "pt", "checkpoint_id": ckpt_id})
        config_tmp.write_text(text + "\n")
        _replace(weights_tmp, folder / WEIGHTS_FILE)
        _replace(config_tmp, folder / CONFIG_FILE)
    finally:
        for tmp in (weights_tmp, config_tmp):
            tmp.unlink(missing_ok=True)
    return folder


def _files(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    return (p / WEIGHTS_FILE, p / CONFIG_FILE) if p.is_dir() else (p, p.parent / CONFIG_FILE)


def is_checkpoint(path: str | Path) -> bool:
    """A folder with ``model.safetensors`` + ``config.json``, or a ``.safetensors`` file
    with a ``config.json`` beside it."""
    weights, config = _files(path)
    return weights.suffix == ".safetensors" and weights.is_file() and config.is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint a user means by ``path``: a checkpoint itself; a ``fashionlens train`` run
    folder (its ``best/``); or a ``fashionlens adapt`` run folder (the round its ``best.json``
    hands over: ``round-N/train/best``, or the recorded model, e.g. round 0's ``init``; a
    UserError when it names none that exists). Anything else is returned unchanged, for the
    caller's own message (a model name such as ``lite0``)."""
    p = Path(path)
    if is_checkpoint(p) or not p.is_dir():
        return p
    best_json = p / "best.json"
    if best_json.is_file():  # an adapt run
        try:
            doc = json.loads(best_json.read_text())
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict):
            found = [p / f"round-{doc['round']}" / "train" / "best"] if isinstance(doc.get("round"), int) else []
            found += [Path(doc["model"])] if isinstance(doc.get("model"), str) else []
            for candidate in found:
                if is_checkpoint(candidate):
                    return candidate
            if found:
                raise UserError(f"{best_json} hands over {found[-1]}, which is not a checkpoint here (a relative "
                                "path is read from the current folder)")
    return p / "best" if is_checkpoint(p / "best") else p


def chosen_model(name: str) -> str:
    """A model as a user names it, as it should be recorded: a train / adapt run folder becomes the
    checkpoint it chose (:func:`resolve_checkpoint`); a checkpoint, a model name (``lite0``, a timm
    name, even where a folder of that name exists) and anything else stay as they are."""
    # the file-system checks first: listing timm's models is the slow one, and most names are no folder
    if is_checkpoint(name) or not Path(name).is_dir() or is_model_name(str(name)):
        return name
    chosen = resolve_checkpoint(name)
    return str(chosen) if is_checkpoint(chosen) else name


# a config field naming a checkpoint: a run folder given there is stored as the checkpoint it chose
CheckpointPath = Annotated[str, AfterValidator(chosen_model)]


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[RetrievalModel, ModelConfig, dict]:
    """(model in eval mode, its config, the saved extra) from a checkpoint folder or its
    ``.safetensors`` file. The model is built with ``pretrained=False`` and the weights
    loaded strictly; any mismatch is a :class:`UserError`."""
    weights, config = _files(path)
    if not is_checkpoint(path):
        raise UserError(f"{path}: not a model checkpoint (needs {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        doc = json.loads(config.read_text())
        cfg = ModelConfig(**{**doc["model"], "pretrained": False})
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        raise UserError(f"{config}: not a valid checkpoint config ({exc})") from None
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as fh:
            saved_id = (fh.metadata() or {}).get("checkpoint_id")
            state = {key: fh.get_tensor(key) for key in fh.keys()}
    except (OSError, SafetensorError) as exc:
        raise UserError(f"{weights}: cannot read the weights ({exc})") from None
    if doc.get("checkpoint_id") and saved_id and saved_id != doc["checkpoint_id"]:
        raise UserError(f"{weights.parent}: {weights.name} and {config.name} come from different "
                        "saves (an interrupted save?)")
    model, _ = build_model(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        detail = " ".join(line.strip() for line in lines[:4]) + (" ..." if len(lines) > 4 else "")
        raise UserError(f"{weights}: the weights do not fit the model of {config.name} ({detail})") from None
    cfg = cfg.model_copy(update={"pretrained": bool(doc["model"].get("pretrained", True))})
    return model.to(device).eval(), cfg, doc.get("extra", {})
