"""Alembic environment: runs the migrations over an async engine (SQLAlchemy's asyncio recipe).

The URL comes from the Alembic config's ``sqlalchemy.url`` (set by ``stockledger migrate``) or,
failing that, the settings in force.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from stockledger.config import get_settings
from stockledger.db.migrate import migration_lock, record_triggers
from stockledger.db.models import metadata

config = context.config
target_metadata = metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url()


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    is_sqlite = (url or str(connection.engine.url)).startswith("sqlite")  # type: ignore[union-attr]
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=is_sqlite,  # SQLite cannot ALTER most things in place
        compare_type=True,
        literal_binds=connection is None,
    )


def run_migrations_offline() -> None:
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    # One migrate at a time per database: replicas that start together queue here, and each
    # later one finds the schema at head.
    with migration_lock(connection):
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        record_triggers(connection, config)


async def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # a caller lent us a sync connection (tests)
        _run_sync(connection)
        return
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    async with engine.connect() as conn:
        await conn.run_sync(_run_sync)
        await conn.commit()
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
