"""The app as ``stockledger serve`` runs it: the runtime (Redis locks, expiry index, sweeper),
Redis readiness, ``/metrics`` and request ids. :func:`create_app` alone stays usable without.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
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
from stockledger.app.server import shutdown_watchdog
from stockledger.app.subscriptions import live_events
from stockledger.config import Settings
from stockledger.observability.logs import get_logger, request_id
from stockledger.runtime import open_runtime, run_events, stop_events

REQUEST_ID_HEADER = b"x-request-id"
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
ACCESS_LOGGER = "stockledger.access"
access_log = get_logger(ACCESS_LOGGER)


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


class RequestLogMiddleware:
    """Binds ``X-Request-ID`` (the client's, or a new UUID) to the logs, echoes it back, and
    writes one access line per HTTP request once its response is sent: ``method``, ``path``,
    ``status``, ``duration_ms`` and, for GraphQL, the operation's ``operation_name``,
    ``operation_type``, root ``field`` and ``outcome``. Probes and ``/metrics`` log at DEBUG,
    the rest at INFO."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER, b"")
        rid = given.decode("latin-1")[:128] if given else uuid.uuid4().hex
        token = request_id.set(rid)
        start = time.perf_counter()
        status = 500  # if the app fails before it answers

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers") or [])
                headers.append((REQUEST_ID_HEADER, rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._log(scope, status, time.perf_counter() - start)
            request_id.reset(token)

    @staticmethod
    def _log(scope: Scope, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        quiet = path in QUIET_PATHS
        if not logging.getLogger(ACCESS_LOGGER).isEnabledFor(
            logging.DEBUG if quiet else logging.INFO
        ):
            return  # nothing built for a line nobody reads
        fields: dict[str, Any] = {
            "method": scope.get("method"),
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
        }
        state = scope.get("state") or {}
        key = state.get("api_key")  # AuthMiddleware's: the caller, never the secret
        if key is not None:
            fields.update(api_key_id=key.id, api_key_name=key.name, org=key.org)
        operation = state.get("graphql")
        if operation is not None:
            fields.update(
                operation_name=operation.name,
                operation_type=operation.type,
                field=operation.field,
                outcome=operation.outcome,
            )
        (access_log.debug if quiet else access_log.info)("request", **fields)


@contextlib.asynccontextmanager
async def _bounded_shutdown(app: Starlette) -> AsyncIterator[None]:
    with shutdown_watchdog(app.state.settings.shutdown_timeout_seconds):
        yield


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
        grace = app.state.settings.shutdown_timeout_seconds / 4
        _, late = await asyncio.wait([task], timeout=grace)
        for stuck in late:  # a pass stuck on an unanswered call: cancel as a last resort
            stuck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stuck


@contextlib.asynccontextmanager
async def _events(app: Starlette) -> AsyncIterator[None]:
    """The outbox relay and the webhook delivery worker (ARCHITECTURE section 15) in this
    process, and ``app.state.webhooks`` (the endpoints, with the worker's breakers)."""
    runtime: Any = app.state.runtime
    app.state.webhooks = runtime.webhooks
    task = asyncio.create_task(run_events(runtime), name="stockledger-events")
    try:
        yield
    finally:
        stop_events(runtime)
        grace = app.state.settings.shutdown_timeout_seconds / 4
        _, late = await asyncio.wait([task], timeout=grace)
        for stuck in late:
            stuck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stuck


def create_served_app(settings: Settings) -> Starlette:
    """The full app: :func:`create_app` over :func:`open_runtime`, the shutdown's watchdog
    (:func:`~stockledger.app.server.shutdown_watchdog`), the sweeper running inside (every
    ``sweep_interval_seconds``), ``/readyz`` also pinging Redis (degraded, not unready,
    when it does not answer), ``/metrics``, and ``X-Request-ID`` with an access line per
    request (:class:`RequestLogMiddleware`)."""
    app = create_app(
        settings,
        runtime=open_runtime,
        lifespan_hooks=[_bounded_shutdown, _sweeper_and_redis_check, live_events, _events],
        extra_routes=[Route("/metrics", metrics_endpoint, methods=["GET"])],
    )
    app.add_middleware(RequestLogMiddleware)
    return app
