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
from torch.utils.data import DataLoader, Dataset

from fashionlens.data.images import ImageError, image_size, open_image
from fashionlens.errors import UserError
from fashionlens.explain.explainer import AttributeExplainer
from fashionlens.index.attribute_store import META_KEY, Projection, checkpoint_id, projection_spec
from fashionlens.index.config import IndexAttributesConfig
from fashionlens.index.pipeline import Progress
from fashionlens.index.stores import VectorStore, open_store
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
            full = image_size(path)  # the photo's own size (a JPEG may decode smaller)
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


def _setup(folder: str, checkpoint: Path, cfg: IndexAttributesConfig, replace: bool, index: VectorStore):
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
    old = index.get_meta(META_KEY)
    if old and replace:
        index.clear_attributes()
    elif old:
        differs = [k for k in SETUP_KEYS if old.get(k) != record[k]]
        if old.get("checkpoint_id") != record["checkpoint_id"] or (
                not record["checkpoint_id"] and old["checkpoint"] != record["checkpoint"]):
            differs.insert(0, "model")
        if differs:
            raise UserError(f"{folder} holds attributes of {old['checkpoint']}, which differ from these "
                            f"({', '.join(differs)}); pass --replace to drop them and explain every item again")
    index.set_meta(META_KEY, record)
    return explainer, record


def index_attributes(folder: Path | str, checkpoint: Path, cfg: IndexAttributesConfig, progress=None,
                     replace: bool = False) -> AttributeReport:
    """Explain every searchable item of the store ``folder`` (a folder or a Milvus collection) not
    done yet, and store the results."""
    progress, report = progress or Progress(), AttributeReport()
    index = open_store(folder, write=True)
    try:
        explainer, record = _setup(str(folder), Path(checkpoint), cfg, replace, index)
        schema, project = record["schema"], Projection(record["feature"])
        progress.start(index.attribute_todo_count(), "explaining")
        started = time.perf_counter()
        for page in index.attribute_todo(PAGE):
            loader = DataLoader(_Photos(page, explainer.size), batch_size=cfg.batch_size, num_workers=cfg.workers,
                                collate_fn=list, prefetch_factor=4 if cfg.workers else None)
            for batch in loader:
                ok = [s for s in batch if s[3] is None]
                results = explainer.explain([s[1] for s in ok]) if ok else []
                rows = [r for (key, img, full, _), res in zip(ok, results)
                        for r in item_rows(key, res, full, img.size, schema, project)]
                failed = [(s[0], s[3]) for s in batch if s[3] is not None]
                index.record_attributes(rows, [s[0] for s in ok], failed)
                report.explained, report.skipped = report.explained + len(ok), report.skipped + len(failed)
                progress.advance(len(batch))
        progress.stop()
        report.seconds = time.perf_counter() - started
        done = report.explained + report.skipped
        report.per_second = done / report.seconds if done and report.seconds > 0 else 0.0
        report.total = index.attribute_counts()[0]
        failures = index.attribute_failures()
        # a shared store has no folder of its own: its list goes to the working folder, and only when not empty
        report.skipped_report = str(_write_skipped(index, failures)) if failures or not index.stateless else ""
        return report
    finally:
        index.close()


def _write_skipped(index: VectorStore, failures: list[tuple]) -> Path:
    path = index.report_folder / "attributes-skipped.csv"
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "path", "reason"])
        writer.writerows(failures)
    tmp.replace(path)
    return path
