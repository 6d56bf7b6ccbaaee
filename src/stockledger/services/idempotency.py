"""Answers for a key already done: the current state of what that call changed
(ARCHITECTURE section 5, "replayed: true and the current state of what it changed").

The key row stores the operation and the request hash; the result is found through the ledger
entries that carry the key (indexed), plus ``result_ref`` for an extend, which writes no entry.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from stockledger.db.engine import Database
from stockledger.db.models import idempotency_key as K
from stockledger.domain.errors import IdempotencyKeyReusedError
from stockledger.services.records import (
    AdjustResult,
    DeductResult,
    ExtendResult,
    ReleaseResult,
    ReserveResult,
    RestockResult,
    WriteResult,
)
from stockledger.services.rows import (
    balance_record,
    select_balances,
    select_ledger_by_key,
    select_reservations,
)


async def replay(
    db: Database, org_id: str, operation: str, key: str, request_hash: str
) -> WriteResult | None:
    """The result of the done call with ``key``, with ``replayed=True``.

    Returns None when no call with ``key`` is done. Raises IdempotencyKeyReusedError when it
    was done with another operation or payload.
    """
    async with db.read() as conn:
        row = (
            await conn.execute(
                select(K.c.operation, K.c.request_hash, K.c.result_ref).where(
                    K.c.org_id == org_id, K.c.idempotency_key == key
                )
            )
        ).first()
        if row is None:
            return None
        if row.operation != operation or row.request_hash != request_hash:
            raise IdempotencyKeyReusedError(key, row.operation)
        entries = await select_ledger_by_key(conn, org_id, key)
        res_ids = list(dict.fromkeys(e.reservation_id for e in entries if e.reservation_id))
        if row.result_ref:
            res_ids = [int(row.result_ref)]
        keys = list(dict.fromkeys((e.location, e.sku) for e in entries))
        bal_rows = await select_balances(conn, org_id, keys, for_update=False)
        balances = [balance_record(bal_rows[k]) for k in sorted(keys) if k in bal_rows]
        reservations = await select_reservations(conn, org_id, res_ids)
    if operation == "restock":
        return RestockResult(balances, entries, True)
    if operation == "adjust":
        return AdjustResult(balances[0], entries[0], True)
    if operation == "reserve":
        return ReserveResult(reservations[0], balances, True)
    if operation == "release":
        return ReleaseResult(reservations, balances, True)
    if operation == "deduct":
        return DeductResult(reservations, balances, entries, True)
    if operation == "extend":
        return ExtendResult(reservations[0], True)
    raise ValueError(f"no replay for operation {operation!r}")


async def key_done(conn: AsyncConnection, org_id: str, key: str) -> bool:
    """True when a call with ``key`` is done (its key row committed), read on ``conn``."""
    row = await conn.execute(
        select(K.c.operation).where(K.c.org_id == org_id, K.c.idempotency_key == key)
    )
    return row.first() is not None
