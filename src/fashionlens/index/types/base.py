"""Vector-index types and their registry: which FAISS structure an index uses, by catalog size.

An :class:`IndexSpec` is what an index records about its FAISS structure (type, factory string,
list count, search settings). Each type is a registered :class:`IndexType` in a module of this
package (``flat``, ``ivfflat``, ``ivfpq``, ``hnsw``); :func:`choose_spec` picks one by size when
the setting is ``auto`` (docs/experiments/indexing.md, "Which index at which size", has the recall and cost
of each on Lite0 vectors):

- ``flat`` up to ``flat_max`` vectors, ``ivfflat`` up to ``ivf_flat_max``, ``ivfpq`` above (its
  shortlist re-scored exactly from the chunk files); ``hnsw`` on request.

A new type is one module here (or a plugin) with ``@INDEX_TYPES.register("name")`` on an
:class:`IndexType` subclass that gives its spec for a catalog size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import ClassVar

import faiss

from fashionlens.registry import Registry

NPROBE = 64  # IVF lists probed a query (docs/experiments/indexing.md, "Which index at which size")
# the fewest vectors ``auto`` gives an IVF index, whatever ``flat_max``: its smallest (16 lists) with
# the 39 training points a list FAISS asks for; an exact search of fewer costs next to nothing
IVF_MIN = 16 * 39


@dataclass
class IndexSpec:
    kind: str  # the registered index type
    dim: int
    factory: str  # FAISS index_factory string
    nprobe: int | None = None
    ef_search: int | None = None
    rerank: int | None = None  # candidates re-scored exactly from the stored vectors (ivfpq)
    nlist: int | None = None  # IVF lists (None: not an IVF index)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> IndexSpec:
        """A recorded spec. Those recorded before ``nlist`` was (2026-12) name their list count only
        in the factory string (``IVF1024,...``), read from it here."""
        spec = cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        if "nlist" not in raw and spec.factory.startswith("IVF"):
            spec.nlist = int(spec.factory.split(",", 1)[0].removeprefix("IVF"))
        return spec

    @property
    def codes(self) -> str:
        """The factory string without its list count: what the stored vectors look like."""
        return self.factory.split(",", 1)[1] if self.nlist else self.factory


@dataclass(frozen=True)
class IndexSettings:
    """The ``index`` settings that shape the structure (recorded with every index)."""

    flat_max: int = 20_000
    ivf_flat_max: int = 100_000
    hnsw_m: int = 32
    pq_bytes: int = 128
    train_sample: int = 50_000
    rerank: int = 400


class IndexType:
    """Base of every index type."""

    supports_remove: ClassVar[bool] = True  # FAISS can remove ids (else removed rows are filtered)
    rescored: ClassVar[bool] = False  # its shortlist is re-scored with the stored vectors

    def spec(self, n: int, dim: int, settings: IndexSettings) -> IndexSpec:
        """The structure for ``n`` vectors of ``dim`` dimensions."""
        raise NotImplementedError

    def training_minimum(self, spec: IndexSpec) -> int:
        """The fewest vectors that can train ``spec``: one a list (0: no training)."""
        return spec.nlist or 0


INDEX_TYPES: Registry[type[IndexType]] = Registry("index type", "fashionlens.index.types")


def index_type(spec_or_name: IndexSpec | str) -> IndexType:
    return INDEX_TYPES.get(spec_or_name.kind if isinstance(spec_or_name, IndexSpec) else spec_or_name)()


IndexTypeName = INDEX_TYPES.setting("auto")
"""A config field naming an index type, or ``auto``."""


def nlist(n: int, per_sqrt: float, train_sample: int) -> int:
    """IVF lists: a power of two near ``per_sqrt`` x sqrt(n), at least 16, and at most what the
    training sample (``train_sample``, or all ``n`` when fewer) can train: FAISS wants ~39 points
    a list, and the sample is capped for memory."""
    lists = int(2 ** round(math.log2(max(16.0, per_sqrt * math.sqrt(max(n, 1))))))
    return min(lists, int(2 ** math.floor(math.log2(max(16, min(n, train_sample) // 39)))))


def choose_spec(n: int, dim: int, kind: str = "auto", flat_max: int = 20_000, ivf_flat_max: int = 100_000,
                hnsw_m: int = 32, pq_bytes: int = 128, train_sample: int = 50_000, rerank: int = 400) -> IndexSpec:
    """Pick the index for ``n`` vectors of ``dim`` dimensions (``kind`` ``auto`` or a registered type)."""
    if kind == "auto":
        kind = "flat" if n <= flat_max or n < IVF_MIN else "ivfflat" if n <= ivf_flat_max else "ivfpq"
    if kind not in INDEX_TYPES:
        raise ValueError(f"unknown index type {kind!r} (auto, {', '.join(INDEX_TYPES.names())})")
    settings = IndexSettings(flat_max, ivf_flat_max, hnsw_m, pq_bytes, train_sample, rerank)
    return index_type(kind).spec(n, dim, settings)


def training_minimum(spec: IndexSpec) -> int:
    """The fewest vectors that can train ``spec``."""
    return index_type(spec).training_minimum(spec)


def supports_remove(spec: IndexSpec) -> bool:
    return index_type(spec).supports_remove


def with_search_settings(spec: IndexSpec, rerank: int) -> IndexSpec:
    """A recorded ``spec`` with the current search-time settings (lists probed; for a re-scored
    type, the shortlist), which need no rebuild: an index built by an earlier version (32 lists,
    no re-scoring) then searches as a new one of its type does."""
    if not spec.nlist:
        return spec
    return replace(spec, nprobe=min(spec.nlist, NPROBE), rerank=(rerank or None) if index_type(spec).rescored else None)


def outgrown(current: IndexSpec, wanted: IndexSpec) -> bool:
    """Whether an index built as ``current`` should be rebuilt as ``wanted``: another type or other
    codes, or a quarter of the lists the catalog now calls for. Not for one list count step
    (a power of two): a catalog that shrinks, or hovers at a step, would otherwise be retrained
    back and forth at every update."""
    lists_now, lists_wanted = current.nlist or 0, wanted.nlist or 0
    return current.kind != wanted.kind or current.codes != wanted.codes or lists_wanted >= 4 * lists_now > 0


def new_index(spec: IndexSpec) -> faiss.Index:
    index = faiss.index_factory(spec.dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    apply_search_params(index, spec)
    return index


def apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    params = faiss.ParameterSpace()
    if spec.nprobe:
        params.set_index_parameter(index, "nprobe", spec.nprobe)
    if spec.ef_search:
        params.set_index_parameter(index, "efSearch", spec.ef_search)
