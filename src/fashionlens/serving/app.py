"""The FastAPI application of ``fashionlens serve``: JSON API, images, explanations, metrics, page.

The routes are in ``routes/`` (one ``APIRouter`` a module), what they depend on in ``deps``, the
request bodies in ``forms`` and the answers, errors included, in ``answers``. Every error is a
JSON body ``{"error": message, "status": code}``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from fashionlens.serving.answers import add_error_handlers
from fashionlens.serving.live import LiveCatalog
from fashionlens.serving.metrics import Guard, Metrics
from fashionlens.serving.routes import items, search, service


@asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    await run_in_threadpool(app.state.live.close)


def create_app(live: LiveCatalog, api_key: str | None = None) -> FastAPI:
    """The application serving ``live``; items can be added and deleted with ``api_key`` when
    the catalog was opened writable."""
    app = FastAPI(title="fashionlens", version="0.1.0", lifespan=lifespan,
                  description="Find clothes by photo in a catalog, and see why each result matches.")
    app.state.live, app.state.api_key = live, api_key
    app.state.writable = live.writable and api_key is not None
    app.state.metrics = Metrics(live)
    app.state.pictures = items.Pictures(live)
    app.add_middleware(Guard, metrics=app.state.metrics, max_body=int(live.cfg.max_upload_mb * 1024 * 1024))
    app.mount("/static", StaticFiles(directory=str(service.STATIC)), name="static")
    add_error_handlers(app)
    for router in (service.router, search.router, items.router):
        app.include_router(router)
    return app
