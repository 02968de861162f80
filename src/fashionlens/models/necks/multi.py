"""Several necks on one map, their embeddings concatenated (e.g. global pooling + local alignment)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fashionlens.errors import UserError
from fashionlens.models.necks.base import Neck, Outputs, neck_class, register


@register("multi")
class MultiNeck(Neck):
    """Several necks on the same map; their embeddings, each scaled by its weight, are
    concatenated and L2-normalised into ``"embedding"``. Every neck's own outputs are kept
    as ``"<name>.<key>"``. A weight w scales that neck's share of the squared distance by w^2.

    Config: ``{"type": "multi", "necks": {name: neck config}, "weights": {name: w}}``.
    """

    uses_identities = True  # passed on to the necks that classify identities

    def __init__(self, necks: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None):
        super().__init__()
        if not necks:
            raise ValueError("MultiNeck needs at least one neck")
        weights = dict(weights or {})
        unknown = set(weights) - set(necks)
        if unknown:
            raise ValueError(f"weights for unknown necks: {sorted(unknown)}")
        self.necks = nn.ModuleDict(dict(necks))
        self.weights = {name: float(weights.get(name, 1.0)) for name in necks}
        self.out_dim = sum(getattr(m, "out_dim", 0) for m in necks.values()) or None

    @classmethod
    def _parts(cls, config: Mapping) -> tuple[dict, dict]:
        unknown = set(config) - {"type", "necks", "weights"}
        if unknown:
            raise UserError(f"neck type 'multi': unknown settings {sorted(unknown)} (its settings: necks, weights)")
        necks = config.get("necks") or {}
        if not isinstance(necks, Mapping) or not all(isinstance(sub, Mapping) for sub in necks.values()):
            raise UserError("neck type 'multi': necks must map names to neck configs")
        weights = config.get("weights") or {}
        if not isinstance(weights, Mapping):
            raise UserError("neck type 'multi': weights must map neck names to numbers")
        return dict(necks), dict(weights)

    @classmethod
    def from_config(cls, config: Mapping, in_channels: int, num_identities: int | None = None) -> MultiNeck:
        necks, weights = cls._parts(config)
        try:
            return cls({name: neck_class(sub).from_config(sub, in_channels, num_identities)
                        for name, sub in necks.items()}, weights={k: float(v) for k, v in weights.items()})
        except (TypeError, ValueError) as exc:
            raise UserError(f"neck type 'multi': {exc}") from None

    @classmethod
    def canonical_config(cls, config: Mapping) -> dict:
        necks, _ = cls._parts(config)
        return {**config, "necks": {name: neck_class(sub).canonical_config(sub) for name, sub in necks.items()}}

    def forward(self, t: torch.Tensor) -> Outputs:
        out: Outputs = {}
        parts = []
        for name, neck in self.necks.items():
            sub = neck(t)
            out.update({f"{name}.{key}": value for key, value in sub.items()})
            parts.append(self.weights[name] * sub["embedding"])
        out["embedding"] = F.normalize(torch.cat(parts, dim=1), dim=1)
        return out

    def attention_outputs(self) -> list[str]:
        return [f"{name}.{key}" for name, neck in self.necks.items()
                for key in (neck.attention_outputs() if isinstance(neck, Neck) else [])]

    def output_dim(self, key: str = "embedding") -> int | None:
        if key == "embedding":
            return self.out_dim
        name, _, rest = key.partition(".")
        if name not in self.necks:
            raise KeyError(f"no neck {name!r} in this multi neck ({', '.join(self.necks)})")
        return self.necks[name].output_dim(rest)

    def describe(self) -> str:
        return "multi: " + ", ".join(f"{name}={neck.describe() if isinstance(neck, Neck) else type(neck).__name__}"
                                     for name, neck in self.necks.items())
