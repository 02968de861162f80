"""Trainable model: backbone feature map -> neck -> optional heads.

* :class:`ModelConfig` - what to build (backbone, neck config, heads), stored in checkpoints.
* :class:`RetrievalModel` - ``forward(x)`` -> dict (``"embedding"`` and the neck's outputs,
  ``"id_logits"`` / ``"attr_logits"`` when heads exist, ``"feature_map"`` on request).
* :class:`EmbeddingOnly` - wraps a model so that ``model(batch)`` is the embedding tensor,
  which is what :class:`fashionlens.models.embedder.Embedder` expects.
* :func:`build_model`. Saving and loading: :mod:`fashionlens.models.checkpoints`.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from fashionlens.config import Config
from fashionlens.errors import UserError
from fashionlens.models.backbones import create_backbone, split_backbone
from fashionlens.models.heads import AttributeHead, IdentityHead
from fashionlens.models.necks import build_neck, canonical_neck


class ModelConfig(Config):
    backbone: str = Field("lite0", description="'lite0' (offline ImageNet EfficientNet-Lite0) or a timm CNN name")
    pretrained: bool = Field(True, description="start from ImageNet weights (timm downloads them for non-lite0 names)")
    input_size: int | None = Field(None, ge=32, le=1024, description="image size; None = the backbone's own (224)")
    neck: dict = Field({"type": "local_alignment", "branches": 4, "dim": 256},
                       description="neck config: its type (gap, local_alignment, stripes, rings, multi, or one of a "
                       "plugin; the list with their settings is below) and its settings")
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
        """The neck's type by its registered name (``lan`` -> ``local_alignment``), settings checked."""
        try:
            return canonical_neck(value)
        except UserError as exc:
            raise ValueError(str(exc)) from None


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

    def output_dim(self, key: str = "embedding") -> int | None:
        """Width of an embedding output: ``"embedding"``, or a sub-neck's (``"gap.embedding"``)."""
        return self.neck.output_dim(key)


class EmbeddingOnly(nn.Module):
    """``forward(x)`` = ``model.embed(x)``: a trained model as an :class:`Embedder` model."""

    def __init__(self, model: RetrievalModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


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
        neck = build_neck(cfg.neck, int(backbone.num_features), cfg.num_identities)
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
