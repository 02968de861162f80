"""Starting a run from the weights of another checkpoint (``init``): retrieval runs and attribute
runs, checked against the frozen stages a feature cache holds."""

from __future__ import annotations

from pathlib import Path

import torch

from fashionlens.errors import UserError
from fashionlens.models.builder import ModelConfig
from fashionlens.models.checkpoints import is_checkpoint, load_checkpoint


def is_classifier(key: str) -> bool:
    """Identity classifiers: the id head and the necks' part classifiers (one class per identity)."""
    return key.startswith("id_head.") or ".classifiers." in key


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


def init_weights(model: torch.nn.Module, init: str | Path, model_cfg: ModelConfig, identities: list[str] | None,
                 cached: bool = False) -> None:
    """Copy the weights of checkpoint ``init`` into a retrieval ``model`` (same backbone, input size
    and neck; its identity classifiers only when trained on the same ``identities``). With ``cached``
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
        state = {k: v for k, v in state.items() if not is_classifier(k)}
    if cached:
        check_frozen_stages(model, state, init)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_classifier(k)]
    if missing or unexpected:
        raise UserError(f"{init}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")


def init_from(model: torch.nn.Module, init: str | Path, model_cfg: ModelConfig, cached: bool = False) -> None:
    """Copy the weights of checkpoint ``init`` into an attribute ``model``: its backbone (any fashionlens
    model of the same backbone and input size: a retrieval run, another attribute run), and its
    attribute heads too when they are of the same attributes and values (a linear probe's heads
    start a fine-tuning run: "linear probing, then fine-tuning")."""
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
