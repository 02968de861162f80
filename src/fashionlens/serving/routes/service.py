"""The page at ``/``, ``/health``, ``/metrics`` (Prometheus) and ``/api/info`` (what the page needs)."""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from fashionlens.serving.deps import Live, Writable
from fashionlens.serving.metrics import Metrics

STATIC = resources.files("fashionlens.serving") / "static"

router = APIRouter()


async def app_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


@router.get("/", include_in_schema=False)
async def page():
    return HTMLResponse((STATIC / "index.html").read_text())


@router.get("/health", tags=["service"])
async def health(live: Live, writable: Writable):
    count, state = await run_in_threadpool(lambda: (live.count(), live.index_state()))
    return {"status": "ok", "items": count, "attributes": live.attributes is not None,
            "writable": writable, **state}


@router.get("/metrics", tags=["service"], response_class=Response)
async def prometheus(metrics: Annotated[Metrics, Depends(app_metrics)]):
    body, ctype = await run_in_threadpool(metrics.render)  # its item count takes the catalog's lock
    return Response(body, media_type=ctype)


@router.get("/api/info", tags=["search"])
async def info(live: Live, writable: Writable):
    """What the page needs: attribute values to filter on, limits, whether items can change."""
    from fashionlens.explain.wording import display_name

    cfg, attrs = live.cfg, live.attributes
    return {"items": await run_in_threadpool(live.count), "model": live.embedder.describe(),
            "attributes": [{"attribute": n, "name": display_name(n), "values": v}
                           for n, v in attrs.schema.items()] if attrs else [],
            "default_k": cfg.default_k, "max_k": cfg.max_k, "max_upload_mb": cfg.max_upload_mb,
            "writable": writable}
