"""The request bodies of the routes that take a photo: a search and a new item, as pydantic models
that both check the fields and describe them in the OpenAPI schema.

A photo comes in the multipart field ``image``, or as the whole body of an ``image/*`` or
``application/octet-stream`` request; the other fields come from the form or, when it lacks them,
from the query string (``POST /api/search?k=5`` with a JPEG body). The form is parsed here, with
limits of its own (one file, 64 text fields, 64 KiB each), not by FastAPI: a route's body is
described by :func:`openapi_body` from its model instead of being declared as parameters.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, get_origin

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError
from starlette.datastructures import QueryParams, UploadFile

from fashionlens.serving.answers import ApiError, call
from fashionlens.serving.deps import Live
from fashionlens.serving.live import LiveCatalog
from fashionlens.serving.uploads import Photo, check_id, decode_photo

FORM_LIMITS = {"max_files": 1, "max_fields": 64, "max_part_size": 64 * 1024}
PHOTO_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
FIELD_ERROR = "fashionlens_field"  # the type of the errors the models raise with a message of their own


def field_error(message: str) -> PydanticCustomError:
    return PydanticCustomError(FIELD_ERROR, "{message}", {"message": message})


@dataclass
class Upload:
    """A request's photo and its other fields: the form's text fields, else the query string's."""
    data: bytes
    form: dict[str, list[str]]
    query: QueryParams

    def values(self, name: str) -> list[str]:
        return self.form.get(name) or self.query.getlist(name)

    def value(self, name: str) -> str | None:
        values = self.values(name)
        return values[-1] if values else None

    def fields_of(self, model: type[BaseModel]) -> dict:
        """The model's fields as given (lists for list fields; absent: ``None``), and for a model
        that takes other fields, the form's other text fields (the last value of each)."""
        fields = {"image": self.data}
        for name, info in model.model_fields.items():
            if name != "image":
                fields[name] = self.values(name) if get_origin(info.annotation) is list else self.value(name)
        if model.model_config.get("extra") == "allow":
            fields.update({k: v[-1] for k, v in self.form.items() if k not in fields and v})
        return fields


async def read_upload(request: Request) -> Upload:
    """The photo from a multipart field ``image``, or the whole body for an image/* type."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(**FORM_LIMITS)
        try:
            fields = {key: [v for v in form.getlist(key) if isinstance(v, str)]
                      for key in form if key != "image"}
            upload = form.get("image")
            if upload is None:
                raise ApiError(422, "no photo: send it in the multipart field 'image'")
            if not isinstance(upload, UploadFile):
                raise ApiError(422, "the field 'image' must be a file, not text")
            return Upload(await upload.read(), fields, request.query_params)
        finally:
            await form.close()
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return Upload(await request.body(), {}, request.query_params)
    raise ApiError(415, f"content type {ctype or '(none)'!r}: send multipart/form-data with the photo in the "
                        "field 'image', or the photo itself as image/jpeg, image/png ...")


def validated(model: type[BaseModel], fields: dict, context: dict | None = None):
    """``fields`` as a ``model``; the first problem is a 422 with its message."""
    try:
        return model.model_validate(fields, context=context)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == FIELD_ERROR:
            raise ApiError(422, first["msg"]) from None
        raise ApiError(422, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def _no_null_defaults(schema: dict) -> None:
    """Fields whose defaults come from the server's settings show none in the schema."""
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None:
            del prop["default"]


PhotoBytes = Annotated[bytes, Field(description="the photo (JPEG, PNG, WebP ...)")]


# -- a search ---------------------------------------------------------------------------------------

class SearchForm(BaseModel):
    """A search by photo: how many results, whether to explain them, wanted attribute values and
    metadata filters."""
    # k and explain are checked against the server's settings, given as the validation context
    # (default_k, max_k, and explain: the default of explain)
    model_config = ConfigDict(json_schema_extra=_no_null_defaults)

    image: PhotoBytes
    k: int = Field(None, ge=1, validate_default=True,
                   description="how many results (default: the server's default_k, at most its max_k)")
    explain: bool = Field(None, validate_default=True,
                          description="attributes and reasons for each result (true/false, 1/0, yes/no, on/off; "
                                      "default: true when the index holds attributes)")
    want: list[str] = Field([], description="ATTR=VALUE, e.g. neckline=v-shape (repeat for more)")
    filter: list[str] = Field([], description="COLUMN=VALUE, e.g. gender=Men (repeat for more)")

    @field_validator("k", mode="before")
    @classmethod
    def _k(cls, text, info: ValidationInfo) -> int:
        if text is None or text == "":
            return info.context["default_k"]
        try:
            value = int(text)
        except ValueError:
            raise field_error(f"k must be a whole number, got {str(text)[:40]!r}") from None
        high = info.context["max_k"]
        if not 1 <= value <= high:
            raise field_error(f"k must be between 1 and {high}, got {value}")
        return value

    @field_validator("explain", mode="before")
    @classmethod
    def _explain(cls, text, info: ValidationInfo) -> bool:
        if text is None or text == "":
            return info.context["explain"]
        if str(text).lower() in ("1", "true", "yes", "on"):
            return True
        if str(text).lower() in ("0", "false", "no", "off"):
            return False
        raise field_error(f"explain must be true or false, got {str(text)[:40]!r}")


async def search_form(live: Live, upload: Annotated[Upload, Depends(read_upload)]) -> SearchForm:
    """The search a request asks for; explained by default when the index holds attributes."""
    cfg = live.cfg
    return validated(SearchForm, upload.fields_of(SearchForm),
                     {"default_k": cfg.default_k, "max_k": cfg.max_k, "explain": live.attributes is not None})


# -- a new item --------------------------------------------------------------------------------------

class ItemForm(BaseModel):
    """A new item: its photo, id and metadata. Other text fields of the form are metadata too
    (``season=Summer``); the JSON object in ``metadata`` adds to them and wins."""
    model_config = ConfigDict(extra="allow", json_schema_extra=_no_null_defaults)
    __pydantic_extra__: dict[str, str] = Field(init=False)

    image: PhotoBytes
    id: str = Field(None, validate_default=True, description="item id (default: from the photo's hash)")
    metadata: Annotated[dict[str, str], WithJsonSchema({
        "type": "string", "contentMediaType": "application/json",
        "description": "JSON object of strings; other text fields are added to it"}),
    ] = Field(None, validate_default=True)

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, text, info: ValidationInfo) -> str:
        item_id = text or "u" + hashlib.sha256(info.data["image"]).hexdigest()[:16]
        try:
            return check_id(item_id)
        except ValueError as exc:
            raise field_error(str(exc)) from None

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, text) -> dict[str, str]:
        if not text:
            return {}
        try:
            given = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
            raise field_error("metadata must be a JSON object of strings") from None
        if not isinstance(given, dict) or not all(isinstance(v, (str, int, float)) for v in given.values()):
            raise field_error("metadata must be a JSON object of strings")
        return {str(k): str(v) for k, v in given.items()}

    def all_metadata(self) -> dict[str, str]:
        """The other fields, then the JSON object's."""
        return {**(self.model_extra or {}), **self.metadata}


def decode(live: LiveCatalog, data: bytes) -> Photo:
    """The photo, decoded as the embedding model reads it (blocking: run it with ``call``)."""
    return decode_photo(data, live.cfg.max_pixels, draft=live.embedder.preprocess.size)


async def item_photo(live: Live, upload: Annotated[Upload, Depends(read_upload)]) -> Photo:
    return await call(decode, live, upload.data)


async def item_form(upload: Annotated[Upload, Depends(read_upload)],
                    photo: Annotated[Photo, Depends(item_photo)]) -> ItemForm:
    """The new item's fields, checked once its photo is: a bad photo is the first error reported."""
    return validated(ItemForm, upload.fields_of(ItemForm))


# -- OpenAPI ----------------------------------------------------------------------------------------

def openapi_body(model: type[BaseModel]) -> dict:
    """A route's request body in OpenAPI, from ``model``: the multipart form, or the photo alone as
    the body with the other fields in the query string."""
    schema = model.model_json_schema()
    photo = {"schema": {"type": "string", "format": "binary"}}
    query = [{"name": name, "in": "query", "required": False, "description": prop.get("description", ""),
              "schema": {k: v for k, v in prop.items() if k not in ("title", "description")}}
             for name, prop in schema["properties"].items() if name != "image"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema},
                                                          **{t: photo for t in PHOTO_TYPES}}},
            "parameters": query}
