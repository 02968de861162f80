"""Retrieval necks: modules that turn a backbone feature map T (N, C, H, W) into embeddings.

Thesis A (same-style clothing retrieval) pools the map in several ways; each way is a neck
here, and every neck returns a dict whose ``"embedding"`` entry is an L2-normalised (N, D)
tensor, plus the neck's intermediate outputs (attention masks, stripe/ring features...).

* :class:`GAPNeck` - global average pooling (the baseline).
* :class:`LocalAlignmentNeck` - K branches of spatial + channel (SE) attention (chapter 3).
* :class:`StripeNeck` - multi-granularity horizontal / vertical stripes, MGN style (chapter 4).
* :class:`RingNeck` - concentric square rings, invariant to 90/180 degree rotation (chapter 4).
* :class:`MultiNeck` - several necks on one map, embeddings concatenated.
* :func:`build_neck` - a neck from a config dict.

No library ships these heads, so the attention branches, the stripe split and the ring masks
are hand-written from the thesis' description (marked "hand-written" below); everything else
is plain torch (pooling, Linear, BatchNorm).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Outputs = dict[str, torch.Tensor | list[torch.Tensor]]


def _check_map(t: torch.Tensor, in_channels: int) -> None:
    if t.dim() != 4 or t.shape[1] != in_channels:
        raise ValueError(f"expected a feature map (N, {in_channels}, H, W), got {tuple(t.shape)}")


class GAPNeck(nn.Module):
    """Global average pooling: ``{"embedding": (N, C)}``, L2-normalised (``normalize=False``:
    the plain mean, the input of a linear classifier such as thesis B's attribute heads, where
    Grad-CAM of a head has a closed form: :func:`fashionlens.explain.cam.linear_gap_cams`)."""

    def __init__(self, in_channels: int, normalize: bool = True):
        super().__init__()
        self.in_channels, self.normalize = in_channels, bool(normalize)
        self.out_dim = in_channels

    def forward(self, t: torch.Tensor) -> Outputs:
        _check_map(t, self.in_channels)
        pooled = t.mean(dim=(2, 3))
        return {"embedding": F.normalize(pooled, dim=1) if self.normalize else pooled}


class LocalAlignmentNeck(nn.Module):
    """Local alignment network (thesis A, 3.x): K attention branches, concatenated.

    Branch i: mask ``M_i = sigmoid(conv1x1_i(T))`` (N, 1, H, W), ``T_i = T * M_i``; SE vector
    ``C_i = sigmoid(FC(ReLU(FC(GAP(T_i)))))`` (C -> C//reduction -> C), ``T_i = T_i * C_i``;
    then ``GAP(T_i)`` and ``Linear(C, dim)``. Output ``{"embedding": (N, K*dim)`` L2-normalised,
    ``"branch_features": (N, K, dim)`` (before normalisation), ``"masks": (N, K, H, W)}``.

    ``spatial=False`` / ``channel=False`` make that step the identity (ablations). With
    ``spatial=False`` there is no mask, so the ``"masks"`` key is *absent* from the output.

    Hand-written. Two shortcuts, both exact: the K 1x1 convs C->1 are one conv C->K, and
    since C_i scales whole channels, ``GAP(T_i * C_i) = GAP(T_i) * C_i`` - so the masked
    map is only ever needed pooled, ``einsum(T, M) / HW``, never as an (N, K, C, H, W) tensor.

    Init: the spatial conv weights are drawn from N(0, 0.01^2) with zero bias, independently
    per branch. Logits then start small (std ~ 0.01 * ||T_hw||), so masks start around 0.5
    but differ per branch, which lets the branches specialise instead of staying identical.
    """

    def __init__(
        self,
        in_channels: int,
        branches: int = 4,
        dim: int = 256,
        reduction: int = 16,
        spatial: bool = True,
        channel: bool = True,
    ):
        super().__init__()
        if branches < 1 or dim < 1 or reduction < 1:
            raise ValueError("branches, dim and reduction must be >= 1")
        self.in_channels, self.branches, self.dim = in_channels, branches, dim
        self.out_dim = branches * dim
        self.spatial = None
        if spatial:
            self.spatial = nn.Conv2d(in_channels, branches, kernel_size=1)
            nn.init.normal_(self.spatial.weight, std=0.01)
            nn.init.zeros_(self.spatial.bias)
        hidden = max(1, in_channels // reduction)
        self.se = None
        if channel:
            self.se = nn.ModuleList(
                nn.Sequential(
                    nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
                    nn.Linear(hidden, in_channels), nn.Sigmoid(),
                )
                for _ in range(branches)
            )
        self.reduce = nn.ModuleList(nn.Linear(in_channels, dim) for _ in range(branches))

    def forward(self, t: torch.Tensor) -> Outputs:
        _check_map(t, self.in_channels)
        n, c, h, w = t.shape
        out: Outputs = {}
        if self.spatial is not None:
            masks = torch.sigmoid(self.spatial(t))  # (N, K, H, W)
            pooled = torch.einsum("nchw,nkhw->nkc", t, masks) / (h * w)  # GAP(T * M_i)
            out["masks"] = masks
        else:
            pooled = t.mean(dim=(2, 3)).unsqueeze(1).expand(n, self.branches, c)
        feats = []
        for i in range(self.branches):
            p = pooled[:, i]
            if self.se is not None:
                p = p * self.se[i](p)  # GAP(T_i * C_i) = GAP(T_i) * C_i
            feats.append(self.reduce[i](p))
        branch = torch.stack(feats, dim=1)  # (N, K, dim)
        out["branch_features"] = branch
        out["embedding"] = F.normalize(branch.flatten(1), dim=1)
        return out


class StripeNeck(nn.Module):
    """Multi-granularity stripes (thesis A, chapter 4; the MGN head layout).

    For each part count p in ``parts`` and each direction ("h": p horizontal bands, top to
    bottom; "v": p vertical bands, left to right), the map is average-pooled to (p, 1) or
    (1, p) - adaptive pooling, so any H, W works. A part count of 1 (the whole map) is taken
    once, not once per direction. Each stripe is reduced to ``dim`` by Linear (= 1x1 conv on
    the pooled cell) + BatchNorm + ReLU: its own reduction per stripe as in MGN, or one
    shared by all stripes with ``share_reduction=True``. With ``num_classes`` each stripe gets
    its own identity classifier. Output ``{"stripes": (N, S, dim), "embedding": (N, S*dim)``
    L2-normalised, ``"stripe_logits": [S x (N, num_classes)]}`` (the last only with
    classifiers). BatchNorm needs N > 1 in training mode.
    """

    def __init__(
        self,
        in_channels: int,
        parts: Sequence[int] = (2, 3),
        directions: Sequence[str] = ("h", "v"),
        dim: int = 256,
        num_classes: int | None = None,
        share_reduction: bool = False,
    ):
        super().__init__()
        if not parts or any(int(p) < 1 for p in parts):
            raise ValueError(f"parts must be positive integers, got {parts!r}")
        if not directions or any(d not in ("h", "v") for d in directions):
            raise ValueError(f"directions must be 'h' and/or 'v', got {directions!r}")
        self.in_channels, self.dim = in_channels, dim
        # (part count, output size of the adaptive pooling) in output order.
        self.splits: list[tuple[int, tuple[int, int]]] = []
        for p in parts:
            for d in directions if p > 1 else directions[:1]:
                self.splits.append((int(p), (int(p), 1) if d == "h" else (1, int(p))))
        self.num_stripes = sum(p for p, _ in self.splits)
        self.out_dim = self.num_stripes * dim

        def reduction() -> nn.Module:
            return nn.Sequential(
                nn.Linear(in_channels, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)
            )

        n_red = 1 if share_reduction else self.num_stripes
        self.reductions = nn.ModuleList(reduction() for _ in range(n_red))
        self.classifiers = None
        if num_classes is not None:
            self.classifiers = nn.ModuleList(
                nn.Linear(dim, num_classes) for _ in range(self.num_stripes)
            )

    def pool(self, t: torch.Tensor) -> torch.Tensor:
        """Average-pooled stripes before reduction: (N, S, C), in output order."""
        _check_map(t, self.in_channels)
        pooled = [F.adaptive_avg_pool2d(t, size).flatten(2) for _, size in self.splits]
        return torch.cat(pooled, dim=2).transpose(1, 2)

    def forward(self, t: torch.Tensor) -> Outputs:
        pooled = self.pool(t)
        stripes = torch.stack(
            [self.reductions[i % len(self.reductions)](pooled[:, i]) for i in range(pooled.shape[1])],
            dim=1,
        )
        out: Outputs = {"stripes": stripes, "embedding": F.normalize(stripes.flatten(1), dim=1)}
        if self.classifiers is not None:
            out["stripe_logits"] = [clf(stripes[:, i]) for i, clf in enumerate(self.classifiers)]
        return out


def ring_index(height: int, width: int, rings: int) -> torch.Tensor:
    """Ring number (0 = centre) of every cell of an H x W map, as an (H, W) long tensor.

    Hand-written. Cell (i, j) has the normalised Chebyshev distance
    ``max(|2i+1-H| / H, |2j+1-W| / W)`` from the map centre (cell centres, each axis scaled by
    its half-size, so it lies in [0, 1)); its ring is ``floor(R * distance)``, i.e. ring r
    holds distances in [r/R, (r+1)/R). Integer arithmetic keeps it exact, so the rings of a
    square map are exactly symmetric under 90/180 degree rotation and flips. Every cell gets
    exactly one ring; raises ValueError when a ring would be empty (R too large for the map).
    """
    if rings < 1:
        raise ValueError("rings must be >= 1")
    rows = (rings * (2 * torch.arange(height) + 1 - height).abs()) // height
    cols = (rings * (2 * torch.arange(width) + 1 - width).abs()) // width
    index = torch.maximum(rows[:, None], cols[None, :])
    empty = sorted(set(range(rings)) - set(index.unique().tolist()))
    if empty:
        raise ValueError(f"{rings} rings on a {height}x{width} map leave ring(s) {empty} empty")
    return index


class RingNeck(nn.Module):
    """Concentric square rings (thesis A, chapter 4): rotation-robust pooling.

    Ring r of an H x W map is given by :func:`ring_index`; each ring is average-pooled over
    its cells (masked mean). The ring masks are built once per (H, W) and cached. With
    ``dim`` one Linear(C, dim), shared by all rings, reduces each ring feature. Output
    ``{"rings": (N, R, C or dim), "embedding": (N, R*(C or dim))`` L2-normalised``}``.
    On square maps the ring features are unchanged by ``torch.rot90(T, k, (2, 3))``.
    """

    def __init__(self, in_channels: int, rings: int = 3, dim: int | None = None):
        super().__init__()
        if rings < 1:
            raise ValueError("rings must be >= 1")
        self.in_channels, self.rings = in_channels, rings
        self.reduce = nn.Linear(in_channels, dim) if dim is not None else None
        self.out_dim = rings * (dim if dim is not None else in_channels)
        self._weights: dict[tuple[int, int], torch.Tensor] = {}  # (H, W) -> (R, H, W) cache

    def ring_weights(self, height: int, width: int) -> torch.Tensor:
        """(R, H, W) weights: 1/|ring| on the ring's cells, 0 elsewhere (rows sum to 1)."""
        key = (height, width)
        if key not in self._weights:
            index = ring_index(height, width, self.rings)
            masks = (index[None] == torch.arange(self.rings)[:, None, None]).float()
            self._weights[key] = masks / masks.sum(dim=(1, 2), keepdim=True)
        return self._weights[key]

    def forward(self, t: torch.Tensor) -> Outputs:
        _check_map(t, self.in_channels)
        weights = self.ring_weights(t.shape[2], t.shape[3]).to(device=t.device, dtype=t.dtype)
        rings = torch.einsum("nchw,rhw->nrc", t, weights)  # masked means
        if self.reduce is not None:
            rings = self.reduce(rings)
        return {"rings": rings, "embedding": F.normalize(rings.flatten(1), dim=1)}


class MultiNeck(nn.Module):
    """Several necks on the same map; their embeddings, each scaled by its weight, are
    concatenated and L2-normalised into ``"embedding"``. Every neck's own outputs are kept
    as ``"<name>.<key>"``. A weight w scales that neck's share of the squared distance by w^2.
    """

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

    def forward(self, t: torch.Tensor) -> Outputs:
        out: Outputs = {}
        parts = []
        for name, neck in self.necks.items():
            sub = neck(t)
            out.update({f"{name}.{key}": value for key, value in sub.items()})
            parts.append(self.weights[name] * sub["embedding"])
        out["embedding"] = F.normalize(torch.cat(parts, dim=1), dim=1)
        return out


NECK_TYPES = ("gap", "lan", "stripes", "rings", "multi")


def build_neck(config: Mapping, in_channels: int | None = None) -> nn.Module:
    """A neck from a config dict, e.g. ``{"type": "lan", "branches": 4, "dim": 256}``.

    ``in_channels`` comes from the argument or the config's ``"in_channels"``. Other keys are
    the neck's keyword arguments; ``{"type": "multi", "necks": {name: config}, "weights":
    {name: w}}`` builds a :class:`MultiNeck`. Unknown type -> ValueError.
    """
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind not in NECK_TYPES:
        raise ValueError(f"unknown neck type {kind!r}; valid types: {', '.join(NECK_TYPES)}")
    channels = cfg.pop("in_channels", in_channels)
    if channels is None:
        raise ValueError("build_neck needs in_channels (argument or config key)")
    if kind == "multi":
        subs = {name: build_neck(sub, channels) for name, sub in cfg.pop("necks", {}).items()}
        return MultiNeck(subs, **cfg)
    cls = {"gap": GAPNeck, "lan": LocalAlignmentNeck, "stripes": StripeNeck, "rings": RingNeck}[kind]
    return cls(channels, **cfg)
