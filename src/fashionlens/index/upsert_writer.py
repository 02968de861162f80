"""``fashionlens index`` into a store written by id (Milvus): read -> skip what is stored -> embed
-> upsert in batches.

Idempotent: every row is an upsert keyed by the item id, so a job killed at any point and run
again ends with every item exactly once; the rerun asks the store which ids of each page it holds
already (with the same photo path) and embeds only the others. An item whose metadata alone
changed is updated without embedding it again. Photos that cannot be read are not stored (a rerun
tries them again) and are listed in ``skipped.csv`` in the working folder, as ids listed twice in
the catalog are reported (within a page; across pages the later row wins).
"""

from __future__ import annotations

import csv
from itertools import islice
from pathlib import Path

from fashionlens.data.catalog import CatalogSource, Missing
from fashionlens.errors import UserError
from fashionlens.index.pipeline import EmbedClock
from fashionlens.index.stores.milvus_rows import item_row

SKIPPED = "skipped.csv"


def _pages(source: CatalogSource, size: int):
    stream = iter(source)
    while page := list(islice(stream, size)):
        yield page


def ingest(store, source: CatalogSource, engine, cfg, report, progress) -> None:
    """Bring ``store`` up to date with ``source``, embedding with ``engine``."""
    if engine.cropper is not None:  # its rows have no field for the box yet
        raise UserError(f"{store.location}: --crop with a Milvus store is not supported yet; index into a folder")
    progress.log(f"reading {source.describe()}")
    total = sum(1 for x in source if not isinstance(x, Missing))  # a pass over the manifest: done / total
    if total == 0:
        raise UserError(f"{source.path}: the catalog has no items")
    store.ensure(engine.embedder.dim)
    store.set_meta("config", {"command": "index", "catalog": str(source.path), **cfg.model_dump()})
    store.set_meta("embedder", engine.embedder.describe())
    store.set_meta("index_settings", {"milvus_index": cfg.milvus_index, "flat_max": cfg.flat_max,
                                      "milvus_hnsw_max": cfg.milvus_hnsw_max})
    progress.start(total, "embedding")
    skipped: list[tuple[str, str, str]] = []
    clock = EmbedClock()
    for page in _pages(source, engine.page):
        items, seen = {}, set()
        for x in page:
            if isinstance(x, Missing):
                report.missing += 1
                skipped.append((x.id, "", x.reason))
            elif x.id in seen:
                report.duplicates.append(x.id)
            else:
                seen.add(x.id)
                items[x.id] = x
        stored = store.existing(list(items))
        todo, kept, changed_meta = [], 0, []
        for item in items.values():
            old = stored.get(item.id)
            meta = {str(k): str(v) for k, v in item.metadata.items()}
            if old is None or old["path"] != str(item.path):
                todo.append((item.id, str(item.path)))
                report.added += old is None
                report.changed += old is not None
            else:
                kept += 1
                if old["metadata"] != meta:
                    changed_meta.append({"id": item.id, "metadata": meta})
        store.upsert(changed_meta, partial=True)
        progress.advance(kept)
        buffer: list[dict] = []
        for batch in engine.embed(todo):
            buffer += [item_row(key, vec, str(items[key].path), items[key].metadata)
                       for key, vec in zip(batch.keys, batch.vectors)]
            skipped += [(key, str(items[key].path), reason) for key, reason in batch.errors]
            report.embedded += len(batch.keys)
            report.skipped += len(batch.errors)
            clock.add(len(batch.keys) + len(batch.errors))
            progress.advance(len(batch.keys) + len(batch.errors))
            if len(buffer) >= cfg.chunk_size:
                store.upsert(buffer)
                buffer = []
        store.upsert(buffer)
    progress.stop()
    clock.report(report)
    report.index = str(store.fit_index(progress.log).get("index_type"))
    report.total = store.count()
    report.skipped_report = str(_write_skipped(skipped)) if skipped else ""


def _write_skipped(rows: list[tuple[str, str, str]]) -> Path:
    path = Path(SKIPPED)
    with open(path.with_suffix(".csv.tmp"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "path", "reason"])
        writer.writerows(rows)
    path.with_suffix(".csv.tmp").replace(path)
    return path.resolve()

