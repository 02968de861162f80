"""Property-based fuzzing of the running server (hypothesis): whatever a client sends, the answer
is a 2xx, or a 4xx JSON error with a message; never a 5xx, never a dropped connection, and the
catalog does not change unless a valid key asked it to."""

from __future__ import annotations

import io
import shutil

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from attribute_world import build_attribute_world
from fashionlens.cli.serve_process import Server

API_KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    world = build_attribute_world(tmp_path_factory.mktemp("fuzz"))
    index = world["root"] / "served"
    shutil.copytree(world["index"], index)
    config = world["root"] / "serve.yaml"
    config.write_text("max_upload_mb: 0.25\nmax_pixels: 4000000\nmodel_workers: 2\n")  # two model threads here
    with Server(index, api_key=API_KEY, config=config) as srv:
        srv.photo = open(world["rows"][3][1], "rb").read()
        yield srv


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def photos(real: bytes):
    """Real photos, cut, corrupted or replaced by junk."""
    return st.one_of(
        st.just(real),
        st.binary(max_size=2048),
        st.integers(0, len(real)).map(lambda n: real[:n]),
        st.tuples(st.integers(0, len(real) - 1), st.binary(min_size=1, max_size=16)).map(
            lambda t: real[:t[0]] + t[1] + real[t[0] + len(t[1]):]),
        st.sampled_from([_png(1, 1), _png(3000, 2000), b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a", b"%PDF-1.4"]),
    )


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
CTYPES = st.sampled_from(["image/jpeg", "image/png", "application/json", "text/plain", "application/octet-stream",
                          "multipart/form-data", "multipart/form-data; boundary=zz", "", "image/*;;;"])
ID = st.one_of(TEXT, st.sampled_from(["item-03", "..", "../..", "%2e%2e%2f", "a/b", "item-03/../../x", " ", "é",
                                      "x" * 300, "%00", "item-03%00"]))


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert body["status"] == response.status_code and body["error"].strip()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_any_search_request_is_answered_without_a_5xx(server, data):
    photo = data.draw(photos(server.photo))
    fields = data.draw(st.dictionaries(st.sampled_from(["k", "explain", "want", "filter", "image", "other"]),
                                       TEXT, max_size=4))
    how = data.draw(st.sampled_from(["multipart", "raw", "params"]))
    c = server.client
    if how == "multipart":
        name = data.draw(st.sampled_from(["image", "image", "photo"]))
        r = c.post("/api/search", files={name: ("x", photo, data.draw(CTYPES))}, data=fields)
    elif how == "raw":
        r = c.post("/api/search", content=photo, headers={"content-type": data.draw(CTYPES)})
    else:
        r = c.post("/api/search", params=fields, content=photo, headers={"content-type": "image/jpeg"})
    check(r)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(item_id=ID, method=st.sampled_from(["GET", "DELETE", "POST", "PUT"]),
       tail=st.sampled_from(["", "/image", "/image?size=thumb", "/image?size=%00", "/explanation",
                             "/explanation?attribute=neckline", "/explanation?attribute=%ff"]),
       key=st.sampled_from([None, "wrong", ""]))
def test_any_item_request_is_answered_without_a_5xx(server, item_id, method, tail, key):
    headers = {"X-API-Key": key} if key is not None else {}
    url = "/api/items/" + item_id.replace("?", "%3F").replace("#", "%23") + tail
    try:
        r = server.client.request(method, url, headers=headers)
    except httpx.InvalidURL:
        return  # the client refuses to send it: nothing reaches the server
    check(r)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_adds_with_bad_parts_are_refused_and_change_nothing(server, data):
    photo = data.draw(photos(server.photo).filter(lambda p: p != server.photo))
    nested = st.sampled_from(["[" * 5000, '{"a":' * 3000, '{"a": {"b": 1}}', "[1, 2]", "null", '{"a": "b"}'])
    fields = data.draw(st.fixed_dictionaries({}, optional={"id": ID, "metadata": st.one_of(TEXT, nested),
                                                            "colour": TEXT}))
    before = server.client.get("/health").json()["items"]
    r = server.client.post("/api/items", files={"image": ("x.jpg", photo)}, data=fields, headers={"X-API-Key": API_KEY})
    check(r)
    after = server.client.get("/health").json()["items"]
    assert after == before + (r.status_code == 201)
    if r.status_code == 201:  # a junk-looking body can still be a decodable photo: take it back out
        assert server.client.delete(f"/api/items/{r.json()['id']}", headers={"X-API-Key": API_KEY}).status_code == 200


def test_the_server_log_has_no_traceback(server):
    assert server.client.get("/health").status_code == 200
    assert "Traceback" not in "".join(server.log), "".join(server.log)[-3000:]
