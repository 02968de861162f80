"""Prometheus metrics (prometheus_client) and the request guard that feeds them and limits bodies."""

from __future__ import annotations

import json
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """One registry per application (tests run several servers in one process)."""

    def __init__(self, live):
        self.registry = CollectorRegistry()
        self.requests = Counter("fashionlens_requests", "HTTP requests answered", ["method", "route", "status"],
                                registry=self.registry)
        self.seconds = Histogram("fashionlens_request_seconds", "time to answer, by route", ["method", "route"],
                                 buckets=(.005, .01, .025, .05, .1, .2, .3, .5, 1, 2.5, 5, 10), registry=self.registry)
        self.batch = Histogram("fashionlens_embed_batch_size", "photos per embedding batch",
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=self.registry)
        items = Gauge("fashionlens_catalog_items", "searchable items", registry=self.registry)
        items.set_function(live.count)
        rebuilding = Gauge("fashionlens_index_rebuilding", "1 while the index is rebuilt beside the one in use",
                           registry=self.registry)
        rebuilding.set_function(lambda: float(live.rebuilding))
        live.batch.on_batch = self.batch.observe

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# Bodies over the limit but under this are read and dropped before the 413, so that a client
# still sending sees the answer instead of a reset connection; larger ones are cut off.
DRAIN_MAX = 256 * 2**20
MAX_QUERY = 16 * 1024  # bytes of query string (httptools sets no limit of its own)


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: refuses bodies over ``max_body`` bytes (by Content-Length at once, and
    while streaming for chunked uploads) and records each request's route, status and time."""

    def __init__(self, app, metrics: Metrics, max_body: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        # a client waiting for "100 Continue" has sent nothing yet: answer without reading
        expects = headers.get(b"expect", b"").lower() == b"100-continue"
        if len(scope.get("query_string", b"")) > MAX_QUERY:
            await self._answer(sending, 414, f"query string over {MAX_QUERY:,} bytes")
        elif length is not None and (not length.isdigit() or int(length) > self.max_body):
            if length.isdigit() and int(length) <= DRAIN_MAX and not expects:
                await self._drain(receive)  # so that the client, still sending, reads the answer
            await self._too_large(sending, bad=not length.isdigit())
        else:
            received, more = 0, True

            async def limited():
                nonlocal received, more
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    more = bool(message.get("more_body"))
                    if received > self.max_body:
                        raise BodyTooLarge()
                return message

            try:
                await self.app(scope, limited, sending)
            except BodyTooLarge:
                if more and received <= DRAIN_MAX:  # the rest, if any is still to come
                    await self._drain(receive)
                await self._too_large(sending)
        route = scope.get("route")
        name = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(scope["method"], name, str(status["code"])).inc()
        self.metrics.seconds.labels(scope["method"], name).observe(time.perf_counter() - started)

    @staticmethod
    async def _drain(receive) -> None:
        """Read and drop the rest of the body (bounded by the caller)."""
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    async def _too_large(self, send, bad: bool = False) -> None:
        if bad:
            await self._answer(send, 400, "bad Content-Length header")
        else:
            await self._answer(send, 413, f"request body over the limit of {self.max_body / 2**20:g} MB")

    @staticmethod
    async def _answer(send, code: int, message: str) -> None:
        body = json.dumps({"error": message, "status": code}).encode()
        await send({"type": "http.response.start", "status": code,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
