"""``fashionlens serve``: a real server process on localhost, driven over HTTP.

The index is the small world of known attributes (``attribute_world``): red garments have a
v-shape neckline and are black, blue ones a round neckline and are white.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from attribute_world import RED, build_attribute_world, draw
from conftest import all_vectors
from fashionlens.index import LocalStore
from fashionlens.cli.serve_process import Server

API_KEY = "test-key-0123456789abcdef"
KEY = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_attribute_world(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    """A read-write server on a copy of the index, shared by the tests that leave it as it was."""
    index = tmp_path_factory.mktemp("served") / "index"
    shutil.copytree(world["index"], index)
    config = index.parent / "serve.yaml"
    config.write_text("max_upload_mb: 1\ndefault_k: 5\nmax_k: 50\n")
    with Server(index, api_key=API_KEY, config=config) as srv:
        srv.index = index
        yield srv


def photo(world, n: int) -> bytes:
    return Path(world["rows"][n][1]).read_bytes()


def search(srv, data: bytes, **fields) -> httpx.Response:
    return srv.client.post("/api/search", files={"image": ("q.jpg", data, "image/jpeg")}, data=fields)


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and isinstance(body["error"], str) and body["error"]
    return body["error"]


# --- search ---------------------------------------------------------------------------------------


def test_search_is_exact_search_with_attributes_and_reasons(server, world):
    with closing(LocalStore(server.index)) as idx:
        rowids, vecs = all_vectors(idx)
        ids = {r: idx.store.get_rows([int(r)])[int(r)]["id"] for r in rowids}
    for n in (3, 8, 12):
        r = search(server, photo(world, n), k=13)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        got = [h["id"] for h in results]
        assert got[0] == f"item-{n:02d}" and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
        # the brute-force ranking by cosine against the stored vectors of the item's own photo
        query = vecs[[ids[r] for r in rowids].index(got[0])]
        want = [ids[rowids[i]] for i in np.argsort(-(vecs @ query), kind="stable")]
        assert sorted(got) == sorted(want) and [round(h["score"], 4) for h in results] == sorted(
            (round(float(s), 4) for s in vecs @ query), reverse=True)
        top = results[0]
        values = {a["name"]: a["value"] for a in top["attributes"]}
        red = top["id"] in RED
        assert values["neckline"] == ("v-shape" if red else "round") and values["colour"] == ("black" if red else "white")
        assert top["thumbnail"] == f"/api/items/{top['id']}/image?size=thumb"
        same = {s["attribute"] for s in top["reasons"]["same"]}
        assert {"neckline_labels", "colour_labels"} <= same and top["reasons"]["differs"] == []
        other = next(h for h in results if (h["id"] in RED) != red)
        assert "differs: neckline" in other["reasons"]["text"]
        q = {a["name"]: a["value"] for a in r.json()["query"]["attributes"]}
        assert q["neckline"] == values["neckline"]


def test_explain_off_default_k_want_and_filters(server, world):
    r = search(server, photo(world, 1), explain="false")
    results = r.json()["results"]
    assert len(results) == 5 and all(h["reasons"] == {} for h in results)  # default_k from the config
    assert all(h["attributes"] for h in results)  # stored predictions come without explaining
    r = search(server, photo(world, 1), k=4, want=["neckline=v-shape"])
    got = r.json()["results"]
    assert len(got) == 4 and all(h["id"] in RED for h in got)
    assert all(h["reasons"]["text"].startswith("wanted: v-shape neckline") for h in got)
    assert all("neckline (" not in h["reasons"]["text"] for h in got)  # the wanted change is not a "differs"
    plain = [h["id"] for h in search(server, photo(world, 1), k=13, explain="false").json()["results"]]
    assert [h["id"] for h in got] == [i for i in plain if i in RED][:4]  # the plain order, filtered
    # metadata filter: every world item is a Top
    assert len(search(server, photo(world, 1), k=3, filter=["articleType=Tops"]).json()["results"]) == 3
    assert search(server, photo(world, 1), k=3, filter=["articleType=Shoes"]).json()["results"] == []
    # the raw photo as the body, parameters in the query string
    r = server.client.post("/api/search?k=2&explain=false", content=photo(world, 2),
                           headers={"content-type": "image/jpeg"})
    assert [h["id"] for h in r.json()["results"]][0] == "item-02"


def test_items_images_and_explanations(server, world):
    item = server.client.get("/api/items/item-04").json()
    assert item["id"] == "item-04" and item["metadata"] == {"articleType": "Tops"}
    assert {a["name"] for a in item["attributes"]} == {"sleeve length", "neckline", "colour", "collar", "pattern"}
    full = server.client.get("/api/items/item-12/image")
    assert full.status_code == 200 and full.content == photo(world, 12)
    thumb = server.client.get("/api/items/item-12/image?size=thumb")
    img = Image.open(io.BytesIO(thumb.content))
    assert thumb.headers["content-type"] == "image/jpeg" and img.format == "JPEG" and max(img.size) <= 256
    r = server.client.get("/api/items/item-12/explanation?attribute=neckline")
    overlay = Image.open(io.BytesIO(r.content))
    assert r.status_code == 200 and overlay.format == "PNG" and overlay.size == (400, 300)
    # the overlay is the photo tinted by the heat map, with a green box: not the photo itself
    assert np.abs(np.asarray(overlay.convert("RGB"), float) - np.asarray(Image.open(io.BytesIO(photo(world, 12))), float)).mean() > 5
    error_of(server.client.get("/api/items/item-12/explanation?attribute=hemline"), 422)
    error_of(server.client.get("/api/items/nope/explanation?attribute=neckline"), 404)


def test_health_metrics_info_and_openapi(server):
    health = server.client.get("/health").json()
    assert health == {"status": "ok", "items": 13, "attributes": True, "writable": True,
                      "index": "IDMap2,Flat", "rebuilding": False}
    info = server.client.get("/api/info").json()
    assert info["max_k"] == 50 and {a["name"] for a in info["attributes"]} >= {"neckline", "colour"}
    spec = server.client.get("/openapi.json").json()
    assert {"/api/search", "/api/items", "/api/items/{item_id}", "/api/items/{item_id}/image",
            "/api/items/{item_id}/explanation", "/health", "/metrics"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/api/search"]["post"]["requestBody"]["content"]
    server.client.get("/api/items/does-not-exist")
    text = server.client.get("/metrics").text
    assert 'fashionlens_requests_total{method="GET",route="/api/items/{item_id}",status="404"}' in text
    assert "fashionlens_catalog_items 13.0" in text and "fashionlens_request_seconds_bucket" in text
    page = server.client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing fetched from the internet


def test_openapi_documents_the_request_bodies_and_the_api_key(server):
    """The OpenAPI schema is generated from the request models and the key's security schemes:
    both bodies list their fields, the search takes the photo alone too, and the routes that
    change the catalog (only those) declare the key."""
    spec = server.client.get("/openapi.json").json()
    body = spec["paths"]["/api/search"]["post"]["requestBody"]
    form = body["content"]["multipart/form-data"]["schema"]
    assert body["required"] and set(form["properties"]) == {"image", "k", "explain", "want", "filter"}
    assert form["required"] == ["image"] and form["properties"]["image"]["format"] == "binary"
    assert form["properties"]["k"]["type"] == "integer" and form["properties"]["explain"]["type"] == "boolean"
    assert form["properties"]["want"]["type"] == form["properties"]["filter"]["type"] == "array"
    assert {"image/jpeg", "image/png", "application/octet-stream"} <= set(body["content"])
    assert body["content"]["image/jpeg"]["schema"] == {"type": "string", "format": "binary"}
    query = {p["name"] for p in spec["paths"]["/api/search"]["post"]["parameters"] if p["in"] == "query"}
    assert query == {"k", "explain", "want", "filter"}  # the fields of a raw photo's request
    add = spec["paths"]["/api/items"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(add["properties"]) == {"image", "id", "metadata"} and add["required"] == ["image"]
    assert add["properties"]["image"]["format"] == "binary" and add["additionalProperties"] == {"type": "string"}
    schemes = spec["components"]["securitySchemes"]
    assert sorted(schemes.values(), key=lambda s: s["type"]) == [
        {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": schemes["APIKey"]["description"]},
        {"type": "http", "scheme": "bearer", "description": schemes["BearerKey"]["description"]}]
    for path, method in (("/api/items", "post"), ("/api/items/{item_id}", "delete")):
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"APIKey": []}, {"BearerKey": []}], (path, method)
        assert {"401", "403"} <= set(operation["responses"])
    for path, operation in [(p, op) for p, ops in spec["paths"].items() for m, op in ops.items()
                            if (p, m) not in {("/api/items", "post"), ("/api/items/{item_id}", "delete")}]:
        assert "security" not in operation, path
    error = spec["paths"]["/api/search"]["post"]["responses"]["415"]["content"]["application/json"]["schema"]
    assert spec["components"]["schemas"][error["$ref"].split("/")[-1]]["required"] == ["error", "status"]
    docs = server.client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


def test_the_key_may_come_as_a_bearer_token(server):
    c = server.client
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    assert "no item" in error_of(c.delete("/api/items/not-there", headers=bearer), 404)  # past the key check
    assert "API key" in error_of(c.delete("/api/items/item-01", headers={"Authorization": "Bearer wrong"}), 401)
    assert "API key" in error_of(c.delete("/api/items/item-01", headers={"X-API-Key": "wrong", **bearer}), 401)
    assert c.get("/health").json()["items"] == 13


def test_multipart_forms_are_parsed_within_their_limits(server, world):
    """One file, 64 text fields and 64 KiB a text field: a form past them is a 400, whichever route."""
    c, jpeg = server.client, photo(world, 3)
    image = {"image": ("q.jpg", jpeg, "image/jpeg")}
    for url, headers in (("/api/search", {}), ("/api/items", KEY)):
        two = [("image", ("a.jpg", jpeg)), ("image", ("b.jpg", jpeg))]
        cases = [
            (c.post(url, files=two, headers=headers), "Too many files"),
            (c.post(url, files=image, data={f"f{i}": "1" for i in range(65)}, headers=headers), "Too many fields"),
            (c.post(url, files=image, data={"want": "x" * (64 * 1024 + 1)}, headers=headers), "exceeded maximum size"),
        ]
        for n, (response, words) in enumerate(cases):
            assert words in error_of(response, 400), (url, n)
    assert search(server, jpeg, **{f"f{i}": "1" for i in range(64)}).status_code == 200  # the photo is not a field
    assert c.get("/health").json()["items"] == 13


# --- bad input ------------------------------------------------------------------------------------


def bomb_png() -> bytes:
    """10,000 x 10,000 pixels in a few kilobytes."""
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_input_gets_a_clear_4xx(server, world):
    c, jpeg = server.client, photo(world, 12)
    cases = [
        (c.post("/api/search"), 415, "multipart/form-data"),
        (c.post("/api/search", content=b"", headers={"content-type": "image/jpeg"}), 422, "empty"),
        (c.post("/api/search", files={"other": ("a", b"x")}), 422, "field 'image'"),
        (c.post("/api/search", data={"image": "text"}, files={"x": ("x", b"1")}), 422, "must be a file"),
        (c.post("/api/search", files={"image": ("a.jpg", b"", "image/jpeg")}), 422, "empty"),
        (c.post("/api/search", files={"image": ("a.jpg", b"GIF89a not really", "image/jpeg")}), 422, "not a usable photo"),
        (c.post("/api/search", files={"image": ("a.jpg", jpeg[: len(jpeg) // 3], "image/jpeg")}), 422, "truncated"),
        (c.post("/api/search", files={"image": ("b.png", bomb_png(), "image/png")}), 422, "pixels"),
        (c.post("/api/search", content=b"x" * (2 * 2**20), headers={"content-type": "image/jpeg"}), 413, "limit of 1 MB"),
        (c.post("/api/search", content=iter([b"x" * 2**16] * 40), headers={"content-type": "image/jpeg"}), 413, "limit"),
        (c.post("/api/search", content=iter([b"x" * (2**20 + 1)]), headers={"content-type": "image/jpeg"}), 413, "limit"),
        (c.post("/api/search?" + "k=1&" * 5000, content=jpeg, headers={"content-type": "image/jpeg"}), 414, "query string"),
        (c.post("/api/items", files={"image": ("a.jpg", jpeg)}, data={"id": "ok-3", "metadata": "[" * 5000}, headers=KEY),
         422, "JSON object"),
        (c.post("/api/search", files={"image": ("a.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")}),
         422, "supported format"),
        (c.post("/api/search", json={"image": "abc"}), 415, "content type 'application/json'"),
        (c.post("/api/search", content=b"--xx\r\nbroken", headers={"content-type": "multipart/form-data; boundary=xx"}), 422, "field 'image'"),
        (search(server, jpeg, k="ten"), 422, "whole number"),
        (search(server, jpeg, k="0"), 422, "between 1 and 50"),
        (search(server, jpeg, k="51"), 422, "between 1 and 50"),
        (search(server, jpeg, explain="maybe"), 422, "true or false"),
        (search(server, jpeg, want=["neckline=square"]), 422, "neckline is one of"),
        (search(server, jpeg, want=["hemline=long"]), 422, "ATTRIBUTE=VALUE"),
        (search(server, jpeg, filter=["gender"]), 422, "COLUMN=VALUE"),
        (c.get("/api/items/nope"), 404, "no item 'nope'"),
        (c.get("/api/items/nope/image"), 404, "no item"),
        (c.get("/api/items/..%2F..%2Fetc%2Fpasswd"), 404, ""),
        (c.get("/api/items/%2e%2e/image"), 404, ""),
        (c.get("/api/items/a%20b"), 404, "no item 'a b'"),
        (c.get("/api/items/item-01/image?size=huge"), 422, "thumb"),
        (c.get("/nothing/here"), 404, "no such page"),
        (c.put("/api/search"), 405, ""),
        (c.post("/api/items", files={"image": ("a.jpg", jpeg)}), 401, "API key"),
        (c.post("/api/items", files={"image": ("a.jpg", jpeg)}, headers={"X-API-Key": "wrong"}), 401, "API key"),
        (c.delete("/api/items/item-01"), 401, "API key"),
        (c.post("/api/items", files={"image": ("a.jpg", jpeg)}, data={"id": "item-01"}, headers=KEY), 409, "exists"),
        (c.post("/api/items", files={"image": ("a.jpg", jpeg)}, data={"id": "../etc/x"}, headers=KEY), 422, "item id"),
        (c.post("/api/items", files={"image": ("a.jpg", jpeg)}, data={"id": "ok-1", "metadata": "{"}, headers=KEY),
         422, "JSON object"),
        (c.post("/api/items", files={"image": ("a.jpg", b"nope")}, data={"id": "ok-2"}, headers=KEY), 422, "usable photo"),
        (c.delete("/api/items/not-there", headers=KEY), 404, "no item"),
    ]
    for n, (response, status, words) in enumerate(cases):
        assert words in error_of(response, status), (n, response.text)
    assert c.get("/health").json()["items"] == 13  # nothing stored changed
    assert "Traceback" not in "".join(server.log)


def test_read_only_without_a_key(world, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(world["index"], index)
    with Server(index, api_key=None) as srv:
        assert srv.client.get("/health").json()["writable"] is False
        r = srv.client.post("/api/items", files={"image": ("a.jpg", photo(world, 1))}, headers=KEY)
        assert "read-only" in error_of(r, 403)
        assert search(srv, photo(world, 1), k=1).json()["results"][0]["id"] == "item-01"


# --- changing the catalog ------------------------------------------------------------------------


def new_photo(tmp_path: Path, i: int) -> bytes:
    path = tmp_path / f"new-{i}.jpg"
    draw(path, i, (64, 80))
    return path.read_bytes()


def test_added_items_survive_kill_9(world, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(world["index"], index)
    data = new_photo(tmp_path, 40)
    with Server(index, api_key=API_KEY) as srv:
        r = srv.client.post("/api/items", files={"image": ("new.jpg", data, "image/jpeg")},
                            data={"id": "new-40", "metadata": json.dumps({"articleType": "Dresses"}), "season": "Summer"},
                            headers=KEY)
        assert r.status_code == 201, r.text
        added = r.json()
        assert added["metadata"] == {"articleType": "Dresses", "season": "Summer"}
        assert {a["name"]: a["value"] for a in added["attributes"]}["colour"] == "black"  # red: explained on add
        r = srv.client.post("/api/items", files={"image": ("n.jpg", new_photo(tmp_path, 41), "image/jpeg")}, headers=KEY)
        generated = r.json()["id"]
        assert r.status_code == 201 and generated.startswith("u")
        assert srv.client.delete("/api/items/item-05", headers=KEY).json() == {"deleted": "item-05"}
        assert search(srv, data, k=1).json()["results"][0]["id"] == "new-40"
        srv.kill()  # no shutdown: the FAISS file was not rewritten
    with Server(index, api_key=API_KEY) as srv:
        assert srv.client.get("/health").json()["items"] == 13 + 2 - 1
        assert srv.client.get("/api/items/new-40/image").content == data
        assert search(srv, data, k=1, filter=["season=Summer"]).json()["results"][0]["id"] == "new-40"
        assert srv.client.get(f"/api/items/{generated}").status_code == 200
        error_of(srv.client.get("/api/items/item-05"), 404)
        ids = [h["id"] for h in search(srv, photo(world, 5), k=20).json()["results"]]
        assert "item-05" not in ids and len(ids) == 14
        assert srv.client.delete("/api/items/new-40", headers=KEY).status_code == 200
        assert srv.stop() == 0  # a clean stop writes the FAISS file
    uploads = list((index / "uploads").rglob("*.*"))
    assert len(uploads) == 1  # new-40's photo went with it; the other stays
    with closing(LocalStore(index)) as idx:  # the saved index matches the store exactly
        assert idx.load().ntotal == idx.store.count("embedded") == 13
        assert not idx.store.tombstones() and not idx.store.chunks(in_index=False)


def test_concurrent_searches_during_adds_and_deletes_see_a_consistent_catalog(world, tmp_path):
    """Searches for a photo that is added and deleted over and over: each sees it whole (first,
    with its stored attributes) or not at all; the other items never change."""
    index = tmp_path / "index"
    shutil.copytree(world["index"], index)
    data = new_photo(tmp_path, 50)
    errors, seen = [], {"with": 0, "without": 0}
    stop = threading.Event()
    with Server(index, api_key=API_KEY) as srv:
        def searcher():
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                while not stop.is_set():
                    r = c.post("/api/search", files={"image": ("q.jpg", data)}, data={"k": "14", "explain": "false"})
                    if r.status_code != 200:
                        errors.append(r.text)
                        continue
                    hits = r.json()["results"]
                    ids = [h["id"] for h in hits]
                    if "flux" in ids:
                        ok = ids[0] == "flux" and len(hits[0]["attributes"]) == 5 and len(ids) == 14
                        seen["with"] += 1
                    else:
                        ok = len(ids) == 13
                        seen["without"] += 1
                    if not ok or len(set(ids) - {"flux"}) != 13:
                        errors.append(ids)

        threads = [threading.Thread(target=searcher) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            for _ in range(6):
                r = srv.client.post("/api/items", files={"image": ("f.jpg", data)}, data={"id": "flux"}, headers=KEY)
                assert r.status_code == 201, r.text
                assert srv.client.delete("/api/items/flux", headers=KEY).status_code == 200
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert not errors, errors[:3]
    assert seen["with"] > 0 and seen["without"] > 0, seen  # both states were seen, never a third


def test_a_second_writer_is_refused(server):
    with pytest.raises(RuntimeError, match="another fashionlens process is writing"):
        Server(server.index, api_key=API_KEY, timeout=120)


def test_items_added_by_api_do_not_collide_with_a_rebuilt_chunk(world, tmp_path):
    """The chunk rows an add commits are the same a later 'fashionlens index' run reads back."""
    index = tmp_path / "index"
    shutil.copytree(world["index"], index)
    with Server(index, api_key=API_KEY) as srv:
        assert srv.client.post("/api/items", files={"image": ("a.jpg", new_photo(tmp_path, 46))},
                               data={"id": "added"}, headers=KEY).status_code == 201
    with closing(sqlite3.connect(index / "catalog.sqlite")) as db:
        rowid, chunk = db.execute("SELECT rowid, chunk FROM items WHERE item_id='added'").fetchone()
    with closing(LocalStore(index)) as idx:
        ids, vecs = idx.chunks.read(chunk)
        assert ids.tolist() == [rowid] and vecs.shape == (1, idx.load().d)
        idx.refresh(rebuild=True, save=False)
        assert idx.load().ntotal == 14


def test_the_faiss_file_catches_up_while_serving(world, tmp_path):
    """With persist_seconds: 1 the server rewrites the FAISS file soon after an add, without
    stopping: a restart then has nothing to replay."""

    index = tmp_path / "index"
    shutil.copytree(world["index"], index)
    config = tmp_path / "serve.yaml"
    config.write_text("persist_seconds: 1\n")
    with Server(index, api_key=API_KEY, config=config) as srv:
        assert srv.client.post("/api/items", files={"image": ("a.jpg", new_photo(tmp_path, 44))},
                               data={"id": "saved"}, headers=KEY).status_code == 201
        deadline, pending = time.monotonic() + 60, True
        while pending and time.monotonic() < deadline:
            time.sleep(0.5)
            with closing(sqlite3.connect(index / "catalog.sqlite")) as db:
                pending = db.execute("SELECT COUNT(*) FROM chunks WHERE in_index=0").fetchone()[0] > 0
        assert not pending
        srv.kill()
    with closing(LocalStore(index)) as idx:
        assert idx.load().ntotal == 14  # read from the file as it is: the add is in it


def test_a_server_started_with_a_relative_path_keeps_its_uploads_reachable(world, tmp_path):
    """Uploaded photos are stored by absolute path: a restart from elsewhere still serves them."""
    index = tmp_path / "index"
    shutil.copytree(world["index"], index)
    data = new_photo(tmp_path, 48)
    with Server(Path("index"), api_key=API_KEY, cwd=tmp_path) as srv:
        assert srv.client.post("/api/items", files={"image": ("a.jpg", data)}, data={"id": "rel"},
                               headers=KEY).status_code == 201
    with Server(index, api_key=API_KEY, cwd=tmp_path / "index" / "vectors") as srv:
        assert srv.client.get("/api/items/rel/image").content == data
        assert srv.client.delete("/api/items/rel", headers=KEY).status_code == 200
    assert not list((index / "uploads").rglob("*.jpeg")) and not list((index / "uploads").rglob("*.jpg"))


def test_every_upload_format_is_known_to_pillow():
    from PIL import Image

    from fashionlens.serving.uploads import UPLOAD_FORMATS

    Image.init()
    assert set(UPLOAD_FORMATS) <= set(Image.OPEN)


def test_model_workers_share_max_batch_and_embed_as_one_model(world):
    """Two workers on an even share of ``max_batch`` each: every model call stays within its
    share, and every photo gets the vector the single-worker server gives it."""
    import torch

    from fashionlens.serving.config import ServeConfig
    from fashionlens.serving.live import LiveCatalog
    from fashionlens.serving.uploads import decode_photo

    import faiss

    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()  # the server sets both
    photos = [decode_photo(photo(world, n % 12), max_pixels=10**7) for n in range(24)]
    try:
        one = LiveCatalog(world["index"], ServeConfig(model_workers=1))
        try:
            expect = [one.embed(p) for p in photos]
        finally:
            one.close()
        live = LiveCatalog(world["index"], ServeConfig(model_workers=2, max_batch=5))
        sizes: list[int] = []
        live.batch.on_batch = sizes.append
        try:
            assert live.batch.max_batch == 3 and len(live.batch._threads) == 2
            with ThreadPoolExecutor(12) as pool:
                got = list(pool.map(live.embed, photos))
        finally:
            live.close()
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(faiss_threads)
    assert sum(sizes) == len(photos) and max(sizes) <= 3
    for vec, ref in zip(got, expect):
        np.testing.assert_allclose(vec, ref, atol=1e-4)


def test_explain_workers_side_by_side_agree_with_one(world, tmp_path):
    """Closed-form CAMs run in as many explain workers as model workers, with no lock, and
    every photo gets the attributes (values, confidences, boxes) one worker gives it; an index
    explained with Grad-CAM keeps one worker behind the lock (its hooks are per call)."""
    import torch

    import faiss

    from fashionlens.index.config import SearchConfig
    from fashionlens.serving.config import ServeConfig
    from fashionlens.index.attribute_store import META_KEY
    from fashionlens.serving.live import LiveCatalog
    from fashionlens.serving.uploads import decode_photo

    def attrs(result):
        return [(a.attribute, a.value, a.confidence, a.box) for a in result]

    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    photos = [decode_photo(photo(world, n % 12), max_pixels=10**7) for n in range(16)]
    cfg = SearchConfig(k=3, explain=True)
    try:
        one = LiveCatalog(world["index"], ServeConfig(model_workers=1))
        try:
            assert len(one.explain_batch._threads) == 1
            expect = [attrs(one.search(p, cfg, one.plan(cfg))[1]) for p in photos]
        finally:
            one.close()
        live = LiveCatalog(world["index"], ServeConfig(model_workers=2))
        try:
            assert live.explainer.concurrent and len(live.explain_batch._threads) == 2
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda p: attrs(live.search(p, cfg, live.plan(cfg))[1]), photos))
        finally:
            live.close()
        grad = tmp_path / "gradcam-index"
        shutil.copytree(world["index"], grad)
        index = LocalStore(grad, write=True)
        try:
            index.store.set_meta(META_KEY, {**index.store.get_meta(META_KEY), "method": "gradcam"})
        finally:
            index.close()
        locked = LiveCatalog(grad, ServeConfig(model_workers=2))
        try:
            assert not locked.explainer.concurrent and len(locked.explain_batch._threads) == 1
            assert isinstance(locked.model_lock, type(threading.Lock()))
        finally:
            locked.close()
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(faiss_threads)
    assert all(len(row) > 0 for row in got) and len(got) == len(expect)
    for row, ref in zip(got, expect):
        assert [a[:2] + a[3:] for a in row] == [a[:2] + a[3:] for a in ref]  # names, values, boxes
        np.testing.assert_allclose([a[2] for a in row], [a[2] for a in ref], atol=1e-5)


def _grown_copy(world, tmp_path: Path, n_fake: int, flat_max: int) -> Path:
    """A copy of the world's index with ``n_fake`` more items (random unit vectors, far from every
    photo's) committed as a server's adds leave them, and ``flat_max`` in its settings."""
    from fashionlens.data.records import Item

    index = tmp_path / "index"
    shutil.copytree(world["index"], index)
    with closing(LocalStore(index, write=True)) as idx:
        store = idx.store
        dim = store.get_meta("embedder")["dim"]
        store.set_meta("index_settings", {**store.get_meta("index_settings", {}), "flat_max": flat_max})
        store.upsert([Item(f"fake-{i}", Path(f"/fake/{i}.jpg"), {}) for i in range(n_fake)], store.new_run())
        rowids = [r for page in store.pending(10**6) for r, _ in page]
        vecs = np.random.default_rng(0).normal(size=(n_fake, dim)).astype(np.float32)
        chunk = store.next_chunk()
        idx.chunks.write(chunk, np.asarray(rowids, np.int64), vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
        store.commit_chunk(chunk, rowids, [])
    return index


def _top(live, data: bytes, k: int = 1) -> list[str]:
    from fashionlens.index.config import SearchConfig
    from fashionlens.serving.uploads import decode_photo

    cfg = SearchConfig(k=k, explain=False)
    hits, _ = live.search(decode_photo(data, max_pixels=10**7), cfg, live.plan(cfg))
    return [h.id for h in hits]


def test_a_writable_server_rebuilds_an_outgrown_index_beside_the_one_in_use(world, tmp_path, monkeypatch, caplog):
    """A catalog past flat_max, left flat by a server's adds: the next server starts on the flat
    index at once and rebuilds it as IVF-Flat in the background (held here until released). A
    stop meanwhile keeps the flat generation and everything added; the next start rebuilds
    again, and adds and removals made during the rebuild are in the index it swaps in."""
    import torch

    import faiss

    from fashionlens.serving.config import ServeConfig
    from fashionlens.serving.live import LiveCatalog
    from fashionlens.serving.uploads import decode_photo

    index = _grown_copy(world, tmp_path, 800, flat_max=700)
    release, original = threading.Event(), LocalStore.build

    def held_build(self, plan, log=None):
        assert release.wait(120)
        return original(self, plan, log)

    monkeypatch.setattr(LocalStore, "build", held_build)
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    cfg = ServeConfig(model_workers=1, persist_seconds=3600)
    try:
        live = LiveCatalog(index, cfg, writable=True)  # returns while the rebuild is held
        try:
            assert live.rebuilding and live.index.spec.kind == "flat" and live.index.load().ntotal == 813
            assert live.index_state() == {"index": "IDMap2,Flat", "rebuilding": True}
            assert _top(live, photo(world, 3)) == ["item-03"]
            live.add("before-stop", decode_photo(new_photo(tmp_path, 52), 10**7), {})
        finally:
            live.close()
        stopped = live._rebuilder
        release.set()
        stopped.join(60)
        assert not stopped.is_alive()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # a quiet stop, not a failure
        assert not list(index.glob("rebuild-staged*"))
        with closing(LocalStore(index)) as idx:  # the rebuild did not swap after the stop
            assert idx.spec.kind == "flat" and idx.load().ntotal == 814 and not idx.store.chunks(in_index=False)

        release.clear()
        live = LiveCatalog(index, cfg, writable=True)
        try:
            assert live.rebuilding and live.index.spec.kind == "flat"
            added = new_photo(tmp_path, 53)
            live.add("during", decode_photo(added, 10**7), {})
            live.remove("item-05")
            assert _top(live, added) == ["during"]
            release.set()
            live._rebuilder.join(120)
            assert not live.rebuilding
            spec = live.index.spec
            assert spec.kind == "ivfflat" and spec.factory == "IVF16,Flat" and live.index._spec.nprobe == 16
            assert live.index.load().ntotal == 813 + 2 - 1
            assert _top(live, added) == ["during"] and _top(live, photo(world, 3)) == ["item-03"]
            assert "item-05" not in _top(live, photo(world, 5), k=20)
            assert _top(live, new_photo(tmp_path, 52)) == ["before-stop"]
            assert live.rebuild() is False  # nothing more to rebuild
        finally:
            live.close()
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(faiss_threads)
    with closing(LocalStore(index)) as idx:
        assert idx.spec.kind == "ivfflat" and idx.load().ntotal == 814
        assert not idx.store.tombstones() and not idx.store.chunks(in_index=False)


def test_a_catalog_grown_through_the_api_is_rebuilt_while_serving(world, tmp_path):
    """Adds through the API take the catalog past its structure's size (622 items, flat; two
    adds make it 624 = IVF_MIN, over flat_max; after one it is still under IVF_MIN): the add that
    crosses it starts the rebuild (the FAISS file is not due for 300 s), the server rebuilds it as
    IVF-Flat without stopping, and the searches stay exact."""
    from fashionlens.index.types import IVF_MIN

    index = _grown_copy(world, tmp_path, IVF_MIN - 2 - 13, flat_max=100)
    with Server(index, api_key=API_KEY) as srv:
        for n in (54, 55):
            assert srv.client.post("/api/items", files={"image": ("a.jpg", new_photo(tmp_path, n))},
                                   data={"id": f"grow-{n}"}, headers=KEY).status_code == 201
        deadline, spec = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            time.sleep(0.5)
            with closing(sqlite3.connect(index / "catalog.sqlite")) as db:
                spec = json.loads(db.execute("SELECT value FROM meta WHERE key='index_spec'").fetchone()[0])
            if spec["kind"] == "ivfflat":
                break
        assert spec["kind"] == "ivfflat", spec
        health = srv.client.get("/health").json()
        assert health["items"] == IVF_MIN and health["index"] == "IVF16,Flat"
        deadline = time.monotonic() + 10  # the log line follows the commit
        while not any("IVF16,Flat in use: 624 vectors, rebuilt in" in line for line in srv.log):
            assert time.monotonic() < deadline, "".join(srv.log)
            time.sleep(0.2)
        assert srv.client.get("/health").json()["rebuilding"] is False
        assert "fashionlens_index_rebuilding 0.0" in srv.client.get("/metrics").text
        for n in (54, 55):
            assert search(srv, new_photo(tmp_path, n), k=1).json()["results"][0]["id"] == f"grow-{n}"
        assert search(srv, photo(world, 4), k=1).json()["results"][0]["id"] == "item-04"


def test_faiss_threads_reach_the_model_workers(world):
    """OpenMP keeps omp_set_num_threads per thread: the setting must be made in the workers
    that search, not only in the thread that opened the catalog."""
    import torch

    import faiss

    from fashionlens.serving.config import ServeConfig
    from fashionlens.serving.live import LiveCatalog

    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    wanted = faiss_threads + 3  # not what a thread gets by default
    seen = []
    try:
        live = LiveCatalog(world["index"], ServeConfig(model_workers=2, faiss_threads=wanted))
        try:
            search = live.index.search
            live.index.search = lambda *a, **kw: (seen.append((threading.get_ident(), faiss.omp_get_max_threads())),
                                                  search(*a, **kw))[1]
            with ThreadPoolExecutor(4) as pool:
                assert all(ids == [f"item-{n:02d}"] for n, ids in
                           zip(range(8), pool.map(lambda n: _top(live, photo(world, n)), range(8))))
        finally:
            live.close()
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(faiss_threads)
    assert seen and all(n == wanted for _, n in seen) and threading.get_ident() not in {t for t, _ in seen}


def test_a_failed_rebuild_keeps_the_index_in_use_and_waits_before_trying_again(world, tmp_path, monkeypatch, caplog):
    """A rebuild that fails at the swap (a full disk, say) leaves the flat index serving with
    everything added, logs it once, and is not retried at once; after the wait it succeeds."""
    import torch

    import faiss

    from fashionlens.serving.config import ServeConfig
    from fashionlens.serving import live as live_module
    from fashionlens.serving.live import LiveCatalog
    from fashionlens.serving.uploads import decode_photo

    index = _grown_copy(world, tmp_path, 800, flat_max=700)
    original, calls = LocalStore.finish_rebuild, []

    def failing_once(self, plan, removed):
        calls.append(len(calls))
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return original(self, plan, removed)

    monkeypatch.setattr(LocalStore, "finish_rebuild", failing_once)
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        live = LiveCatalog(index, ServeConfig(model_workers=1, persist_seconds=3600), writable=True)
        try:
            live._rebuilder.join(120)
            assert calls == [0] and live.index.spec.kind == "flat" and live._rebuild_failures == 1
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and "cannot rebuild the index" in errors[0].getMessage() and errors[0].exc_info
            assert not list(index.glob("rebuild-staged*"))  # its staged file is not left on a full disk
            assert live._rebuild_retry_at - time.monotonic() > live_module.REBUILD_RETRY - 60
            assert live.rebuild() is False and not live.rebuilding  # waits before trying again
            live.add("kept", decode_photo(new_photo(tmp_path, 42), 10**7), {})
            assert _top(live, new_photo(tmp_path, 42)) == ["kept"]
            live._rebuild_retry_at = 0.0  # the wait is over
            assert live.rebuild() is True
            live._rebuilder.join(120)
            assert calls == [0, 1] and live.index.spec.kind == "ivfflat" and live._rebuild_failures == 0
            assert _top(live, new_photo(tmp_path, 42)) == ["kept"] and live.index.load().ntotal == 814
        finally:
            live.close()
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(faiss_threads)
