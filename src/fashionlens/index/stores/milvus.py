"""``milvus://HOST:PORT/COLLECTION`` (a Milvus server or cluster, through ``pymilvus``; its token
in ``$FASHIONLENS_MILVUS_TOKEN``) and ``milvus+lite://PATH.db/COLLECTION`` (Milvus Lite, the
embedded build of the same engine, in this process: one process a file).

One row per item (:mod:`.milvus_rows`); what made the vectors (the ``index`` command's config,
the embedder, the attribute model) is recorded in the collection's properties, so every replica
and command reads it from Milvus and a store made by another model is refused. Filters run in
the engine as expressions. Nothing is kept on the local disk: any number of servers may share one
collection (``stateless``).

Consistency: reads that decide a change (does this id exist?) and counts ask for ``Strong``;
searches use the store's ``consistency`` (``Bounded`` by default: a search may miss an item added
through another replica for up to Milvus's staleness bound, a few seconds by default, and pays no
wait for the newest timestamp; ``Strong`` makes every add visible to the next search anywhere).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from fashionlens.errors import UserError
from fashionlens.index.stores import milvus_rows as rows_
from fashionlens.index.stores.base import STORES, SearchHit, VectorStore, Where

TOKEN_ENV = "FASHIONLENS_MILVUS_TOKEN"
PREFIX = "fashionlens."  # collection property keys of our meta
COLLECTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
GET_BATCH = 1000
CONSISTENCY = ("Strong", "Bounded", "Session", "Eventually")


def parse(location: str) -> tuple[str, str, bool]:
    """``(uri for MilvusClient, collection, lite)`` of a store location."""
    scheme, _, rest = location.partition("://")
    where, _, collection = rest.rstrip("/").rpartition("/")
    lite = scheme.lower() == "milvus+lite"
    if not where or not COLLECTION.fullmatch(collection):
        example = "milvus+lite://catalog.db/items" if lite else "milvus://localhost:19530/items"
        raise UserError(f"{location}: name the collection after the {'file' if lite else 'server'}, e.g. {example} "
                        "(a collection name is letters, digits and '_')")
    if lite:
        if not where.endswith(".db"):
            raise UserError(f"{location}: a Milvus Lite store is a file ending in .db, e.g. milvus+lite://catalog.db/items")
        return str(Path(where).expanduser().resolve()), collection, True
    return f"http://{where}", collection, False


# pymilvus pings every 10 s even on an idle connection. A Milvus server allows that, but a gRPC
# server with gRPC's default policy (``milvus-lite server`` among them) answers the third idle ping
# with GOAWAY "too many pings", after which pymilvus's shared connection cannot reconnect: a process
# idle for about two minutes (a serve replica at night, a test waiting on a subprocess) then fails
# every call. A long call without data (an index build over a million rows) is cut the same way, and
# pymilvus's retry of it then fails ("index already exists": seen in the 1,000,000-row benchmark).
# Milvus Lite in-process is such a server on a local port too. So: ping only during calls, less
# often than the policy's 5 minutes; a dropped idle connection is recovered by pymilvus on the next call.
KEEPALIVE = {"grpc.keepalive_permit_without_calls": 0, "grpc.keepalive_time_ms": 360_000}


def _client(uri: str, lite: bool, location: str):
    try:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException
    except ImportError:
        raise UserError("Milvus stores need pymilvus: pip install 'fashionlens[scale]'") from None
    try:
        if lite:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            return MilvusClient(uri, grpc_options=KEEPALIVE)
        return MilvusClient(uri, token=os.environ.get(TOKEN_ENV, ""), timeout=30, grpc_options=KEEPALIVE)
    except MilvusException as exc:
        if lite:
            raise UserError(f"{location}: cannot open the Milvus Lite file ({exc.message}); a Lite file is opened by "
                            "one process at a time: for several, serve it with 'milvus-lite server --data-dir "
                            f"{uri}' and use milvus://HOST:PORT/COLLECTION") from None
        raise UserError(f"{location}: cannot reach Milvus ({exc.message})") from None


@STORES.register("milvus", aliases=("milvus+lite",))
class MilvusStore(VectorStore):
    scheme = "milvus"
    stateless = True

    def __init__(self, location: str, create: bool = False, write: bool = False, consistency: str = "Bounded"):
        self.location, self.write = location, write
        if consistency not in CONSISTENCY:
            raise UserError(f"consistency {consistency!r}: one of {', '.join(CONSISTENCY)}")
        self.consistency = consistency
        uri, self.collection, self.lite = parse(location)
        self.client = _client(uri, self.lite, location)
        self._meta: dict | None = None
        if not self.client.has_collection(self.collection):
            if not create:
                self.client.close()
                raise UserError(f"{location}: no such collection; make it with "
                                f"'fashionlens index CATALOG --store {location}'")
            self._dim = None  # created by the first ensure(dim)
        else:
            self._dim = self._load()

    @classmethod
    def open(cls, location: str, create: bool = False, write: bool = False, **options) -> MilvusStore:
        return cls(location, create=create, write=write or create, **options)

    def _load(self) -> int:
        from pymilvus import DataType

        fields = {f["name"]: f for f in self.client.describe_collection(self.collection)["fields"]}
        if set(fields) != {"id", "vector", "path", "metadata", "attr_state", "attributes", "features"} or \
                fields["vector"]["type"] != DataType.FLOAT_VECTOR:
            raise UserError(f"{self.location}: this collection was not made by fashionlens (fields: "
                            f"{', '.join(fields)}); name another collection")
        state = self.client.get_load_state(self.collection)["state"]
        if getattr(state, "name", str(state)) != "Loaded":
            self.client.load_collection(self.collection)
        return int(fields["vector"]["params"]["dim"])

    def ensure(self, dim: int) -> None:
        """Create the collection for ``dim``-d vectors (a FLAT index until :meth:`fit_index`)."""
        if self._dim is not None:
            return
        params = self.client.prepare_index_params()
        first = rows_.index_for(0, "FLAT", 0, 0, dim)
        params.add_index("vector", index_type="FLAT", metric_type="COSINE")
        self.client.create_collection(self.collection, schema=rows_.schema(self.client, dim), index_params=params,
                                      consistency_level="Bounded",
                                      properties={PREFIX + "index": json.dumps(first)})
        self._dim, self._meta = dim, None

    # -- meta: the collection's properties -----------------------------------------------------------
    def _properties(self) -> dict:
        if self._meta is None:
            props = self.client.describe_collection(self.collection).get("properties", {}) if self._dim else {}
            self._meta = {k[len(PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(PREFIX)}
        return self._meta

    def get_meta(self, key: str, default=None):
        return self._properties().get(key, default)

    def set_meta(self, key: str, value) -> None:
        self.client.alter_collection_properties(self.collection, properties={PREFIX + key: json.dumps(value)})
        self._meta = None

    # -- reading ------------------------------------------------------------------------------------
    def count(self) -> int:
        if self._dim is None:
            return 0
        found = self.client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(found[0]["count(*)"])

    def _search(self, queries: np.ndarray, k: int, expression: str = "") -> list[list[SearchHit]]:
        from pymilvus.exceptions import MilvusException

        if queries.ndim != 2 or queries.shape[1] != self._dim:
            raise UserError(f"{self.location}: query vectors have {queries.shape[-1]} dims, the store {self._dim}")
        try:
            found = self.client.search(
                self.collection, data=np.asarray(queries, np.float32).tolist(), limit=k, filter=expression,
                output_fields=["path", "metadata"], search_params=rows_.search_params(self.get_meta("index", {}), k),
                consistency_level=self.consistency)
        except MilvusException as exc:
            raise UserError(f"{self.location}: search failed ({exc.message})") from None
        return [[SearchHit(h["id"], float(h["distance"]), h["entity"]["path"], h["entity"]["metadata"], h["id"])
                 for h in hits] for hits in found]

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[SearchHit]]:
        return self._search(queries, k)

    def search_where(self, vector: np.ndarray, k: int, where: Where, attributes=None) -> list[SearchHit]:
        names = attributes.names if attributes is not None else None
        expression = rows_.where_expression(where.filters, where.wants, where.min_confidence, names)
        return self._search(vector[None], k, expression)[0]

    def _get(self, ids: list[str], fields: list[str], consistency: str | None = None) -> list[dict]:
        out = []
        for start in range(0, len(ids), GET_BATCH):
            out += self.client.get(self.collection, ids=ids[start:start + GET_BATCH], output_fields=fields,
                                   consistency_level=consistency or self.consistency)
        return out

    def existing(self, ids: list[str]) -> dict[str, dict]:
        """{id: {path, metadata}} of those of ``ids`` stored now (``Strong``: what a rerun skips)."""
        if self._dim is None or not ids:
            return {}
        return {r["id"]: r for r in self._get(ids, ["path", "metadata"], "Strong")}

    def get_item(self, item_id: str) -> dict | None:
        found = self._get([item_id], ["path", "metadata"], "Strong") if self._dim else []
        if not found:
            return None
        r = found[0]
        return {"key": r["id"], "rowid": r["id"], "id": r["id"], "path": r["path"], "metadata": r["metadata"],
                "state": "embedded", "reason": None}

    def vectors(self, keys) -> tuple[np.ndarray, np.ndarray]:
        found = sorted(self._get(sorted({str(k) for k in keys}), ["vector"]), key=lambda r: r["id"])
        ids = np.asarray([r["id"] for r in found], dtype=object)
        return ids, np.asarray([r["vector"] for r in found], np.float32).reshape(len(found), self._dim)

    def read_attributes(self, keys: list, attrs: list[int] | None = None) -> dict:
        names = list((self.get_meta("attributes") or {}).get("schema", {}))
        wanted = None if attrs is None else set(attrs)
        out = {}
        for r in self._get([str(k) for k in dict.fromkeys(keys)], ["attr_state", "attributes", "features"]):
            if stored := rows_.read_attribute_fields(r, names, wanted):
                out[r["id"]] = stored
        return out

    def attribute_counts(self) -> tuple[int, int]:
        def count(expression: str) -> int:
            return int(self.client.query(self.collection, filter=expression, output_fields=["count(*)"],
                                         consistency_level="Strong")[0]["count(*)"])
        return count("attr_state == 1"), count("attr_state == 2")

    def summary(self) -> dict:
        return {"store": "milvus+lite" if self.lite else "milvus", "location": self.location,
                "items": {"embedded": self.count()}, "index": self.get_meta("index"),
                "embedder": self.get_meta("embedder"), "config": self.get_meta("config")}

    def iterate(self, expression: str, fields: list[str], batch: int = 1000):
        """Pages of rows meeting ``expression`` (a query iterator: no limit on the collection's size)."""
        it = self.client.query_iterator(self.collection, batch_size=batch, filter=expression,
                                        output_fields=fields, consistency_level="Strong")
        try:
            while page := it.next():
                yield page
        finally:
            it.close()

    # -- changing -----------------------------------------------------------------------------------
    def upsert(self, rows: list[dict], partial: bool = False) -> None:
        """Write rows keyed by id: an item written twice is one item (a rerun duplicates nothing).
        ``partial``: rows that carry only some fields (the others are kept)."""
        if rows:
            self.client.upsert(self.collection, rows, partial_update=partial)

    def remove(self, item_ids: list[str]) -> list[str]:
        present = set(self.existing(list(dict.fromkeys(item_ids))))
        if present:
            self.client.delete(self.collection, ids=sorted(present))
        return [i for i in item_ids if i not in present]

    def fit_index(self, log=None) -> dict:
        """Rebuild the vector index when the collection's size now calls for another type
        (``index_settings``: ``milvus_index``, ``flat_max``, ``milvus_hnsw_max``); the index in use."""
        settings = self.get_meta("index_settings", {})
        current = self.get_meta("index", {})
        wanted = rows_.index_for(self.count(), settings.get("milvus_index", "auto"), settings.get("flat_max", 20_000),
                                 settings.get("milvus_hnsw_max", 2_000_000), self._dim)
        if wanted == current:
            return current
        from pymilvus.exceptions import MilvusException

        (log or (lambda m: None))(f"building the Milvus index {wanted['index_type']} {wanted['params']}")
        self.client.release_collection(self.collection)
        self.client.drop_index(self.collection, "vector")
        try:
            self._create_index(wanted)
        except MilvusException as exc:  # a type this Milvus does not build (Milvus Lite: IVF_PQ, DISKANN)
            self._create_index(current or rows_.index_for(0, "FLAT", 0, 0, self._dim))  # searchable as before
            raise UserError(f"{self.location}: this Milvus does not build {wanted['index_type']} ({exc.message}); "
                            f"the index stays {current.get('index_type', 'FLAT')}: choose another milvus_index") from None
        self.set_meta("index", wanted)
        return wanted

    def _create_index(self, index: dict) -> None:
        params = self.client.prepare_index_params()
        params.add_index("vector", index_type=index["index_type"], metric_type="COSINE", params=index["params"])
        self.client.create_index(self.collection, params, sync=True)
        self.client.load_collection(self.collection)

    # -- attributes (fashionlens index-attributes) ------------------------------------------------
    def attribute_todo(self, page: int = 4096):
        for rows in self.iterate("attr_state != 1", ["id", "path"], page):
            yield [(r["id"], r["path"]) for r in rows]

    def attribute_todo_count(self) -> int:
        return int(self.client.query(self.collection, filter="attr_state != 1", output_fields=["count(*)"],
                                     consistency_level="Strong")[0]["count(*)"])

    def record_attributes(self, rows: list[tuple], explained: list, failed: list[tuple]) -> None:
        names = list(self.get_meta("attributes")["schema"])
        by_item: dict = {key: [] for key in explained}
        for row in rows:
            by_item[row[0]].append(row)
        self.upsert([{"id": key, **rows_.attribute_fields(stored, names)} for key, stored in by_item.items()]
                     + [{"id": key, **rows_.failed_fields(reason)} for key, reason in failed], partial=True)

    def clear_attributes(self) -> None:
        for rows in self.iterate("attr_state != 0", ["id"]):
            self.upsert([{"id": r["id"], "attr_state": 0, "attributes": {}, "features": ""} for r in rows], partial=True)
        self.client.alter_collection_properties(self.collection, properties={PREFIX + "attributes": "null"})
        self._meta = None

    def attribute_failures(self) -> list[tuple]:
        return [(r["id"], r["path"], r["attributes"].get("_error", "")) for rows in
                self.iterate("attr_state == 2", ["id", "path", "attributes"]) for r in rows]

    @property
    def report_folder(self) -> Path:
        return Path.cwd()

    def close(self) -> None:
        self.client.close()
