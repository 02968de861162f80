"""The neck interface and its registry.

A neck turns a backbone feature map T (N, C, H, W) into a dict of outputs whose ``"embedding"``
entry is an L2-normalised (N, D) tensor, beside whatever else it computes (attention masks,
stripe or ring features, identity logits). A new neck is one module in this package (or a
plugin, :mod:`fashionlens.plugins`)::

    @NECKS.register("my_neck")
    class MyNeck(Neck):
        def __init__(self, in_channels: int, dim: int = 256): ...   # typed settings, defaults
        def forward(self, t): return {"embedding": ...}

and a config ``neck: {type: my_neck, dim: 128}`` builds it: :func:`build_neck` validates the
settings against the constructor's signature and passes the map's channels as ``in_channels``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from fashionlens.errors import UserError
from fashionlens.registry import Registry

Outputs = dict[str, torch.Tensor | list[torch.Tensor]]
NECKS: Registry[type[Neck]] = Registry("neck type", "fashionlens.models.necks")
IDENTITY_LOGITS = "stripe_logits"
"""An output whose key ends with this is a list of identity logits (one per part of the map), which
the identity loss trains beside the identity head; the classifier modules are named ``classifiers``."""


def check_map(t: torch.Tensor, in_channels: int) -> None:
    if t.dim() != 4 or t.shape[1] != in_channels:
        raise ValueError(f"expected a feature map (N, {in_channels}, H, W), got {tuple(t.shape)}")


class Neck(nn.Module):
    """Base of every neck. Subclasses set ``out_dim`` (the embedding's size) in ``__init__``.

    * ``uses_identities``: the constructor takes ``num_classes``, the number of training identities
      (per-part identity classifiers); :func:`build_neck` passes it when the model has them.
    * :meth:`attention_outputs`: the outputs that are spatial attention masks (N, K, h, w), which
      ``fashionlens attention`` draws.
    * :meth:`output_dim`: the width of an embedding-like output (a sub-neck's, for a multi neck).
    """

    out_dim: int | None = None
    uses_identities: ClassVar[bool] = False
    registered_name: ClassVar[str] = ""

    @classmethod
    def _settings(cls, config: Mapping) -> dict:
        """``config``'s settings checked against the constructor (less what the builder supplies)."""
        supplied = ("in_channels", "num_classes") if cls.uses_identities else ("in_channels",)
        return NECKS.arguments(config["type"], {k: v for k, v in config.items() if k != "type"}, supplied)

    @classmethod
    def from_config(cls, config: Mapping, in_channels: int, num_identities: int | None = None) -> Neck:
        """The neck of ``config`` (its ``type`` already resolved to this class)."""
        args = cls._settings(config)
        if cls.uses_identities and num_identities:
            args["num_classes"] = num_identities
        return cls(in_channels, **args)

    @classmethod
    def canonical_config(cls, config: Mapping) -> dict:
        """``config`` with its type under its registered name (an alias such as ``lan`` replaced)
        and its settings checked; a ValueError says what is wrong."""
        out = {**config, "type": NECKS.canonical(str(config["type"]))}
        cls._settings(out)
        return out

    def attention_outputs(self) -> list[str]:
        return []

    def output_dim(self, key: str = "embedding") -> int | None:
        if key != "embedding":
            raise KeyError(f"this neck has no embedding output {key!r}")
        return self.out_dim

    def describe(self) -> str:
        """What the neck is, for messages: its registered name."""
        return type(self).registered_name or type(self).__name__


def register(name: str, *, aliases: tuple[str, ...] = ()):
    """``@register("rings")``: add a :class:`Neck` subclass to :data:`NECKS` under ``name``."""
    def add(cls: type[Neck]) -> type[Neck]:
        cls.registered_name = name
        return NECKS.register(name, aliases=aliases)(cls)
    return add


def neck_class(config: Mapping) -> type[Neck]:
    if not isinstance(config, Mapping) or "type" not in config:
        raise UserError(f"neck config {config!r}: needs a type ({', '.join(NECKS.names())})")
    return NECKS.get(str(config["type"]))


def canonical_neck(config: Mapping) -> dict:
    """A neck config as checkpoints record it: type by its registered name, settings checked."""
    return neck_class(config).canonical_config(config)


def build_neck(config: Mapping, in_channels: int | None = None, num_identities: int | None = None) -> Neck:
    """A neck from a config dict, e.g. ``{"type": "local_alignment", "branches": 4, "dim": 256}``.

    ``in_channels`` comes from the argument or the config's ``"in_channels"``; ``num_identities``
    goes to the necks that classify identities. Unknown type or settings: ValueError."""
    cfg = dict(config)
    channels = cfg.pop("in_channels", in_channels)
    if channels is None:
        raise ValueError("build_neck needs in_channels (argument or config key)")
    try:
        return neck_class(cfg).from_config(cfg, int(channels), num_identities)
    except UserError as exc:
        raise ValueError(str(exc)) from None
