"""The app as ``stockledger serve`` runs it: the runtime (Redis locks, expiry index, sweeper),
Redis readiness, ``/metrics`` and request ids. :func:`create_app` alone stays usable without.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stockledger.app.factory import create_app
from stockledger.config import Settings
from stockledger.observability.logs import request_id
from stockledger.runtime import open_runtime

REQUEST_ID_HEADER = b"x-request-id"


def metrics_registry() -> CollectorRegistry:
    """The registry to expose: every worker's samples in prometheus-client's multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR`` set), else this process's default registry."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``: the Prometheus text exposition format."""
    return Response(generate_latest(metrics_registry()), media_type=CONTENT_TYPE_LATEST)


class RequestIdMiddleware:
    """Binds ``X-Request-ID`` (the client's, or a new UUID) to the logs and echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER, b"")
        rid = given.decode("latin-1")[:128] if given else uuid.uuid4().hex
        token = request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                headers.append((REQUEST_ID_HEADER, rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


@contextlib.asynccontextmanager
async def _sweeper_and_redis_check(app: Starlette) -> AsyncIterator[None]:
    runtime: Any = app.state.runtime
    # Without Redis the service runs on database locks alone: degraded, still ready.
    app.state.degradable_checks["redis"] = runtime.redis.ping
    task = asyncio.create_task(runtime.sweeper.run_forever(), name="stockledger-sweeper")
    try:
        yield
    finally:
        runtime.sweeper.stop()
        _, late = await asyncio.wait([task], timeout=10)
        for stuck in late:  # a pass stuck on an unanswered call: cancel as a last resort
            stuck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stuck


def create_served_app(settings: Settings) -> Starlette:
    """The full app: :func:`create_app` over :func:`open_runtime`, the sweeper running inside
    (every ``sweep_interval_seconds``), ``/readyz`` also pinging Redis (degraded, not unready,
    when it does not answer), ``/metrics``, and
    ``X-Request-ID`` handling."""
    app = create_app(
        settings,
        runtime=open_runtime,
        lifespan_hooks=[_sweeper_and_redis_check],
        extra_routes=[Route("/metrics", metrics_endpoint, methods=["GET"])],
    )
    app.add_middleware(RequestIdMiddleware)
    return app
