"""Loss terms and their registry: the parts of the retrieval training objective, configured by
name (``losses: {triplet: {weight: 1, margin: 0.2}, identity: {weight: 1}}``) and summed with
their weights (:class:`~fashionlens.losses.combined.WeightedSum`).

A term takes the model's outputs (``"embedding"``, ``"id_logits"``, the neck's outputs) and the
batch's :class:`Targets`; it may ask the model for a head (:meth:`LossTerm.model_settings`) and
report numbers per batch that the trainer averages per epoch into ``metrics.csv``
(:attr:`LossTerm.stat_names`). A new term is one module of this package (or a plugin,
:mod:`fashionlens.plugins`)::

    @LOSS_TERMS.register("my_term")
    class MyTerm(LossTerm):
        def __init__(self, scale: float = 1.0): ...        # typed settings, with defaults
        def forward(self, outputs, targets): return ...    # a scalar tensor
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from fashionlens.errors import UserError
from fashionlens.registry import Registry

LOSS_TERMS: Registry[type[LossTerm]] = Registry("loss term", "fashionlens.losses")
RESERVED = frozenset({"loss", "total", "epoch", "step", "lr", "seconds", "images_per_second", "val_top1", "val_top4",
                      "query_top1", "query_top4"})
"""Names a loss term cannot have: the other columns of metrics.csv."""


@dataclass
class Targets:
    """What a batch's terms are computed against."""

    labels: Tensor  # (N,) identity of each image; -1: a mined negative (never anchor or positive)
    anchor_mask: Tensor | None = None  # (N,) False for images that may only be negatives
    num_classes: int | None = None  # identities with a classifier (labels 0..num_classes-1)


class LossTerm(nn.Module):
    """Base of every loss term."""

    stat_names: ClassVar[tuple[str, ...]] = ()
    reference: ClassVar[dict | None] = None
    """A neck config: the trainer then also runs a frozen reference model (the run's backbone with
    its pretrained weights and this neck, no heads) on every batch, without gradients, and gives
    its embedding as ``outputs["reference"]`` (the ``anchor`` term's)."""

    def model_settings(self, num_identities: int) -> dict:
        """ModelConfig fields this term needs, for a run of ``num_identities`` identities (the
        identity loss: an identity head)."""
        return {}

    def forward(self, outputs: Mapping[str, Tensor], targets: Targets) -> Tensor:
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        """The last batch's numbers named in :attr:`stat_names`."""
        return {}


def check_losses(losses: Mapping) -> dict[str, dict]:
    """``losses`` as a run records it: a mapping of term name -> ``{weight: w > 0, every setting of the
    term}``, each term by its registered name, its settings checked and completed with their defaults,
    and the terms of weight 0 (turned off) left out, so that one objective is always recorded the
    same way; a ValueError says what is wrong."""
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError("losses must map at least one loss term to its settings, e.g. {triplet: {weight: 1}}")
    out = {}
    for name, settings in losses.items():
        settings = {} if settings is None else settings
        if not isinstance(settings, Mapping):
            raise ValueError(f"loss term {name!r}: its settings must be a mapping, e.g. {{weight: 1}}")
        try:
            canonical = LOSS_TERMS.canonical(str(name))
            if canonical in RESERVED or canonical.startswith(("query_", "val_")):
                raise UserError(f"loss term {canonical!r}: the name of a metrics column; register it under another")
            try:
                weight = float(settings.get("weight", 1.0))
            except (TypeError, ValueError):
                raise UserError(f"loss term {name!r}: weight must be a number, got {settings.get('weight')!r}") from None
            if not math.isfinite(weight) or weight < 0:
                raise UserError(f"loss term {name!r}: weight must be finite and >= 0, got {settings.get('weight')}")
            args = LOSS_TERMS.complete(canonical, {k: v for k, v in settings.items() if k != "weight"})
        except UserError as exc:
            raise ValueError(str(exc)) from None
        if weight > 0:
            out[canonical] = {"weight": weight, **args}
    if not out:
        raise ValueError("every loss term has weight 0: nothing would train")
    return out


def build_terms(losses: Mapping[str, Mapping]) -> dict[str, tuple[float, LossTerm]]:
    """name -> (weight, term) for the terms of weight > 0 (config order). A term with trainable
    parameters is refused: the trainer optimises and saves the model's parameters only."""
    terms = {}
    for name, settings in check_losses(losses).items():
        args = LOSS_TERMS.arguments(name, {k: v for k, v in settings.items() if k != "weight"})
        term = LOSS_TERMS.get(name)(**args)
        if any(p.requires_grad for p in term.parameters()):
            raise UserError(f"loss term {name!r} has trainable parameters, which the trainer neither optimises nor "
                            "saves: keep them in a neck or head of the model instead")
        terms[name] = (settings["weight"], term)
    return terms
