"""What the routes depend on (FastAPI ``Depends``): the live catalog, the server's settings, and
the API key that changing the catalog needs.

``create_app`` keeps them on ``app.state``: ``live`` (the :class:`LiveCatalog`), ``api_key``
(``None``: read-only) and ``writable`` (the catalog holds the writer lock and a key was given).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from fashionlens.serving.answers import ApiError
from fashionlens.serving.config import ServeConfig
from fashionlens.serving.live import LiveCatalog

KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="APIKey",
                          description="the key the server was started with (environment variable "
                                      "FASHIONLENS_API_KEY, or the one named by api_key_env)")
BEARER = HTTPBearer(auto_error=False, scheme_name="BearerKey",
                    description="the same key as 'Authorization: Bearer KEY'")


async def live_catalog(request: Request) -> LiveCatalog:
    return request.app.state.live


async def settings(request: Request) -> ServeConfig:
    return request.app.state.live.cfg


async def writable(request: Request) -> bool:
    """Whether items can be added and deleted."""
    return request.app.state.writable


Live = Annotated[LiveCatalog, Depends(live_catalog)]
Settings = Annotated[ServeConfig, Depends(settings)]
Writable = Annotated[bool, Depends(writable)]


async def require_key(request: Request, cfg: Settings, can_write: Writable,
                      header: Annotated[str | None, Security(KEY_HEADER)],
                      bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
    """Refuse a change to a read-only catalog (403) or one without the right key (401); the key
    comes in the header ``X-API-Key`` or as ``Authorization: Bearer KEY``."""
    if not can_write:
        raise ApiError(403, "the catalog is read-only: start 'fashionlens serve' with an API key "
                            f"(environment variable {cfg.api_key_env}) to add or delete items")
    given = header or (bearer.credentials if bearer else None)
    if not given or not hmac.compare_digest(given.encode(), request.app.state.api_key.encode()):
        raise ApiError(401, "a valid API key is needed (header X-API-Key)")
