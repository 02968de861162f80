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


@dataclass
class Targets:
    """What a batch's terms are computed against."""

    labels: Tensor  # (N,) identity of each image; -1: a mined negative (never anchor or positive)
    anchor_mask: Tensor | None = None  # (N,) False for images that may only be negatives
    num_classes: int | None = None  # identities with a classifier (labels 0..num_classes-1)


class LossTerm(nn.Module):
    """Base of every loss term."""

    stat_names: ClassVar[tuple[str, ...]] = ()

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
    """``losses`` with each term by its registered name and its settings checked: a mapping of
    term name -> ``{weight: w >= 0, other settings of the term}``; a ValueError says what is wrong."""
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError("losses must map at least one loss term to its settings, e.g. {triplet: {weight: 1}}")
    out = {}
    for name, settings in losses.items():
        settings = {} if settings is None else settings
        if not isinstance(settings, Mapping):
            raise ValueError(f"loss term {name!r}: its settings must be a mapping, e.g. {{weight: 1}}")
        try:
            canonical = LOSS_TERMS.canonical(str(name))
            weight = float(settings.get("weight", 1.0))
            if not math.isfinite(weight) or weight < 0:
                raise UserError(f"loss term {name!r}: weight must be finite and >= 0, got {settings.get('weight')}")
            args = {k: v for k, v in settings.items() if k != "weight"}
            LOSS_TERMS.arguments(canonical, args)
        except (UserError, TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        out[canonical] = {"weight": weight, **args}
    if not any(s["weight"] > 0 for s in out.values()):
        raise ValueError("every loss term has weight 0: nothing would train")
    return out


def build_terms(losses: Mapping[str, Mapping]) -> dict[str, tuple[float, LossTerm]]:
    """name -> (weight, term) for the terms of weight > 0 (config order)."""
    terms = {}
    for name, settings in check_losses(losses).items():
        if settings["weight"] > 0:
            args = LOSS_TERMS.arguments(name, {k: v for k, v in settings.items() if k != "weight"})
            terms[name] = (settings["weight"], LOSS_TERMS.get(name)(**args))
    return terms
