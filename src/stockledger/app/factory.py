"""The Starlette application: ``/graphql``, ``/healthz``, ``/readyz`` (and room for ``/metrics``).

Build it with :func:`create_app`. Its lifespan opens the database (or takes the one given),
makes sure the schema is at the migrations' head, builds the services, runs the extra lifespan
hooks (Redis, sweeper, ... added by their owners), and closes what it opened.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import anyio.to_thread
from alembic.script import ScriptDirectory
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL

from stockledger.app.auth import AuthMiddleware
from stockledger.app.graphql import GRAPHIQL_ASSETS_DIR, GRAPHIQL_ASSETS_PATH, GraphQLView
from stockledger.app.limits import BodyLimitMiddleware
from stockledger.app.rate_limits import RateLimiter, RateLimitMiddleware, build_rate_limiter
from stockledger.config import Settings, get_settings
from stockledger.db import migrate
from stockledger.db.engine import RETRY_REASONS, Database, create_database
from stockledger.observability import metrics
from stockledger.resolvers import build_schema
from stockledger.resolvers.mutation import declare_outcome_series
from stockledger.services.api_keys import ApiKeys
from stockledger.services.queries import InventoryQueries
from stockledger.services.writes import InventoryService

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[object]]
"""An async check for ``/readyz``: ready unless it raises (its message is reported)."""

LifespanHook = Callable[[Starlette], AbstractAsyncContextManager[object]]
"""Entered after the database and services are up (``app.state`` filled), exited first."""


class Parts(Protocol):
    """What a runtime factory yields: the open database and the write service on it."""

    db: Database
    service: InventoryService


RuntimeFactory = Callable[[Settings], AbstractAsyncContextManager[Parts]]
"""Opens the database, services (and whatever else, e.g. Redis) for the app's life."""


class DatabaseNotMigratedError(RuntimeError):
    """The database's schema revision is behind the code's migrations: refuse to start."""


def create_app(
    settings: Settings | None = None,
    *,
    service: InventoryService | None = None,
    database: Database | None = None,
    runtime: RuntimeFactory | None = None,
    readiness_checks: Mapping[str, ReadinessCheck] | None = None,
    degradable_checks: Mapping[str, ReadinessCheck] | None = None,
    lifespan_hooks: Sequence[LifespanHook] = (),
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """The ASGI app (Starlette) for ``settings`` (default: :func:`get_settings`).

    Where the database and the write service come from, first match wins:

    * ``service``: this service and its ``db`` (the caller opens and closes them);
    * ``runtime``: ``runtime(settings)`` is entered for the app's life and yields an object
      with ``db`` and ``service`` (e.g. :func:`stockledger.runtime.open_runtime`); kept as
      ``app.state.runtime``;
    * ``database``: this database (the caller closes it), with an :class:`InventoryService`
      using the default no-op locker;
    * otherwise a database opened from ``settings`` and closed on shutdown, same service.

    On the embedded default (SQLite, no ``database_url``) a database the app opens itself is
    migrated to head first (Alembic, in a worker thread). In every case the database must then
    be at head, else startup fails with :class:`DatabaseNotMigratedError`.

    ``readiness_checks``: name -> async check run by
    ``/readyz`` after the database's ``SELECT 1``; a failure makes the app unready.
    ``degradable_checks``: the same for what the app can run without (Redis: ARCHITECTURE
    section 4, "a Redis outage degrades to database-only locking ... rather than failing
    requests"); a failure leaves it ready but degraded. More of either may be added to
    ``app.state.readiness_checks`` / ``app.state.degradable_checks`` before startup.
    ``lifespan_hooks``: async context managers entered in order once the services are up.
    ``extra_routes``: e.g. ``/metrics``.

    ``app.state`` holds ``settings``, ``database``, ``service``, ``queries``,
    ``readiness_checks``, ``degradable_checks`` and ``rate_limiter`` (None when
    ``settings.rate_limit`` is empty or auth is off) while running.
    """
    settings = settings or get_settings()
    limiter = build_rate_limiter(settings)
    schema = build_schema(settings)
    declare_outcome_series()
    for reason in RETRY_REASONS:
        metrics.TRANSACTION_RETRIES_TOTAL.labels(reason=reason)
    view = GraphQLView(
        schema,
        graphql_ide="graphiql" if settings.graphiql_enabled else None,
        allow_queries_via_get=True,  # queries only: Strawberry answers a GET mutation 405
        # Subscriptions: graphql-transport-ws only (the legacy graphql-ws protocol has no
        # connection_init check of ours), bounded per connection (app/subscriptions.py).
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
        max_subscriptions_per_connection=settings.max_subscriptions_per_connection,
        connection_init_wait_timeout=timedelta(seconds=10),
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if limiter is not None:
                stack.push_async_callback(limiter.aclose)
            if service is not None:
                if service.db is None:
                    raise ValueError("the app reads through a database: give a service with one")
                db, svc = service.db, service
            elif runtime is not None:
                await _migrate_embedded(settings)
                parts = await stack.enter_async_context(runtime(settings))
                db, svc = parts.db, parts.service
                app.state.runtime = parts
            else:
                if database is not None:
                    db = database
                else:
                    db = create_database(settings)  # creates the embedded file's directory
                    stack.push_async_callback(db.dispose)
                    await _migrate_embedded(settings)
                svc = InventoryService(db, settings)
            await check_revision(db)
            app.state.settings = settings
            app.state.database = db
            app.state.service = svc
            app.state.queries = InventoryQueries(db, svc.org_id)
            app.state.queries_by_org = {svc.org_id: app.state.queries}  # others made on use
            app.state.api_keys = ApiKeys(db)
            for hook in lifespan_hooks:
                await stack.enter_async_context(hook(app))
            # Everything made at start (schema, modules, caches) lives as long as the process:
            # out of the collector's sight, a full collection scans what requests made only
            # (it took 50-100 ms with them, under load; Python docs, gc.freeze).
            gc.collect()
            gc.freeze()
            log.info("stockledger ready (database %s, org %s)", db.dialect, svc.org_id)
            yield

    routes: list[BaseRoute] = [
        Route("/graphql", view, methods=["GET", "POST"]),
        WebSocketRoute("/graphql", view),  # subscriptions (app/subscriptions.py)
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *extra_routes,
    ]
    if settings.graphiql_enabled:
        assets = StaticFiles(directory=GRAPHIQL_ASSETS_DIR)
        routes.append(Mount(GRAPHIQL_ASSETS_PATH, app=assets, name="graphiql"))
    app = Starlette(
        routes=routes,
        middleware=[
            *_cors(settings),
            # The body first (read, bounded): a refusal then never leaves unread bytes behind.
            Middleware(
                BodyLimitMiddleware,
                max_body_bytes=settings.max_body_bytes,
                read_timeout_seconds=settings.body_read_timeout_seconds,
            ),
            *_auth(settings),
            *_rate_limits(limiter),  # inside auth: the key names the budget
        ],
        lifespan=lifespan,
    )
    app.state.readiness_checks = dict(readiness_checks or {})
    app.state.degradable_checks = dict(degradable_checks or {})
    app.state.rate_limiter = limiter
    return app


def _auth(settings: Settings) -> list[Middleware]:
    """The Bearer key check (:class:`AuthMiddleware`) when ``settings.auth`` is ``required``;
    none when it is off, so an open server pays no layer for it."""
    return [Middleware(AuthMiddleware)] if settings.auth == "required" else []


def _rate_limits(limiter: RateLimiter | None) -> list[Middleware]:
    """Per-key rate limits (:class:`RateLimitMiddleware`); none without a limiter (no
    ``settings.rate_limit``, or auth off: no keys)."""
    return [] if limiter is None else [Middleware(RateLimitMiddleware, limiter=limiter)]


def _cors(settings: Settings) -> list[Middleware]:
    """Starlette's CORS middleware for ``settings.cors_origins`` only; none when it is empty,
    so a browser on another origin gets no CORS headers and cannot read the answers."""
    if not settings.cors_origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=["x-request-id", "retry-after"],
            max_age=600,
        )
    ]


async def _migrate_embedded(settings: Settings) -> None:
    """Migrate the embedded SQLite file to head (no-op with a database URL set)."""
    if not settings.embedded_database:
        return
    url = settings.resolved_database_url()
    Path(url.removeprefix("sqlite+aiosqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    log.info("migrating the embedded database %s", url)
    # Alembic is blocking and runs its own event loop: keep it off this one.
    await anyio.to_thread.run_sync(migrate.upgrade, url)


async def check_revision(db: Database) -> None:
    """Raise DatabaseNotMigratedError unless the database is at the migrations' head.

    A revision the packaged scripts do not know (a newer release migrated it) is logged and
    accepted: migrations are additive, and refusing would break rolling deploys.
    """
    head = migrate.head_revision()
    current = await migrate.current_revision(db.engine)
    if current == head:
        return
    known = {rev.revision for rev in ScriptDirectory(str(migrate.MIGRATIONS_DIR)).walk_revisions()}
    if current is None or current in known:
        raise DatabaseNotMigratedError(
            f"the database is at revision {current or 'none (never migrated)'}, behind this "
            f"release's head {head}: run `stockledger migrate` first"
        )
    log.warning("database revision %s is unknown to this release (head %s)", current, head)


async def healthz(request: Request) -> JSONResponse:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


def _log_changes(state: Any, checks: dict[str, str]) -> None:
    """Log a readiness check when it starts failing (with its message, no traceback) and when
    it passes again, not per probe: probes come every few seconds. Per process, in
    ``state.readiness_seen``."""
    seen: dict[str, str] | None = getattr(state, "readiness_seen", None)
    if seen is None:
        seen = state.readiness_seen = {}
    for name, answer in checks.items():
        before = seen.get(name, "ok")
        if answer == before:
            continue
        seen[name] = answer
        if answer == "ok":
            log.info("readiness: %s check passes again", name)
        elif before == "ok":
            log.warning("readiness: %s check failed: %s", name, answer)


async def readyz(request: Request) -> JSONResponse:
    """Readiness: ``SELECT 1`` on the database, then ``app.state.readiness_checks`` and
    ``app.state.degradable_checks``.

    200 ``{"status": "ready", "checks": {name: "ok"}}``; 200 with ``"degraded"`` when only
    degradable checks failed; else 503 with ``"unavailable"``. A failed check's value is
    ``"failed"``: its message (driver errors name hosts and SQL) goes to the log only, since
    anyone may call this endpoint.
    """
    state: Any = request.app.state

    async def database_answers() -> None:
        async with state.database.read() as conn:
            await conn.execute(text("SELECT 1"))

    required = {"database": database_answers, **state.readiness_checks}
    checks: dict[str, str] = {}
    status = "ready"
    for name, check in [*required.items(), *state.degradable_checks.items()]:
        try:
            await check()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"{type(exc).__name__}: {exc}"[:300]
            if name in required:
                status = "unavailable"
            elif status == "ready":
                status = "degraded"
    _log_changes(state, checks)
    shown = {name: "ok" if answer == "ok" else "failed" for name, answer in checks.items()}
    return JSONResponse(
        {"status": status, "checks": shown},
        status_code=503 if status == "unavailable" else 200,
    )
