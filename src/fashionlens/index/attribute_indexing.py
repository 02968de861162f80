"""``fashionlens index-attributes``: every item of an index explained by an attribute classifier,
its predictions stored beside it (:mod:`.attribute_store` says what and how).

Resumable: each batch commits its rows and marks its items in ``attribute_state``; a new run
explains only items not marked done (unreadable ones are retried and listed in
``attributes-skipped.csv``).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fashionlens.data.images import ImageError, open_image
from fashionlens.errors import UserError
from fashionlens.explain.explainer import AttributeExplainer
from fashionlens.index.attribute_store import META_KEY, Projection, checkpoint_id, projection_spec
from fashionlens.index.catalog_index import CatalogIndex
from fashionlens.index.config import IndexAttributesConfig
from fashionlens.index.pipeline import Progress
from fashionlens.models.checkpoints import load_attribute_classifier, resolve_checkpoint

PAGE = 4096
SETUP_KEYS = ("schema", "loss", "box_threshold", "method", "input_size", "feature")


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
    checkpoint = resolve_checkpoint(checkpoint)  # a run folder: the checkpoint it chose
    model, extra = load_attribute_classifier(checkpoint, cfg.device)
    explainer = AttributeExplainer(model, mode=extra["loss"], box_threshold=cfg.box_threshold,
                                   method=cfg.method, device=cfg.device)
    explainer.optimize(cfg.optimize)
    record = {"checkpoint": str(checkpoint.resolve()), "checkpoint_id": checkpoint_id(checkpoint),
              "schema": explainer.schema, "loss": extra["loss"], "threshold": extra["threshold"],
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
