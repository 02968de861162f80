"""``/api/items``: an item, its photo or thumbnail, the heat-map overlay of one of its attributes;
adding and deleting items (with the API key)."""

from __future__ import annotations

import io
import mimetypes
from functools import lru_cache
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import Response

from fashionlens.serving.answers import ApiError, call, errors, item_json
from fashionlens.serving.deps import Live, Settings, require_key
from fashionlens.serving.forms import ItemForm, item_form, item_photo, openapi_body
from fashionlens.serving.live import LiveCatalog
from fashionlens.serving.uploads import Photo

router = APIRouter(prefix="/api/items", tags=["items"], responses=errors(422))
KEY = Security(require_key)  # the routes that change the catalog
CACHED = {"Cache-Control": "max-age=3600"}


class Pictures:
    """The thumbnails and explanation overlays of one application (freed with it), cached by
    file and version (modification time, or an object's ETag)."""

    def __init__(self, live: LiveCatalog):
        self.live = live
        self.thumbnail = lru_cache(maxsize=1024)(self._thumbnail)
        self.explanation = lru_cache(maxsize=64)(self._explanation)

    @staticmethod
    def _thumbnail(path: str, version: str, side: int) -> bytes:
        return make_thumbnail(path, side)

    def _explanation(self, path: str, version: str, name: str) -> bytes:
        return overlay_png(self.live, path, name)


async def pictures(request: Request) -> Pictures:
    return request.app.state.pictures


Cache = Annotated[Pictures, Depends(pictures)]


def known_id(item_id: str) -> str:
    """Any catalog id may be looked up (it is only ever a SQL parameter, never a path); ids no
    item can have are answered at once."""
    if not item_id or len(item_id) > 512 or any(ord(ch) < 32 for ch in item_id):
        raise ApiError(404, f"no item {item_id[:80]!r} in the catalog")
    return item_id


@router.get("/{item_id}", responses=errors(404))
async def get_item(item_id: str, live: Live):
    return item_json(live, await call(live.item, known_id(item_id)))


@router.get("/{item_id}/image", responses=errors(404))
async def item_image(item_id: str, live: Live, cfg: Settings, cache: Cache, size: str | None = None):
    """The item's photo; ``size=thumb`` a JPEG of at most ``thumbnail_px`` on the longest side."""
    if size not in (None, "full", "thumb"):
        raise ApiError(422, "size must be 'thumb' or 'full'")
    path = await call(live.photo_path, known_id(item_id))
    if size == "thumb":
        body = await call(lambda: cache.thumbnail(str(path), path.version(), cfg.thumbnail_px))
        return Response(body, media_type="image/jpeg", headers=CACHED)
    body = await call(path.read_bytes)  # read here: a file deleted meanwhile is a 404, not a broken answer
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return Response(body, media_type=media, headers=CACHED)


@router.get("/{item_id}/explanation", response_class=Response, responses=errors(404, 503))
async def item_explanation(item_id: str, attribute: str, live: Live, cache: Cache):
    """PNG: the item's photo with the Grad-CAM heat map of its predicted value of ``attribute``
    and the box of the CAM's largest region."""
    from fashionlens.explain.wording import find_attribute

    if live.attributes is None:
        raise ApiError(404, "this index holds no attributes (run 'fashionlens index-attributes')")
    name = find_attribute(attribute, live.attributes.names)
    if name is None:
        raise ApiError(422, f"unknown attribute {attribute[:60]!r}")
    path = await call(live.photo_path, known_id(item_id))
    body = await call(lambda: cache.explanation(str(path), path.version(), name))
    return Response(body, media_type="image/png", headers=CACHED)


@router.post("", status_code=201, dependencies=[KEY], responses=errors(401, 403, 409, 413, 415, 503),
             openapi_extra=openapi_body(ItemForm))
async def add_item(live: Live, photo: Annotated[Photo, Depends(item_photo)],
                   form: Annotated[ItemForm, Depends(item_form)]):
    """Add an item (API key). Durable when the answer arrives."""
    return item_json(live, await call(live.add, form.id, photo, form.all_metadata()))


@router.delete("/{item_id}", dependencies=[KEY], responses=errors(401, 403, 404))
async def delete_item(item_id: str, live: Live):
    """Remove an item (API key)."""
    await call(live.remove, known_id(item_id))
    return {"deleted": item_id}


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
