"""Search an index by photo: decode, embed with the index's own model, search.

With the attributes of ``fashionlens index-attributes`` (:mod:`fashionlens.index.attribute_store`) a
search can also say why each result matches (``explain``: the query photo is explained with the
index's attribute model and compared with each result's stored predictions and region
features) and keep only items with wanted attribute values (``want``: nearest items are taken
in growing pools and filtered on their stored predictions, so the result is the plain search's
order with the other items left out); ``filters`` keep items by metadata columns the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fashionlens.data.images import ImageError, open_image
from fashionlens.errors import UserError
from fashionlens.explain.wording import display_name, phrase
from fashionlens.index.attribute_store import StoredAttributes, cosine
from fashionlens.index.config import SearchConfig
from fashionlens.index.stores import SearchHit, VectorStore, Where, open_store
from fashionlens.models.embedder import Embedder, build_embedder

# JPEGs are decoded at reduced scale down to this size at least (>= any input size we use).
DRAFT_SIZE = 512
TRACE_FROM = 100  # photos explained in one call from which the attribute model is traced first


def embedder_for(index: VectorStore, device: str = "cpu", optimize: str = "auto") -> Embedder:
    """The model that made the store's vectors, as recorded in it."""
    cfg = index.get_meta("config")
    if not cfg:
        raise UserError(f"{index.location}: the store records no model; re-run 'fashionlens index'")
    embedder = build_embedder(cfg["model"], cfg.get("input_size"), device, optimize=optimize)
    index.check_embedder(embedder.describe())
    return embedder


def load_photos(paths: list[Path], draft_size: int):
    """Decode every photo, or raise a one-line UserError naming the first bad one."""
    images = []
    for path in paths:
        try:
            images.append(open_image(path, draft_size=draft_size))
        except ImageError as exc:
            raise UserError(str(exc)) from None
    return images


@dataclass
class ExplainedHit(SearchHit):
    reasons: dict = field(default_factory=dict)
    attributes: list | None = None  # the item's StoredAttribute per attribute (schema order), if stored


@dataclass
class SearchPlan:
    wants: list[tuple[int, int]]
    filters: dict[str, set[str]]
    explain: bool


def parse_filters(filters: list[str]) -> dict[str, set[str]]:
    """``["gender=Men", "gender=Unisex", "season=Summer"]`` -> {column: allowed values}: values
    of one column are alternatives, columns must all match."""
    out: dict[str, set[str]] = {}
    for f in filters:
        column, sep, value = f.partition("=")
        if not sep or not column.strip():
            raise UserError(f"filter {f!r}: use COLUMN=VALUE, e.g. gender=Men")
        out.setdefault(column.strip(), set()).add(value.strip())
    return out


def compare(query, stored, project, min_confidence: float) -> dict:
    """``same`` (values agree; most similar region features first) and ``differs`` (both values)
    over the attributes confidently predicted on both sides; ``query`` are the query photo's
    :class:`AttributeResult`, ``stored`` the item's :class:`StoredAttribute` (schema order)."""
    same, differs = [], []
    for q, s in zip(query, stored):
        if s is None or min(q.confidence, s.confidence) < min_confidence:
            continue
        sim = None if q.feature is None or s.feature is None else round(cosine(project(q.feature), s.feature), 4)
        if q.index == s.index:
            same.append({"attribute": q.attribute, "value": q.value, "phrase": q.phrase, "similarity": sim})
        else:
            differs.append({"attribute": q.attribute, "query_value": q.value, "item_value": s.value, "similarity": sim})
    same.sort(key=lambda r: math.inf if r["similarity"] is None else -r["similarity"])
    return {"same": same, "differs": differs}


def reason_text(reasons: dict, max_reasons: int = 0) -> str:
    """``wanted: ...; same: long sleeves, round neckline; differs: colour (black vs white)``.

    ``same`` is named in its order (most similar region first), absences (``no`` of a no/yes
    attribute: "no collar") after the values present; the JSON lists keep the plain order."""
    def cut(words: list[str]) -> str:
        if max_reasons and len(words) > max_reasons:
            words = words[:max_reasons] + [f"+{len(words) - max_reasons} more"]
        return ", ".join(words)

    parts = [f"wanted: {cut([w['phrase'] for w in reasons['wanted']])}"] if reasons.get("wanted") else []
    if reasons.get("same"):  # values present first ("no collar" says less than "round neckline")
        same = sorted(reasons["same"], key=lambda r: r["value"] == "no")
        parts.append(f"same: {cut([r['phrase'] for r in same])}")
    if reasons.get("differs"):
        parts.append("differs: " + cut([f"{display_name(r['attribute'])} ({r['query_value']} vs {r['item_value']})"
                                        for r in reasons["differs"]]))
    if "same" in reasons and not parts:
        parts.append("no attribute confidently predicted on both")
    return "; ".join(parts)


class Searcher:
    """An open store (a folder or a Milvus collection: :func:`open_store`) with its model loaded:
    search by photo paths or decoded images; ``attributes=True`` also opens the stored attributes
    (explained and filtered search); ``write=True`` opens it to change it (a server that adds and
    removes items; a local folder's writer lock)."""

    def __init__(self, location: Path | str, device: str = "cpu", optimize: str = "auto", attributes: bool = False,
                 write: bool = False, store: VectorStore | None = None, store_options: dict | None = None):
        self.index = store or open_store(location, write=write, **(store_options or {}))
        try:
            self.attributes = StoredAttributes(self.index) if attributes else None
            self.embedder = embedder_for(self.index, device, optimize)
            self.optimize = optimize
            self.index.warm()
        except BaseException:
            self.index.close()
            raise

    def search_images(self, images, k: int = 10, batch_size: int = 16) -> list[list[SearchHit]]:
        results = []
        for start in range(0, len(images), batch_size):
            results += self.index.search(self.embedder.embed_images(images[start:start + batch_size]), k)
        return results

    def decode(self, paths: list[Path], crop: str = "none") -> tuple[list, list[dict | None]]:
        """(images, crop boxes): the photos decoded as the catalog's were when indexed (a JPEG at
        reduced scale down to the model's input size): the same photo gives the same vector. With a
        ``crop`` method, the photos are decoded whole and cut, and each box is given."""
        from fashionlens.data.crops import build_cropper

        cropper = build_cropper(crop)
        if cropper is None:
            return load_photos(paths, self.embedder.preprocess.size), [None] * len(paths)
        cut = [cropper(img) for img in load_photos(paths, None)]
        return [img for img, _ in cut], [box.to_dict() for _, box in cut]

    def search_paths(self, paths: list[Path], k: int = 10, batch_size: int = 16) -> list[list[SearchHit]]:
        return self.search_images(self.decode(paths)[0], k, batch_size)

    def plan(self, cfg: SearchConfig) -> SearchPlan:
        """Check ``cfg``'s wants and filters once for many searches."""
        wants = [self._attrs("want").resolve(w) for w in cfg.want]
        if len({a for a, _ in wants}) < len(set(wants)):
            raise UserError("want: one attribute asked with two values")
        if cfg.explain:
            self._attrs("explain")
        return SearchPlan(wants, parse_filters(cfg.filters), cfg.explain)

    def _attrs(self, what: str) -> StoredAttributes:
        if self.attributes is None:
            raise UserError(f"{what}: {self.index.location} holds no attributes; add them with "
                            "'fashionlens index-attributes'")
        return self.attributes

    def search_explained(self, images, cfg: SearchConfig, embed_images=None) -> tuple[list[list[ExplainedHit]], list | None]:
        """(hits with ``reasons`` per photo, the photos' own AttributeResults or None) for
        ``cfg.explain``, ``cfg.want`` and ``cfg.filters``; ``embed_images``: the same photos
        decoded for the embedder (:meth:`decode`), if ``images`` were decoded otherwise."""
        plan = self.plan(cfg)
        # tracing the attribute model takes about 2 s and saves about 20 ms a photo: only for many
        explainer = (self.attributes.explainer(cfg.device, self.optimize if len(images) >= TRACE_FROM else "none")
                     if plan.explain else None)
        embed_images = images if embed_images is None else embed_images
        vecs, queries = [], [] if explainer else None
        for start in range(0, len(images), cfg.batch_size):
            vecs.append(self.embedder.embed_images(embed_images[start:start + cfg.batch_size]))
            if explainer:
                queries += explainer.explain(images[start:start + cfg.batch_size])
        results = [self.hits_for(vec, queries[n] if queries else None, cfg, plan)
                   for n, vec in enumerate(np.concatenate(vecs))]
        return results, queries

    def hits_for(self, vec: np.ndarray, query: list | None, cfg: SearchConfig, plan: SearchPlan,
                 hits: list[SearchHit] | None = None) -> list[ExplainedHit]:
        """The results of one embedded photo (``query``: its AttributeResults when explained;
        ``hits``: its plain top k, when searched already with other photos)."""
        attrs = self.attributes
        if plan.wants or plan.filters:
            hits = self.index.search_where(vec, cfg.k, Where(plan.filters, plan.wants, cfg.min_confidence,
                                                             cfg.max_pool), attrs)
        elif hits is None:
            hits = self.index.search(vec[None], cfg.k)[0]
        stored = attrs.rows([h.rowid for h in hits]) if attrs is not None else {}
        out = []
        for h in hits:
            row, reasons = stored.get(h.rowid), {}
            if plan.wants:
                reasons["wanted"] = [{"attribute": attrs.names[a], "value": row[a].value,
                                      "confidence": round(row[a].confidence, 4),
                                      "phrase": phrase(attrs.names[a], row[a].value, attrs.schema[attrs.names[a]])}
                                     for a, _ in plan.wants]
            if query is not None and row is None:
                reasons["note"] = "no attributes stored for this item yet (run 'fashionlens index-attributes')"
            elif query is not None:
                reasons.update(compare(query, row, attrs.projection, cfg.min_confidence))
                wanted = {attrs.names[a] for a, _ in plan.wants}  # asked to differ: not a reason
                reasons["differs"] = [d for d in reasons["differs"] if d["attribute"] not in wanted]
            if reasons:
                reasons["text"] = reasons.get("note") or reason_text(reasons, cfg.max_reasons)
            out.append(ExplainedHit(**vars(h), reasons=reasons, attributes=row))
        return out

    def close(self) -> None:
        self.index.close()
