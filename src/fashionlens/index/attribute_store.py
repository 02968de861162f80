"""Attributes stored beside each item of an index (docs/METHODS.md, attributes), as
``fashionlens index-attributes`` (:mod:`.attribute_indexing`) writes them, and reading them back.

For every searchable item, the attribute classifier's explainer
(:class:`fashionlens.explain.explainer.AttributeExplainer`) gives, per attribute, the
predicted value, its confidence, every value's score, the CAM box (in the item photo's own
pixels) and the pooled feature of that box. They go to the store's ``item_attributes`` table
(one row per item and attribute; see :mod:`fashionlens.index.store`): scores as float16, the
feature as float16 after a fixed random orthonormal projection to ``feature_dim`` dimensions
(1,280 x 26 floats an item would not scale to millions of items). A random projection to d
dimensions approximately preserves cosine similarity (Johnson-Lindenstrauss; the error is of
order 1/sqrt(d), about 0.1 at d = 128); ``feature_dim: 0`` stores the full vector. The
projection is rebuilt from its seed and shape, recorded in the meta key ``attributes`` with the
model's checkpoint, schema, loss and box threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashionlens.errors import UserError
from fashionlens.explain.explainer import AttributeExplainer
from fashionlens.explain.wording import display_name, find_attribute
from fashionlens.models.checkpoints import load_attribute_classifier

META_KEY = "attributes"


def projection_matrix(full_dim: int, dim: int, seed: int) -> np.ndarray:
    """(full_dim, dim) with orthonormal columns: Q of the QR of a seeded Gaussian matrix, signs
    fixed by R's diagonal so that Q is unique (the same on any LAPACK)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((full_dim, dim)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _check(matrix: np.ndarray) -> float:
    return round(float(matrix[:16].astype(np.float64).sum()), 5)


def projection_spec(full_dim: int, dim: int, seed: int) -> dict:
    if dim == 0 or dim >= full_dim:
        return {"full_dim": full_dim, "dim": full_dim, "projection": None, "dtype": "float16"}
    return {"full_dim": full_dim, "dim": dim, "projection": "random orthonormal", "seed": seed,
            "shape": [full_dim, dim], "check": _check(projection_matrix(full_dim, dim, seed)), "dtype": "float16"}


class Projection:
    """A feature as stored: projected (when the spec says so), unit length, float16."""

    def __init__(self, spec: dict):
        self.matrix = None
        if spec.get("projection"):
            self.matrix = projection_matrix(spec["full_dim"], spec["dim"], spec["seed"])
            if abs(_check(self.matrix) - spec["check"]) > 1e-3:
                raise UserError("the stored attribute features' projection cannot be rebuilt here (another "
                                "numpy?); run 'fashionlens index-attributes --replace'")

    def __call__(self, vector: np.ndarray) -> np.ndarray:
        v = np.asarray(vector, np.float32)
        if self.matrix is not None:
            v = v @ self.matrix
        norm = float(np.linalg.norm(v))
        return (v / norm if norm > 0 else v).astype(np.float16)


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None:
        return None
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / den if den > 0 else 0.0


@dataclass
class StoredAttribute:
    attribute: str
    value: str
    index: int
    confidence: float
    scores: dict[str, float]
    box: tuple[int, int, int, int] | None
    feature: np.ndarray | None  # float16, as stored

    def to_json(self) -> dict:
        return {"attribute": self.attribute, "value": self.value, "confidence": round(self.confidence, 4),
                "scores": {k: round(v, 4) for k, v in self.scores.items()}, "box": list(self.box) if self.box else None}


def checkpoint_id(checkpoint: Path) -> str | None:
    config = checkpoint / "config.json" if checkpoint.is_dir() else checkpoint.parent / "config.json"
    try:
        return json.loads(config.read_text()).get("checkpoint_id")
    except (OSError, ValueError):
        return None


class StoredAttributes:
    """The attributes of an open store (:class:`~fashionlens.index.stores.VectorStore`): its
    attribute model, and reading the stored predictions."""

    def __init__(self, index):
        self.index, self.folder = index, index.location
        self.meta = index.get_meta(META_KEY)
        if not self.meta:
            raise UserError(f"{self.folder}: the index holds no attributes; add them with "
                            f"'fashionlens index-attributes {self.folder} --model CKPT'")
        self.schema: dict[str, list[str]] = self.meta["schema"]
        self.names = list(self.schema)
        self._projection: Projection | None = None

    @property
    def projection(self) -> Projection:
        if self._projection is None:
            self._projection = Projection(self.meta["feature"])
        return self._projection

    def explainer(self, device: str = "cpu", optimize: str = "auto"):
        """The explainer of the model that made the stored rows (checked by checkpoint id), its
        forward pass sped up by ``optimize`` (:meth:`AttributeExplainer.optimize`)."""
        path = Path(self.meta["checkpoint"])
        if not path.exists():
            raise UserError(f"{self.folder}: its attribute model {path} is gone; restore it, or run "
                            "'fashionlens index-attributes --replace --model CKPT'")
        if checkpoint_id(path) != self.meta.get("checkpoint_id"):
            raise UserError(f"{path} changed since 'fashionlens index-attributes' used it; run it again with --replace")
        model, _ = load_attribute_classifier(path, device)
        explainer = AttributeExplainer(model, mode=self.meta["loss"], box_threshold=self.meta["box_threshold"],
                                       method=self.meta["method"], device=device)
        explainer.optimize(optimize)
        return explainer

    def rows(self, keys: list, attrs: list[int] | None = None) -> dict:
        """Per item with attributes (by its store key): one entry per attribute in schema order
        (None: not stored or not asked for in ``attrs``)."""
        return {key: self.build(stored) for key, stored in self.index.read_attributes(list(keys), attrs).items()}

    def build(self, stored: list[tuple]) -> list:
        """One item's entries in schema order from the store's tuples (``VectorStore.read_attributes``)."""
        row: list = [None] * len(self.names)
        for a, value, conf, scores, box, feature in stored:
            name, values = self.names[a], self.schema[self.names[a]]
            row[a] = StoredAttribute(name, values[value], value, conf, dict(zip(values, scores)), box, feature)
        return row

    def resolve(self, want: str) -> tuple[int, int]:
        """``ATTR=VALUE`` (display or full attribute name) -> (attribute number, value number)."""
        attr, sep, value = want.partition("=")
        name = find_attribute(attr, self.names)
        a = self.names.index(name) if name is not None else None
        if not sep or a is None:
            raise UserError(f"want {want!r}: use ATTRIBUTE=VALUE with one of these attributes: "
                            f"{', '.join(display_name(n) for n in self.names)}")
        values = self.schema[self.names[a]]
        lowered = [v.lower() for v in values]
        if value.strip().lower() not in lowered:
            raise UserError(f"want {want!r}: {display_name(self.names[a])} is one of {', '.join(values)}")
        return a, lowered.index(value.strip().lower())

    def summary(self) -> dict:
        done, unreadable = self.index.attribute_counts()
        return {**{k: v for k, v in self.meta.items() if k != "schema"},
                "attributes": {display_name(n): v for n, v in self.schema.items()},
                "items_done": done, "items_unreadable": unreadable}
