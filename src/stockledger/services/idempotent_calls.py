"""Idempotency for the writes that do not go through the unit of work (API keys, webhook
endpoints): each is one short transaction of its own that writes its key row
(ARCHITECTURE section 5), and runs again when a new transaction can cure its failure."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from sqlalchemy import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from stockledger.db.engine import is_connection_lost, retry_reason
from stockledger.db.models import idempotency_key
from stockledger.services.errors import ServiceUnavailableError
from stockledger.services.rows import to_db_time

T = TypeVar("T")

ATTEMPTS = 3
"""Transactions a call runs at most (a concurrent call with the same key, a deadlock, a lost
connection: each cured by running again, which then replays a copy that committed)."""


async def remember_call(
    conn: AsyncConnection,
    org: str,
    key: str,
    operation: str,
    rhash: str,
    result_id: int,
    now: datetime,
) -> None:
    """The idempotency row of a call, in its transaction; ``result_id`` (the row it acted on)
    goes in ``result_ref``. A concurrent call with the same key then fails on the primary key
    and, run again, replays this one."""
    await conn.execute(
        insert(idempotency_key).values(
            org_id=org,
            idempotency_key=key,
            operation=operation,
            request_hash=rhash,
            result_ref=str(result_id),
            created_at=to_db_time(now),
        )
    )


async def retrying(attempt: Callable[[], Awaitable[T]]) -> T:
    """Run ``attempt`` (one transaction) up to :data:`ATTEMPTS` times while it fails in a way a
    new transaction can cure (``db.engine.retry_reason``). Each attempt must look for a done
    call first, so one that did commit is replayed, never repeated. Raises
    ServiceUnavailableError for a lost connection, else the driver's error."""
    for left in range(ATTEMPTS - 1, -1, -1):
        try:
            return await attempt()
        except DBAPIError as exc:
            if left and retry_reason(exc) is not None:
                continue
            if is_connection_lost(exc):
                raise ServiceUnavailableError(1000) from exc
            raise
    raise AssertionError("unreachable")  # the last attempt returns or raises
