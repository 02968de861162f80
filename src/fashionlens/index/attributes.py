"""Attributes stored beside each item of an index (thesis B): ``fashionlens index-attributes``.

For every searchable item, the attribute classifier's explainer
(:class:`fashionlens.explain.attributes.AttributeExplainer`) gives, per attribute, the
predicted value, its confidence, every value's score, the CAM box (in the item photo's own
pixels) and the pooled feature of that box. They go to the store's ``item_attributes`` table
(one row per item and attribute; see :mod:`fashionlens.index.store`): scores as float16, the
feature as float16 after a fixed random orthonormal projection to ``feature_dim`` dimensions
(1,280 x 26 floats an item would not scale to millions of items). A random projection to d
dimensions approximately preserves cosine similarity (Johnson-Lindenstrauss; the error is of
order 1/sqrt(d), about 0.1 at d = 128); ``feature_dim: 0`` stores the full vector. The
projection is rebuilt from its seed and shape, recorded in the meta key ``attributes`` with the
model's checkpoint, schema, loss and box threshold.

Resumable: each batch commits its rows and marks its items in ``attribute_state``; a new run
explains only items not marked done (unreadable ones are retried and listed in
``attributes-skipped.csv``).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fashionlens.config import IndexAttributesConfig
from fashionlens.data.images import ImageError, open_image
from fashionlens.errors import UserError
from fashionlens.explain.attributes import display_name, find_attribute
from fashionlens.index.catalog_index import CatalogIndex

META_KEY = "attributes"
PAGE = 4096
SETUP_KEYS = ("schema", "loss", "box_threshold", "method", "input_size", "feature")


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
    """The attributes of an open index: its attribute model, and reading the stored rows."""

    def __init__(self, index: CatalogIndex):
        self.store, self.folder = index.store, index.folder
        self.meta = self.store.get_meta(META_KEY)
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
        from fashionlens.explain.attributes import AttributeExplainer
        from fashionlens.training.attributes import load_attribute_model

        path = Path(self.meta["checkpoint"])
        if not path.exists():
            raise UserError(f"{self.folder}: its attribute model {path} is gone; restore it, or run "
                            "'fashionlens index-attributes --replace --model CKPT'")
        if checkpoint_id(path) != self.meta.get("checkpoint_id"):
            raise UserError(f"{path} changed since 'fashionlens index-attributes' used it; run it again with --replace")
        model, _, _ = load_attribute_model(path, device)
        explainer = AttributeExplainer(model, mode=self.meta["loss"], box_threshold=self.meta["box_threshold"],
                                       method=self.meta["method"], device=device)
        explainer.optimize(optimize)
        return explainer

    def rows(self, rowids: list[int], attrs: list[int] | None = None) -> dict[int, list[StoredAttribute | None]]:
        """Per item with attributes: one entry per attribute in schema order (None: not stored or
        not asked for in ``attrs``)."""
        out: dict[int, list] = {}
        only = "" if attrs is None else f" AND attr IN ({','.join(str(int(a)) for a in attrs)})"
        for start in range(0, len(rowids), 900):
            part = [int(r) for r in rowids[start:start + 900]]
            for item, a, value, conf, scores, x, y, w, h, feature in self.store.db.execute(
                    f"SELECT * FROM item_attributes WHERE item IN ({','.join('?' * len(part))}){only}", part):
                name, values = self.names[a], self.schema[self.names[a]]
                row = out.setdefault(item, [None] * len(self.names))
                row[a] = StoredAttribute(
                    name, values[value], value, conf,
                    dict(zip(values, np.frombuffer(scores, np.float16).astype(float).tolist())),
                    None if x is None else (x, y, w, h),
                    None if feature is None else np.frombuffer(feature, np.float16))
        return out

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
        count = lambda sql: self.store.db.execute(sql).fetchone()[0]  # noqa: E731
        return {**{k: v for k, v in self.meta.items() if k != "schema"},
                "attributes": {display_name(n): v for n, v in self.schema.items()},
                "items_done": count("SELECT COUNT(*) FROM attribute_state WHERE reason IS NULL"),
                "items_unreadable": count("SELECT COUNT(*) FROM attribute_state WHERE reason IS NOT NULL")}


# -- indexing ----------------------------------------------------------------------------------


class _Photos(Dataset):
    def __init__(self, rows, draft: int):
        self.rows, self.draft = rows, draft

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        key, path = self.rows[i]
        try:
            img = open_image(path, draft_size=self.draft)
            with Image.open(path) as header:  # the photo's own size (a JPEG may decode smaller)
                full = header.size
            return key, img, full, None
        except ImageError as exc:
            return key, None, None, str(exc)
        except Exception as exc:  # a codec bug must not end a long run
            return key, None, None, f"{path}: cannot decode ({type(exc).__name__}: {exc})"


def scale_box(box, decoded: tuple[int, int], full: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box in the decoded image's pixels -> the photo's own pixels."""
    sx, sy = full[0] / decoded[0], full[1] / decoded[1]
    x, y = min(int(box[0] * sx), full[0] - 1), min(int(box[1] * sy), full[1] - 1)
    return x, y, max(1, min(round(box[2] * sx), full[0] - x)), max(1, min(round(box[3] * sy), full[1] - y))


def item_rows(rowid: int, results, full: tuple[int, int], decoded: tuple[int, int], schema, project) -> list:
    rows = []
    for a, r in enumerate(results):
        box = scale_box(r.box, decoded, full) if r.box else (None,) * 4
        scores = np.asarray([r.scores[v] for v in schema[r.attribute]], np.float16).tobytes()
        feature = None if r.feature is None else project(r.feature).tobytes()
        rows.append((rowid, a, r.index, float(r.confidence), scores, *box, feature))
    return rows


@dataclass
class AttributeReport:
    explained: int = 0
    skipped: int = 0
    total: int = 0
    seconds: float = 0.0
    per_second: float = 0.0
    skipped_report: str = ""


def _todo(store, after: int, limit: int) -> list[tuple[int, str]]:
    return store.db.execute(
        "SELECT i.rowid, i.path FROM items i LEFT JOIN attribute_state a ON a.item = i.rowid "
        "WHERE i.state='embedded' AND i.rowid>? AND (a.item IS NULL OR a.reason IS NOT NULL) "
        "ORDER BY i.rowid LIMIT ?", (after, limit)).fetchall()


def _setup(folder: Path, checkpoint: Path, cfg: IndexAttributesConfig, replace: bool, index: CatalogIndex):
    """Load the model, check it against the stored rows' model, record it in the meta."""
    from fashionlens.explain.attributes import AttributeExplainer
    from fashionlens.models.builder import resolve_checkpoint
    from fashionlens.training.attributes import load_attribute_model

    checkpoint = resolve_checkpoint(checkpoint)  # a run folder: the checkpoint it chose
    model, train_cfg, _ = load_attribute_model(checkpoint, cfg.device)
    explainer = AttributeExplainer(model, mode=train_cfg.loss, box_threshold=cfg.box_threshold,
                                   method=cfg.method, device=cfg.device)
    explainer.optimize(cfg.optimize)
    record = {"checkpoint": str(checkpoint.resolve()), "checkpoint_id": checkpoint_id(checkpoint),
              "schema": explainer.schema, "loss": train_cfg.loss, "threshold": train_cfg.threshold,
              "box_threshold": cfg.box_threshold, "method": cfg.method, "input_size": explainer.size,
              "feature": projection_spec(int(model.backbone.num_features), cfg.feature_dim, cfg.projection_seed),
              "config": cfg.model_dump()}
    store, old = index.store, index.store.get_meta(META_KEY)
    if old and replace:
        store.clear_attributes()
    elif old:
        differs = [k for k in SETUP_KEYS if old.get(k) != record[k]]
        if old.get("checkpoint_id") != record["checkpoint_id"] or (
                not record["checkpoint_id"] and old["checkpoint"] != record["checkpoint"]):
            differs.insert(0, "model")
        if differs:
            raise UserError(f"{folder} holds attributes of {old['checkpoint']}, which differ from these "
                            f"({', '.join(differs)}); pass --replace to drop them and explain every item again")
    store.set_meta(META_KEY, record)
    return explainer, record


def index_attributes(folder: Path, checkpoint: Path, cfg: IndexAttributesConfig, progress=None,
                     replace: bool = False) -> AttributeReport:
    """Explain every searchable item of the index in ``folder`` not done yet, and store the results."""
    from fashionlens.index.pipeline import Progress

    progress, report = progress or Progress(), AttributeReport()
    index = CatalogIndex(folder, write=True)
    try:
        explainer, record = _setup(Path(folder), Path(checkpoint), cfg, replace, index)
        store, schema, project = index.store, record["schema"], Projection(record["feature"])
        total = store.db.execute(
            "SELECT COUNT(*) FROM items i LEFT JOIN attribute_state a ON a.item = i.rowid "
            "WHERE i.state='embedded' AND (a.item IS NULL OR a.reason IS NOT NULL)").fetchone()[0]
        progress.start(total, "explaining")
        started, last = time.perf_counter(), 0
        while page := _todo(store, last, PAGE):
            last = page[-1][0]
            loader = DataLoader(_Photos(page, explainer.size), batch_size=cfg.batch_size, num_workers=cfg.workers,
                                collate_fn=list, prefetch_factor=4 if cfg.workers else None)
            for batch in loader:
                ok = [s for s in batch if s[3] is None]
                results = explainer.explain([s[1] for s in ok]) if ok else []
                rows = [r for (key, img, full, _), res in zip(ok, results)
                        for r in item_rows(key, res, full, img.size, schema, project)]
                failed = [(s[0], s[3]) for s in batch if s[3] is not None]
                with store.db:
                    store.record_attributes(rows, [s[0] for s in ok], failed)
                report.explained, report.skipped = report.explained + len(ok), report.skipped + len(failed)
                progress.advance(len(batch))
        progress.stop()
        report.seconds = time.perf_counter() - started
        done = report.explained + report.skipped
        report.per_second = done / report.seconds if done and report.seconds > 0 else 0.0
        report.total = store.db.execute("SELECT COUNT(*) FROM attribute_state WHERE reason IS NULL").fetchone()[0]
        report.skipped_report = str(_write_skipped(index))
        return report
    finally:
        index.close()


def _write_skipped(index: CatalogIndex) -> Path:
    path = index.folder / "attributes-skipped.csv"
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "path", "reason"])
        writer.writerows(index.store.db.execute(
            "SELECT i.item_id, i.path, a.reason FROM attribute_state a JOIN items i ON i.rowid = a.item "
            "WHERE a.reason IS NOT NULL ORDER BY a.item"))
    tmp.replace(path)
    return path
