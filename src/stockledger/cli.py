"""The ``stockledger`` command (click): ``migrate``, ``serve``, ``sweep``, ``relay``, ``apikey``
and ``replay``."""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from stockledger.config import Settings, get_settings
from stockledger.domain.access import Role, Scope


def app_factory() -> Any:
    """The ASGI app for uvicorn's ``factory=True`` (each worker builds its own from settings)."""
    from stockledger.app.serving import create_served_app
    from stockledger.observability.logs import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_served_app(settings)


def _describe_backends(settings: Settings) -> str:
    db = (
        f"SQLite file {settings.resolved_database_url().removeprefix('sqlite+aiosqlite:///')}"
        if settings.embedded_database
        else f"MySQL at {_redact(settings.resolved_database_url())}"
    )
    redis = (
        "in-process fakeredis"
        if settings.redis_url is None
        else f"Redis at {_redact(settings.redis_url)}"
    )
    return f"database: {db}; locks and expiry index: {redis}"


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a redis:// URL SQLAlchemy cannot parse: show scheme and host only
        return url.split("@")[-1]


@click.group()
@click.version_option(package_name="stockledger")
def main() -> None:
    """stockledger: a GraphQL inventory service with an append-only ledger."""


@main.command()
@click.option("--revision", default="head", show_default=True, help="Alembic revision to reach.")
@click.option(
    "--triggers",
    is_flag=True,
    help="Also create the ledger's append-only triggers that the server refused before "
    "(run it as a user allowed to create triggers); fails if they are still refused.",
)
def migrate(revision: str, triggers: bool) -> None:
    """Upgrade the database in STOCKLEDGER_DATABASE_URL (or the embedded SQLite file).

    Safe to run from many replicas at once: each waits for the one before it. Where the server
    refuses the ledger's triggers (binary logging on and no SUPER: error 1419), it completes
    without them and says once what to set or grant.
    """
    from stockledger.db.migrate import add_ledger_triggers, upgrade

    settings = get_settings()
    url = settings.resolved_database_url()
    if settings.embedded_database:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    outcome = upgrade(url, revision)
    click.echo(f"migrated {_redact(url)} to {revision}")
    _bootstrap_key(settings)
    if triggers and outcome.missing:
        outcome = add_ledger_triggers(url)
        if outcome.missing:
            raise click.ClickException(f"ledger triggers still refused: {outcome.refused}")
        click.echo(f"created the ledger triggers: {', '.join(outcome.created)}")
    elif outcome.advice:
        click.echo(f"warning: {outcome.advice}", err=True)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="uvicorn worker processes.")
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Also serve /metrics on this port, apart from the API (all workers' samples).",
)
def serve(host: str, port: int, workers: int, metrics_port: int | None) -> None:
    """Serve the GraphQL API (``/graphql``) with uvicorn, uvloop and httptools.

    With no settings: the embedded default (a SQLite file it migrates itself, in-process
    fakeredis), one worker only. With a MySQL URL, run ``stockledger migrate`` first.
    """
    from stockledger.app import server
    from stockledger.observability.logs import configure_logging, get_logger

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    if workers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--workers")
    if settings.auth == "off":
        # Every request then acts as ADMIN (ARCHITECTURE section 13): this machine only.
        if not _is_loopback(host):
            raise click.UsageError(
                f"STOCKLEDGER_AUTH=off lets anyone who reaches the port act as ADMIN: it is "
                f"refused on {host}; bind a loopback address (--host 127.0.0.1 or ::1) or "
                "leave STOCKLEDGER_AUTH at required"
            )
        get_logger("stockledger.cli").warning(
            "STOCKLEDGER_AUTH=off: every request acts as ADMIN of org %s, with no key",
            settings.org_id,
        )
    if workers > 1 and (settings.embedded_database or settings.redis_url is None):
        raise click.UsageError(
            "the embedded default (SQLite and in-process fakeredis) runs one worker only; "
            "set STOCKLEDGER_DATABASE_URL and STOCKLEDGER_REDIS_URL for --workers > 1"
        )
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # prometheus-client's multiprocess mode: every worker writes its samples here and
        # /metrics adds them up. Set before the workers start so they inherit it.
        metrics_dir = tempfile.mkdtemp(prefix="stockledger-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
    if settings.embedded_database:  # migrated here first, so that the key table exists
        from stockledger.db.migrate import upgrade

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.resolved_database_url())
    _bootstrap_key(settings)
    click.echo(f"stockledger {_describe_backends(settings)}")
    click.echo(f"stockledger listening on http://{host}:{port}/graphql")
    if metrics_port is not None:
        from prometheus_client import start_http_server

        from stockledger.app.serving import metrics_registry

        start_http_server(metrics_port, addr=host, registry=metrics_registry())
        click.echo(f"stockledger metrics on http://{host}:{metrics_port}/metrics")
    sys.stdout.flush()
    server.run(settings, host=host, port=port, workers=workers)


@main.command()
@click.option("--once", is_flag=True, help="One pass (Redis index and database scan), then exit.")
def sweep(once: bool) -> None:
    """Expire due reservations: pop the Redis expiry index, scan the database as fallback.

    Safe to run beside servers and other sweepers: each reservation is expired exactly once.
    """
    import asyncio

    from stockledger.observability.logs import configure_logging
    from stockledger.runtime import open_runtime

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)

    async def run() -> None:
        async with open_runtime(settings) as rt:
            if once:
                count = await rt.sweeper.run_once(scan=True)
                click.echo(f"expired {count} reservation(s)")
            else:
                await rt.sweeper.run_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--once", is_flag=True, help="One relay pass and one delivery pass, then exit.")
def relay(once: bool) -> None:
    """Relay committed events (ARCHITECTURE section 15): to Redis pub/sub and into webhook
    deliveries, and deliver those, as ``serve`` does inside.

    Safe beside servers and other relays: one relay per org at a time (a lease), and
    deliveries are shared out. SIGTERM or Ctrl-C stops it after the current pass. Give it
    STOCKLEDGER_REDIS_URL: on the embedded default its pub/sub is in-process fakeredis, which
    no server's subscriptions hear (webhooks still go out).
    """
    import asyncio
    import signal

    from stockledger.observability.logs import configure_logging
    from stockledger.runtime import open_runtime, run_events, stop_events

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)

    async def run() -> None:
        async with open_runtime(settings) as rt:
            if once:
                report = await rt.relay.run_once()
                delivered = await rt.deliveries.run_once()
                await rt.relay.release()
                click.echo(f"published {report.published} event(s), attempted {delivered}")
                return
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop_events, rt)
            await run_events(rt)

    asyncio.run(run())


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name: it may resolve to anything


def _bootstrap_key(settings: Settings) -> None:
    """On an empty key table: one ADMIN key for ``settings.org_id``, its secret written to
    ``<data dir>/admin.key`` (mode 0600; ``admin-2.key`` ... when that file exists); says
    where, never the secret. Skipped when the database has no key table yet (``serve`` then
    asks for ``migrate``)."""
    import asyncio

    from sqlalchemy import inspect

    from stockledger.db.engine import create_database
    from stockledger.db.migrate import acquire_migration_lock
    from stockledger.services.api_keys import ApiKeys

    path = settings.data_dir / "admin.key"

    async def run() -> Path | None:
        db = create_database(settings)
        try:
            async with db.read() as conn:
                if not await conn.run_sync(lambda c: inspect(c).has_table("api_key")):
                    return None
            # Under the migration lock: replicas starting together make one key, not several.
            async with db.engine.connect() as lock:
                release = await lock.run_sync(acquire_migration_lock)
                try:
                    return await ApiKeys(db).bootstrap_admin(settings.org_id, path)
                finally:
                    await lock.run_sync(release)
        finally:
            await db.dispose()

    written = asyncio.run(run())
    if written is not None:
        click.echo(f"created the first API key (ADMIN of org {settings.org_id}): {written}")


def _key_store_run(work: Any) -> Any:
    """Run ``work(store)`` (an async function of :class:`ApiKeys`) on the configured
    database, migrated first on the embedded default; the database is closed afterwards."""
    import asyncio

    from stockledger.db.engine import create_database
    from stockledger.db.migrate import upgrade
    from stockledger.services.api_keys import ApiKeys

    settings = get_settings()
    if settings.embedded_database:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.resolved_database_url())

    async def run() -> Any:
        db = create_database(settings)
        try:
            return await work(ApiKeys(db))
        finally:
            await db.dispose()

    return asyncio.run(run())


@main.group()
def apikey() -> None:
    """Create, list and revoke API keys (ARCHITECTURE section 13)."""


@apikey.command("create")
@click.option("--org", required=True, help="The org the key acts for.")
@click.option("--name", required=True, help="What the key is for (shown in lists).")
@click.option("--role", type=click.Choice([r.value for r in Role]), help="A preset of scopes.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice([s.value for s in Scope]),
    help="A scope; repeat for several. Exactly one of --role and --scope.",
)
@click.option(
    "--expires",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    default=None,
    help="When the key stops working (UTC).",
)
def apikey_create(
    org: str, name: str, role: str | None, scopes: tuple[str, ...], expires: datetime | None
) -> None:
    """Create a key and print its secret, once (stdout; the key's details go to stderr)."""
    from stockledger.domain.access import ROLE_SCOPES

    if (role is None) == (not scopes):
        raise click.UsageError("give exactly one of --role and --scope")
    granted = ROLE_SCOPES[Role(role)] if role else frozenset(Scope(s) for s in scopes)
    expires_at = expires.replace(tzinfo=UTC) if expires else None
    key, secret = _key_store_run(
        lambda store: store.create(org, name, granted, expires_at=expires_at)
    )
    click.echo(
        f"created API key {key.id} ({key.prefix}...) for org {key.org}: "
        f"{' '.join(sorted(s.value for s in key.scopes))}; the secret is shown only now",
        err=True,
    )
    click.echo(secret)


@apikey.command("list")
@click.option("--org", default=None, help="Only this org's keys.")
def apikey_list(org: str | None) -> None:
    """List keys (never their secrets): id, org, name, prefix, scopes and times."""
    keys = _key_store_run(lambda store: store.list(org))
    for key in keys:
        fields = [
            str(key.id),
            key.org,
            key.name,
            f"{key.prefix}...",
            " ".join(sorted(s.value for s in key.scopes)),
            "revoked" if key.revoked_at else "active",
            f"created {key.created_at:%Y-%m-%d %H:%M}",
        ]
        if key.expires_at:
            fields.append(f"expires {key.expires_at:%Y-%m-%d %H:%M}")
        if key.last_used_at:
            fields.append(f"last used {key.last_used_at:%Y-%m-%d %H:%M}")
        click.echo("\t".join(fields))


@apikey.command("revoke")
@click.argument("key_id", type=int)
def apikey_revoke(key_id: int) -> None:
    """Revoke a key by id: it stops working within 5 s on every instance."""
    from stockledger.domain.errors import NotFoundError

    try:
        key = _key_store_run(lambda store: store.revoke(key_id))
    except NotFoundError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"revoked API key {key.id} ({key.prefix}...) of org {key.org}")


@main.command()
@click.option(
    "--url",
    "urls",
    multiple=True,
    default=["http://127.0.0.1:8000/graphql"],
    show_default=True,
    help="A server's GraphQL URL; repeat it for several instances (each call goes to one at "
    "random, and is sent again on another after a transport error or UNAVAILABLE).",
)
@click.option("--orders", type=int, default=None, help="Replay only the first N orders (by date).")
@click.option("--clients", type=int, default=8, show_default=True, help="Concurrent connections.")
@click.option(
    "--fraction", type=float, default=0.8, show_default=True, help="Opening stock / demand."
)
@click.option("--restock-days", type=int, default=30, show_default=True)
@click.option("--abandon-share", type=float, default=0.2, show_default=True)
@click.option("--abandon-ttl", type=int, default=2, show_default=True, help="Seconds.")
@click.option("--expire-wait", type=float, default=15.0, show_default=True, help="Seconds.")
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The orders (gzip CSV); default: the Superstore data shipped in the package.",
)
@click.option(
    "--batch",
    type=click.IntRange(1, 500),
    default=None,
    help="Send each day's carts in reserveMany calls of up to N (shipments: deductMany).",
)
@click.option(
    "--transfer-share",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="At each restock interval, move this share of on hand of each restocked SKU from its "
    "fullest region to its emptiest (one transfer per SKU); default: no transfers.",
)
@click.option(
    "--transfer-in-transit",
    is_flag=True,
    default=False,
    help="Send the transfers in transit, received at the next interval (default: at once).",
)
@click.option(
    "--events",
    is_flag=True,
    default=False,
    help="Attach a loopback webhook receiver and a subscriber, set reorder points, and check "
    "every STOCK_CHANGED and low-stock transition against the ledger (needs an ADMIN key and "
    "a server with STOCKLEDGER_WEBHOOK_ALLOW_PRIVATE=true).",
)
@click.option(
    "--events-wait",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to wait at the end for the deliveries to settle.",
)
@click.option(
    "--api-key",
    envvar="STOCKLEDGER_API_KEY",
    default=None,
    help="The key to send (an OPERATOR or ADMIN key); default: STOCKLEDGER_API_KEY, else the "
    "bootstrap key in <data dir>/admin.key if there is one.",
)
def replay(
    urls: tuple[str, ...],
    orders: int | None,
    clients: int,
    fraction: float,
    restock_days: int,
    abandon_share: float,
    abandon_ttl: int,
    expire_wait: float,
    data: str | None,
    batch: int | None,
    transfer_share: float | None,
    transfer_in_transit: bool,
    events: bool,
    events_wait: float,
    api_key: str | None,
) -> None:
    """Replay the Superstore orders through a running server and check the result."""
    import asyncio

    from stockledger.replay import DEFAULT_DATA, run_replay

    if transfer_in_transit and transfer_share is None:
        raise click.UsageError("--transfer-in-transit needs --transfer-share")
    if api_key is None:
        bootstrap = get_settings().data_dir / "admin.key"
        api_key = bootstrap.read_text().strip() if bootstrap.exists() else None
    report, problems = asyncio.run(
        run_replay(
            list(urls),
            orders=orders,
            data=Path(data) if data else DEFAULT_DATA,
            clients=clients,
            fraction=fraction,
            restock_days=restock_days,
            abandon_share=abandon_share,
            abandon_ttl=abandon_ttl,
            expire_wait=expire_wait,
            batch=batch,
            api_key=api_key,
            transfer_share=transfer_share,
            transfer_in_transit=transfer_in_transit,
            events=events,
            events_wait=events_wait,
        )
    )
    click.echo(report)
    if problems:
        click.echo(f"CHECKS FAILED ({len(problems)}):", err=True)
        for p in problems[:50]:
            click.echo(f"  {p}", err=True)
        sys.exit(1)
    click.echo("checks: all passed")


if __name__ == "__main__":
    main()
