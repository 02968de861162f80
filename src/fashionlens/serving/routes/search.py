"""``POST /api/search``: the items most like a photo."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from fashionlens.serving.answers import attr_json, call, errors, item_ref, query_attr_json
from fashionlens.serving.deps import Live
from fashionlens.serving.forms import SearchForm, decode, openapi_body, search_form

router = APIRouter(tags=["search"], responses=errors(413, 415, 422, 503))


@router.post("/api/search", openapi_extra=openapi_body(SearchForm))
async def search(live: Live, form: Annotated[SearchForm, Depends(search_form)]):
    """The items most like the photo, with scores, metadata, predicted attributes and reasons."""
    search_cfg = live.cfg.search.model_copy(update={
        "k": form.k, "explain": form.explain and live.attributes is not None, "want": form.want,
        "filters": form.filter})
    plan = await call(live.plan, search_cfg)
    photo = await call(decode, live, form.image)
    t0 = time.perf_counter()
    hits, query, box = await call(live.search_cut, photo, search_cfg, plan)
    results = [{"rank": r + 1, "score": round(h.score, 6), "id": h.id, "metadata": h.metadata,
                "attributes": [attr_json(live, a) for a in h.attributes or [] if a is not None],
                "reasons": h.reasons, "crop": h.crop, **item_ref(h.id)} for r, h in enumerate(hits)]
    return JSONResponse({"results": results, "k": form.k, "seconds": round(time.perf_counter() - t0, 4),  # plain
                         "query": {"width": photo.size[0], "height": photo.size[1], "crop": box,  # JSON: no encoder pass
                                   "attributes": [query_attr_json(live, q, photo) for q in query or []]}})
