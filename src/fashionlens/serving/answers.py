"""What the API answers: errors as JSON, the catalog's exceptions mapped to them, and the JSON of
items and attributes.

Every error is a JSON body ``{"error": message, "status": code}`` with a 4xx code: bad photos
(422), bodies over the limit (413), wrong content types (415), unknown ids (404), a taken id
(409), a missing or wrong API key (401), a read-only catalog (403). A bug is a 500 with one line;
its traceback goes to the log.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fashionlens.data.images import ImageError
from fashionlens.errors import UserError
from fashionlens.serving.batcher import Closing
from fashionlens.serving.live import Conflict, LiveCatalog, NotFound
from fashionlens.serving.uploads import BadPhoto

log = logging.getLogger("fashionlens.serve")


class ApiError(Exception):
    """A request the server refuses: answered with ``status`` and ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ErrorAnswer(BaseModel):
    """An error: what is wrong, and the HTTP status again."""
    error: str
    status: int


WHY = {401: "a missing or wrong API key", 403: "the catalog is read-only (no API key at start-up)",
       404: "no such item", 409: "the id is taken", 413: "the body is over max_upload_mb",
       415: "neither multipart/form-data nor a photo", 422: "a bad photo or field", 503: "the server is stopping"}


def errors(*codes: int) -> dict:
    """The OpenAPI responses of these error codes (for a route's or router's ``responses``)."""
    return {code: {"model": ErrorAnswer, "description": WHY[code]} for code in codes}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error(exc.status, exc.message)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such page: {request.url.path[:200]}"
    return error(exc.status_code, message)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error(422, f"{where}: {first.get('msg', 'invalid')}")


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback, reported as one line."""
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error(500, f"internal error ({type(exc).__name__}); the server's log has the details")


def add_error_handlers(app: FastAPI) -> None:
    """Every error of ``app`` as a JSON body ``{"error": message, "status": code}``."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _bug)


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


# -- JSON of items and attributes -------------------------------------------------------------------

def item_ref(item_id: str) -> dict:
    """The URLs of an item, its photo and its thumbnail."""
    base = f"/api/items/{quote(item_id, safe='')}"
    return {"url": base, "image": f"{base}/image", "thumbnail": f"{base}/image?size=thumb"}


def attr_json(live: LiveCatalog, a) -> dict:
    """A predicted attribute with its display name and a phrase for people."""
    from fashionlens.explain.wording import display_name, phrase

    schema = live.attributes.schema[a.attribute]
    return {**a.to_json(), "name": display_name(a.attribute), "phrase": phrase(a.attribute, a.value, schema)}


def query_attr_json(live: LiveCatalog, q, photo) -> dict:
    """A query photo's attribute, its box in the photo's own pixels."""
    from fashionlens.index.attribute_indexing import scale_box

    box = scale_box(q.box, photo.at(live.explainer.size).size, photo.size) if q.box else None
    return {**attr_json(live, q), "box": list(box) if box else None}


def item_json(live: LiveCatalog, row: dict) -> dict:
    """A stored item: id, metadata, predicted attributes, the box its photo was cut to, and URLs."""
    attrs = [attr_json(live, a) for a in row.get("attributes") or [] if a is not None]
    return {"id": row["id"], "metadata": row["metadata"], "attributes": attrs, "crop": row.get("crop"),
            **item_ref(row["id"])}
