"""How fashionlens items look in Milvus: the collection's schema, one row per item, the index
type by collection size, and ``Where`` as a Milvus filter expression (evaluated by the engine).

Row fields: ``id`` (primary key, the catalog id), ``vector``, ``path`` (the photo's URI),
``metadata`` (JSON: the catalog's other columns, as strings), ``attr_state`` (0: no attributes
yet, 1: stored, 2: the photo could not be read), ``attributes`` (JSON: per attribute name
``{"v": value number, "c": confidence, "s": [every value's score], "b": [x, y, w, h] or null}``,
or ``{"_error": reason}``) and ``features`` (the region features, float16 (attributes x dims),
base64; NaN rows where an attribute has none).

Written by hand: pymilvus gives the calls, not a mapping of our items or a way to quote values
(Milvus Lite does not take ``filter_params`` templates, so values are quoted here as JSON strings,
which Milvus's expression grammar reads the same way).
"""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np

from fashionlens.errors import UserError

KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ .\-]{0,127}")  # a metadata column or attribute name in a filter
ID_MAX, PATH_MAX, FEATURES_MAX = 512, 4096, 65_535
MILVUS_INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "DISKANN")


def schema(client, dim: int):
    from pymilvus import DataType

    s = client.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX)
    s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    s.add_field("path", DataType.VARCHAR, max_length=PATH_MAX)
    s.add_field("metadata", DataType.JSON)
    s.add_field("attr_state", DataType.INT8)
    s.add_field("attributes", DataType.JSON)
    s.add_field("features", DataType.VARCHAR, max_length=FEATURES_MAX)
    return s


def item_row(item_id: str, vector: np.ndarray, path: str, metadata: dict) -> dict:
    """A new item's row (no attributes yet)."""
    if len(item_id.encode()) > ID_MAX or len(str(path).encode()) > PATH_MAX:
        raise UserError(f"item {item_id[:80]!r}: ids of up to {ID_MAX} bytes and paths of up to {PATH_MAX} "
                        "bytes fit a Milvus row")
    return {"id": item_id, "vector": np.asarray(vector, np.float32).tolist(), "path": str(path),
            "metadata": {str(k): str(v) for k, v in metadata.items()}, "attr_state": 0, "attributes": {},
            "features": ""}


def attribute_fields(rows: list[tuple], names: list[str]) -> dict:
    """``item_attributes`` rows of one item (:func:`~fashionlens.index.attribute_indexing.item_rows`:
    key, attribute, value, confidence, scores float16 bytes, x, y, w, h, feature float16 bytes or
    None) -> the fields ``attr_state``, ``attributes`` and ``features`` of its Milvus row."""
    attributes, features = {}, None
    for _, a, value, conf, scores, x, y, w, h, feature in rows:
        attributes[names[a]] = {"v": int(value), "c": round(float(conf), 6),
                                "s": [round(float(s), 4) for s in np.frombuffer(scores, np.float16)],
                                "b": None if x is None else [int(x), int(y), int(w), int(h)]}
        if feature is not None:
            f = np.frombuffer(feature, np.float16)
            if features is None:
                features = np.full((len(names), len(f)), np.nan, np.float16)
            features[a] = f
    encoded = "" if features is None else base64.b64encode(features.tobytes()).decode()
    if len(encoded) > FEATURES_MAX:
        raise UserError(f"the region features take {len(encoded):,} bytes a row, Milvus's text field "
                        f"{FEATURES_MAX:,}: index the attributes with a smaller feature_dim")
    return {"attr_state": 1, "attributes": attributes, "features": encoded}


def failed_fields(reason: str) -> dict:
    return {"attr_state": 2, "attributes": {"_error": reason[:1000]}, "features": ""}


def read_attribute_fields(entity: dict, names: list[str], attrs: list[int] | None) -> list[tuple]:
    """A row's stored predictions as ``VectorStore.read_attributes`` gives them."""
    stored = entity.get("attributes") or {}
    if entity.get("attr_state") != 1 or "_error" in stored:
        return []
    features = None
    if entity.get("features"):
        features = np.frombuffer(base64.b64decode(entity["features"]), np.float16).reshape(len(names), -1)
    out = []
    for a, name in enumerate(names):
        if name not in stored or (attrs is not None and a not in attrs):
            continue
        s = stored[name]
        feature = None if features is None or np.isnan(features[a]).all() else features[a].copy()
        out.append((a, s["v"], s["c"], s["s"], tuple(s["b"]) if s["b"] else None, feature))
    return out


def quote(value: str) -> str:
    """A string literal of Milvus's expression grammar (double quotes, backslash escapes)."""
    return json.dumps(str(value), ensure_ascii=False)


def json_key(name: str, what: str) -> str:
    if not KEY.fullmatch(name):
        raise UserError(f"{what} {name[:80]!r}: a name of letters, digits, spaces, '_', '.' or '-' can be filtered on")
    return quote(name)


def where_expression(filters: dict[str, set[str]], wants: list[tuple[int, int]], min_confidence: float,
                     names: list[str] | None) -> str:
    """``Where`` as a Milvus boolean expression. A metadata column an item lacks counts as the value
    "" (as the local store reads it)."""
    terms = []
    for column, allowed in sorted(filters.items()):
        key = f"metadata[{json_key(column, 'metadata column')}]"
        options = [f"{key} == {quote(v)}" for v in sorted(allowed)]
        if "" in allowed:
            options.append(f"not exists {key}")
        terms.append("(" + " or ".join(options) + ")")
    for a, v in wants:
        key = f"attributes[{json_key(names[a], 'attribute')}]"
        terms.append(f'(attr_state == 1 and {key}["v"] == {int(v)} and {key}["c"] >= {float(min_confidence)!r})')
    return " and ".join(terms)


def index_for(n: int, kind: str, flat_max: int, hnsw_max: int, dim: int = 1280) -> dict:
    """The Milvus index for ``n`` vectors: ``kind`` as asked, or for ``auto`` FLAT up to
    ``flat_max`` (exact), HNSW up to ``hnsw_max``, IVF_SQ8 above (1 byte a dimension in memory).
    Build parameters scale with ``n`` as the local IVF types' do
    (docs/BENCHMARKS.md, "Milvus", for what each gives)."""
    if kind == "auto":
        kind = "FLAT" if n <= flat_max else "HNSW" if n <= hnsw_max else "IVF_SQ8"
    kind = kind.upper()
    if kind not in MILVUS_INDEX_TYPES:
        raise UserError(f"unknown Milvus index type {kind!r} (auto, {', '.join(MILVUS_INDEX_TYPES)})")
    nlist = int(min(65_536, max(16, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))
    m = max(d for d in range(1, min(128, dim) + 1) if dim % d == 0)  # PQ sub-quantisers divide dim
    params = {"HNSW": {"M": 32, "efConstruction": 200}, "IVF_FLAT": {"nlist": nlist},
              "IVF_SQ8": {"nlist": nlist}, "IVF_PQ": {"nlist": max(16, nlist // 2), "m": m, "nbits": 8},
              }.get(kind, {})
    return {"index_type": kind, "metric_type": "COSINE", "params": params}


def search_params(index: dict, k: int) -> dict:
    """The search-time parameters of ``index`` for top-``k``."""
    kind = index.get("index_type", "FLAT")
    if kind == "HNSW":
        return {"metric_type": "COSINE", "params": {"ef": max(128, k)}}
    if kind.startswith("IVF"):
        return {"metric_type": "COSINE", "params": {"nprobe": min(64, index["params"]["nlist"])}}
    if kind == "DISKANN":
        return {"metric_type": "COSINE", "params": {"search_list": max(100, k)}}
    return {"metric_type": "COSINE", "params": {}}
