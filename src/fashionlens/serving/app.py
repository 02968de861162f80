"""The FastAPI application of ``fashionlens serve``: JSON API, images, explanations, metrics, page.

Every error is a JSON body ``{"error": message, "status": code}`` with a 4xx code: bad photos
(422), bodies over the limit (413), wrong content types (415), unknown ids (404), a taken id
(409), a missing or wrong API key (401), a read-only catalog (403).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import mimetypes
import time
from contextlib import asynccontextmanager
from functools import lru_cache
from importlib import resources
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from fashionlens.data.images import ImageError
from fashionlens.errors import UserError
from fashionlens.serving.batcher import Closing
from fashionlens.serving.live import Conflict, LiveCatalog, NotFound
from fashionlens.serving.uploads import BadPhoto, check_id, decode_photo
from fashionlens.serving.metrics import Guard, Metrics

log = logging.getLogger("fashionlens.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


PHOTO_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary", "description": "the photo (JPEG, PNG, WebP ...)"},
        "k": {"type": "integer", "minimum": 1}, "explain": {"type": "boolean"},
        "want": {"type": "array", "items": {"type": "string"}, "description": "ATTR=VALUE, e.g. neckline=v-shape"},
        "filter": {"type": "array", "items": {"type": "string"}, "description": "COLUMN=VALUE, e.g. gender=Men"}}}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}}}}}

ITEM_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"},
        "id": {"type": "string", "description": "item id (default: from the photo's hash)"},
        "metadata": {"type": "string", "description": "JSON object of strings; other text fields are added to it"}}}}}}}


def create_app(live: LiveCatalog, api_key: str | None = None) -> FastAPI:
    cfg = live.cfg
    metrics = Metrics(live)
    writable = live.writable and api_key is not None  # items can be added and deleted

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(live.close)

    app = FastAPI(title="fashionlens", version="0.1.0", lifespan=lifespan,
                  description="Find clothes by photo in a catalog, and see why each result matches.")
    app.add_middleware(Guard, metrics=metrics, max_body=int(cfg.max_upload_mb * 1024 * 1024))
    static = resources.files("fashionlens.serving") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    # -- errors -------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such page: {request.url.path[:200]}"
        return error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):  # a bug: logged with its traceback, reported as one line
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server's log has the details")

    # -- helpers ------------------------------------------------------------------------------------
    async def read_photo(request: Request, form_fields: dict) -> bytes:
        """The photo from a multipart field ``image``, or the whole body for an image/* type."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=64, max_part_size=64 * 1024)
            for key in form.keys():
                if key != "image":
                    form_fields[key] = [v for v in form.getlist(key) if isinstance(v, str)]
            upload = form.get("image")
            if upload is None:
                raise ApiError(422, "no photo: send it in the multipart field 'image'")
            if not isinstance(upload, UploadFile):
                raise ApiError(422, "the field 'image' must be a file, not text")
            return await upload.read()
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return await request.body()
        raise ApiError(415, f"content type {ctype or '(none)'!r}: send multipart/form-data with the photo in the "
                            "field 'image', or the photo itself as image/jpeg, image/png ...")

    def field(name: str, fields: dict, request: Request, many: bool = False):
        values = fields.get(name) or request.query_params.getlist(name)
        return values if many else (values[-1] if values else None)

    def parse_int(text, name: str, default: int, high: int) -> int:
        if text is None or text == "":
            return default
        try:
            value = int(text)
        except ValueError:
            raise ApiError(422, f"{name} must be a whole number, got {str(text)[:40]!r}") from None
        if not 1 <= value <= high:
            raise ApiError(422, f"{name} must be between 1 and {high}, got {value}")
        return value

    def parse_bool(text, name: str) -> bool:
        if text is None or text == "":
            return False
        if str(text).lower() in ("1", "true", "yes", "on"):
            return True
        if str(text).lower() in ("0", "false", "no", "off"):
            return False
        raise ApiError(422, f"{name} must be true or false, got {str(text)[:40]!r}")

    def photo_of(data: bytes):
        try:  # checked by decoding it as the embedder will use it (decoded once on the common path)
            return decode_photo(data, cfg.max_pixels, draft=live.embedder.preprocess.size)
        except BadPhoto as exc:
            raise ApiError(422, f"not a usable photo: {exc}") from None

    def item_ref(item_id: str) -> dict:
        base = f"/api/items/{quote(item_id, safe='')}"
        return {"url": base, "image": f"{base}/image", "thumbnail": f"{base}/image?size=thumb"}

    def attr_json(a) -> dict:
        from fashionlens.explain.wording import display_name, phrase

        schema = live.attributes.schema[a.attribute]
        return {**a.to_json(), "name": display_name(a.attribute), "phrase": phrase(a.attribute, a.value, schema)}

    def query_attr_json(q, photo) -> dict:
        """A query photo's attribute, its box in the photo's own pixels."""
        from fashionlens.index.attribute_indexing import scale_box

        box = scale_box(q.box, photo.at(live.explainer.size).size, photo.size) if q.box else None
        return {**attr_json(q), "box": list(box) if box else None}

    def item_json(row: dict) -> dict:
        attrs = [attr_json(a) for a in row.get("attributes") or [] if a is not None]
        return {"id": row["id"], "metadata": row["metadata"], "attributes": attrs, **item_ref(row["id"])}

    def check_key(request: Request) -> None:
        if not writable:
            raise ApiError(403, "the catalog is read-only: start 'fashionlens serve' with an API key "
                                f"(environment variable {cfg.api_key_env}) to add or delete items")
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is needed (header X-API-Key)")

    def known_id(item_id: str) -> str:
        """Any catalog id may be looked up (it is only ever a SQL parameter, never a path); ids no
        item can have are answered at once."""
        if not item_id or len(item_id) > 512 or any(ord(ch) < 32 for ch in item_id):
            raise ApiError(404, f"no item {item_id[:80]!r} in the catalog")
        return item_id

    async def call(fn, *args):
        """Run blocking work in the thread pool; map the catalog's exceptions to answers."""
        try:
            return await run_in_threadpool(fn, *args)
        except NotFound as exc:
            raise ApiError(404, str(exc)) from None
        except Conflict as exc:
            raise ApiError(409, str(exc)) from None
        except BadPhoto as exc:
            raise ApiError(422, f"not a usable photo: {exc}") from None
        except UserError as exc:
            raise ApiError(422, str(exc)) from None
        except ImageError as exc:  # an item's stored photo that no longer decodes
            raise ApiError(404, f"the item's photo cannot be read: {exc}") from None
        except OSError as exc:  # an item's photo deleted meanwhile (a DELETE racing a GET)
            raise ApiError(404, f"the item's photo cannot be read ({exc.strerror or type(exc).__name__})") from None
        except Closing as exc:
            raise ApiError(503, str(exc)) from None

    # per application (freed with it), keyed by file and modification time
    thumbnail = lru_cache(maxsize=1024)(lambda path, mtime_ns, side: make_thumbnail(path, side))
    explanation_png = lru_cache(maxsize=64)(lambda path, mtime_ns, name: overlay_png(live, path, name))

    # -- routes -------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse((static / "index.html").read_text())

    @app.get("/health", tags=["service"])
    async def health():
        count, state = await run_in_threadpool(lambda: (live.count(), live.index_state()))
        return {"status": "ok", "items": count, "attributes": live.attributes is not None,
                "writable": writable, **state}

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus():
        body, ctype = await run_in_threadpool(metrics.render)  # its item count takes the catalog's lock
        return Response(body, media_type=ctype)

    @app.get("/api/info", tags=["search"])
    async def info():
        """What the page needs: attribute values to filter on, limits, whether items can change."""
        from fashionlens.explain.wording import display_name

        attrs = live.attributes
        return {"items": await run_in_threadpool(live.count), "model": live.embedder.describe(),
                "attributes": [{"attribute": n, "name": display_name(n), "values": v}
                               for n, v in attrs.schema.items()] if attrs else [],
                "default_k": cfg.default_k, "max_k": cfg.max_k, "max_upload_mb": cfg.max_upload_mb,
                "writable": writable}

    @app.post("/api/search", tags=["search"], openapi_extra=PHOTO_BODY)
    async def search(request: Request):
        """The items most like the photo, with scores, metadata, predicted attributes and reasons."""
        fields: dict = {}
        data = await read_photo(request, fields)
        k = parse_int(field("k", fields, request), "k", cfg.default_k, cfg.max_k)
        explain_raw = field("explain", fields, request)
        explain = parse_bool(explain_raw, "explain") if explain_raw not in (None, "") else live.attributes is not None
        search_cfg = cfg.search.model_copy(update={
            "k": k, "explain": explain and live.attributes is not None,
            "want": field("want", fields, request, many=True), "filters": field("filter", fields, request, many=True)})
        plan = await call(live.plan, search_cfg)
        photo = await call(photo_of, data)
        t0 = time.perf_counter()
        hits, query = await call(live.search, photo, search_cfg, plan)
        results = [{"rank": r + 1, "score": round(h.score, 6), "id": h.id, "metadata": h.metadata,
                    "attributes": [attr_json(a) for a in h.attributes or [] if a is not None],
                    "reasons": h.reasons, **item_ref(h.id)} for r, h in enumerate(hits)]
        return JSONResponse({"results": results, "k": k, "seconds": round(time.perf_counter() - t0, 4),  # plain JSON:
                             "query": {"width": photo.size[0], "height": photo.size[1],  # no encoder pass
                                       "attributes": [query_attr_json(q, photo) for q in query or []]}})

    @app.get("/api/items/{item_id}", tags=["items"])
    async def get_item(item_id: str):
        return item_json(await call(live.item, known_id(item_id)))

    @app.get("/api/items/{item_id}/image", tags=["items"])
    async def item_image(item_id: str, size: str | None = None):
        """The item's photo; ``size=thumb`` a JPEG of at most ``thumbnail_px`` on the longest side."""
        if size not in (None, "full", "thumb"):
            raise ApiError(422, "size must be 'thumb' or 'full'")
        path = await call(live.photo_path, known_id(item_id))
        if size == "thumb":
            body = await call(lambda: thumbnail(str(path), path.stat().st_mtime_ns, cfg.thumbnail_px))
            return Response(body, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
        body = await call(path.read_bytes)  # read here: a file deleted meanwhile is a 404, not a broken answer
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return Response(body, media_type=media, headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/items/{item_id}/explanation", tags=["items"], response_class=Response)
    async def item_explanation(item_id: str, attribute: str):
        """PNG: the item's photo with the Grad-CAM heat map of its predicted value of ``attribute``
        and the box of the CAM's largest region."""
        from fashionlens.explain.wording import find_attribute

        if live.attributes is None:
            raise ApiError(404, "this index holds no attributes (run 'fashionlens index-attributes')")
        name = find_attribute(attribute, live.attributes.names)
        if name is None:
            raise ApiError(422, f"unknown attribute {attribute[:60]!r}")
        path = await call(live.photo_path, known_id(item_id))
        body = await call(lambda: explanation_png(str(path), path.stat().st_mtime_ns, name))
        return Response(body, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/items", tags=["items"], status_code=201, openapi_extra=ITEM_BODY)
    async def add_item(request: Request):
        """Add an item (API key). Durable when the answer arrives."""
        check_key(request)
        fields: dict = {}
        data = await read_photo(request, fields)
        photo = await call(photo_of, data)
        item_id = field("id", fields, request) or "u" + hashlib.sha256(data).hexdigest()[:16]
        try:
            check_id(item_id)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        metadata = {k: v[-1] for k, v in fields.items() if k not in ("id", "metadata") and v}
        raw = field("metadata", fields, request)
        if raw:
            try:
                given = json.loads(raw)
            except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
                raise ApiError(422, "metadata must be a JSON object of strings") from None
            if not isinstance(given, dict) or not all(isinstance(v, (str, int, float)) for v in given.values()):
                raise ApiError(422, "metadata must be a JSON object of strings")
            metadata.update({str(k): str(v) for k, v in given.items()})
        return item_json(await call(live.add, item_id, photo, metadata))

    @app.delete("/api/items/{item_id}", tags=["items"])
    async def delete_item(item_id: str, request: Request):
        """Remove an item (API key)."""
        check_key(request)
        await call(live.remove, known_id(item_id))
        return {"deleted": item_id}

    return app


def make_thumbnail(path: str, side: int) -> bytes:
    from fashionlens.data.images import open_image

    img = open_image(path, draft_size=side)
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def overlay_png(live: LiveCatalog, path: str, name: str) -> bytes:
    """The photo with the Grad-CAM heat map of its predicted value of attribute ``name`` and the
    box of the map's largest region."""
    import numpy as np
    from PIL import Image, ImageDraw
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from fashionlens.data.images import open_image
    from fashionlens.explain.figures import photo_cam
    from fashionlens.index.attribute_indexing import scale_box
    from fashionlens.index.query import DRAFT_SIZE

    seen = open_image(path, draft_size=live.explainer.size)  # as the model saw it when indexing
    result = live.explain_attribute(seen, name)
    shown = open_image(path, draft_size=DRAFT_SIZE)  # sharper for people; the map is scaled to it
    rgb = np.asarray(shown, dtype=np.float32) / 255.0
    overlay = Image.fromarray(show_cam_on_image(rgb, photo_cam(result, shown, live.explainer.size), use_rgb=True))
    if result.box is not None:
        x, y, w, h = scale_box(result.box, seen.size, shown.size)
        ImageDraw.Draw(overlay).rectangle([x, y, x + w - 1, y + h - 1], outline=(0, 255, 0),
                                          width=max(2, shown.width // 150))
    buf = io.BytesIO()
    overlay.save(buf, "PNG")
    return buf.getvalue()
