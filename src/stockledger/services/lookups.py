"""The reads the write path makes outside its batches, in SQL (:class:`SqlLookups`).

A replay answers a key already done with the current state of what that call changed
(ARCHITECTURE section 5): the key row stores the operation and the request hash; the result is
found through the ledger entries that carry the key (indexed), plus ``result_ref`` for an
extend or a confirm, which write no entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from stockledger.db.engine import Database
from stockledger.db.models import idempotency_key as K
from stockledger.db.models import reservation as R
from stockledger.db.store import any_due_holding, reservation_balance_keys
from stockledger.domain.commands import (
    CancelTransfer,
    ClearReorderPoint,
    CreateLocation,
    ReceiveTransfer,
    SetReorderPoint,
    TransferStock,
    UpdateLocation,
)
from stockledger.domain.ids import balance_key_of
from stockledger.domain.model import (
    ACTIVE,
    Balance,
    BalanceKey,
    LedgerEntry,
    Reference,
    Reservation,
    Transfer,
)
from stockledger.domain.state import key_reused
from stockledger.services.records import (
    AdjustResult,
    ConfirmResult,
    DeductResult,
    ExtendResult,
    LocationResult,
    ReleaseResult,
    ReorderPointResult,
    ReserveResult,
    RestockResult,
    TransferResult,
    WriteResult,
)
from stockledger.services.rows import (
    balance_record,
    select_balances,
    select_ledger_by_key,
    select_location,
    select_reservations,
    select_transfers,
    to_db_time,
)

# The operations whose replays are found through something other than their entries' keys.
LOCATION_OPERATIONS = (CreateLocation.operation, UpdateLocation.operation)
REORDER_OPERATIONS = (SetReorderPoint.operation, ClearReorderPoint.operation)
TRANSFER_OPERATIONS = (
    TransferStock.operation,
    ReceiveTransfer.operation,
    CancelTransfer.operation,
)


class SqlLookups:
    """The write path's reads over ``db`` for one org (the protocol: ``services/ports.py``)."""

    def __init__(self, db: Database, org_id: str) -> None:
        self.db = db
        self.org_id = org_id

    async def replay(self, operation: str, key: str, request_hash: str) -> WriteResult | None:
        """See :meth:`stockledger.services.ports.Lookups.replay`."""
        return await replay(self.db, self.org_id, operation, key, request_hash)

    async def balances_and_key(
        self, keys: Sequence[BalanceKey], idempotency_key: str
    ) -> tuple[dict[BalanceKey, Balance], bool]:
        """See :meth:`stockledger.services.ports.Lookups.balances_and_key`."""
        async with self.db.read() as conn:
            rows = await select_balances(conn, self.org_id, keys, for_update=False)
            # The key is read after the balances: at READ COMMITTED each statement sees the
            # latest commits, so a copy whose effect the balances show has its key seen too.
            done = await key_done(conn, self.org_id, idempotency_key)
        return {k: balance_record(row) for k, row in rows.items()}, done

    async def reservation_keys(
        self, ids: Sequence[int], references: Sequence[Reference]
    ) -> dict[int | Reference, list[BalanceKey]]:
        """See :meth:`stockledger.services.ports.Lookups.reservation_keys`."""
        return await reservation_balance_keys(self.db, self.org_id, ids, references)

    async def transfer_keys(self, ids: Sequence[int]) -> dict[int, list[BalanceKey]]:
        """See :meth:`stockledger.services.ports.Lookups.transfer_keys`."""
        async with self.db.read() as conn:
            return {t.id: t.balance_keys() for t in await select_transfers(conn, self.org_id, ids)}

    async def any_due_holding(self, keys: Sequence[BalanceKey], now: datetime) -> bool:
        """See :meth:`stockledger.services.ports.Lookups.any_due_holding`."""
        return await any_due_holding(self.db, self.org_id, keys, now)

    async def due_reservation_ids(self, now: datetime, limit: int) -> list[int]:
        """See :meth:`stockledger.services.ports.Lookups.due_reservation_ids`."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(R.c.id)
                .where(
                    R.c.status == ACTIVE,
                    R.c.expires_at <= to_db_time(now),
                    R.c.org_id == self.org_id,
                )
                .order_by(R.c.expires_at)
                .limit(limit)
            )
            return [r.id for r in rows]


async def due_reservations_of_every_org(
    db: Database, now: datetime, limit: int
) -> list[tuple[str, int]]:
    """(org, id) of ACTIVE reservations of any org due at ``now``, soonest first (for the
    sweeper of a server that serves every org; index (status, expires_at))."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(R.c.org_id, R.c.id)
            .where(R.c.status == ACTIVE, R.c.expires_at <= to_db_time(now))
            .order_by(R.c.expires_at)
            .limit(limit)
        )
        return [(r.org_id, r.id) for r in rows]


async def replay(
    db: Database, org_id: str, operation: str, key: str, request_hash: str
) -> WriteResult | None:
    """The result of the done call with ``key``, with ``replayed=True``.

    Returns None when no call with ``key`` is done. Raises IdempotencyKeyReusedError when it
    was done with another operation or payload.
    """
    async with db.read() as conn:
        found = await done_call(conn, org_id, key, operation, request_hash)
        if found is None:
            return None
        if operation in LOCATION_OPERATIONS:  # no entries: the key row names the code
            location = await select_location(conn, org_id, found.result_ref or "")
            if location is None:
                raise RuntimeError(f"location {found.result_ref!r} of a done call vanished")
            return LocationResult(location, True)
        if operation in REORDER_OPERATIONS:  # no entries: the key row names the balance
            named = balance_key_of(found.result_ref or "")
            rows = await select_balances(conn, org_id, [named] if named else [], for_update=False)
            if named is None or named not in rows:
                raise RuntimeError(f"the balance of a done call vanished: {found.result_ref!r}")
            return ReorderPointResult(balance_record(rows[named]), True)
        entries = await select_ledger_by_key(conn, org_id, key)
        if operation in TRANSFER_OPERATIONS:
            [moved] = await select_transfers(conn, org_id, [replayed_transfer_id(entries)])
            keys = transfer_result_keys(moved, entries)
            bal_rows = await select_balances(conn, org_id, keys, for_update=False)
            balances = [balance_record(bal_rows[k]) for k in keys if k in bal_rows]
            return TransferResult(moved, balances, entries, True)
        ids = replayed_reservation_ids(entries, found.result_ref)
        reservations = await select_reservations(conn, org_id, ids)
        keys = list(dict.fromkeys(e.key for e in entries))
        if operation == "confirm":  # no entries: the balances its reservations hold
            keys = list(dict.fromkeys(ln.key for r in reservations for ln in r.lines or ()))
        bal_rows = await select_balances(conn, org_id, keys, for_update=False)
        balances = [balance_record(bal_rows[k]) for k in sorted(keys) if k in bal_rows]
    return replayed_result(operation, entries, balances, reservations)


def replayed_reservation_ids(entries: Sequence[LedgerEntry], result_ref: str | None) -> list[int]:
    """The reservations a done call's result lists: those its ledger entries name, in order,
    or those its key row names, comma-separated (an extend or a confirm writes no entry)."""
    if result_ref:
        return [int(i) for i in result_ref.split(",")]
    return list(dict.fromkeys(e.reservation_id for e in entries if e.reservation_id))


def replayed_transfer_id(entries: Sequence[LedgerEntry]) -> int:
    """The transfer a done transfer, receipt or cancel acted on: its entries name it (each
    of them posts at least one entry)."""
    for e in entries:
        if e.transfer_id is not None:
            return e.transfer_id
    raise RuntimeError("a done transfer call without transfer entries")


def transfer_result_keys(moved: Transfer, entries: Sequence[LedgerEntry]) -> list[BalanceKey]:
    """The balances a transfer, receipt or cancel lists in its result (and its replay), sorted:
    both ends of every SKU it posted an entry for (the end without an entry changed its
    incoming: an in-transit transfer's destination, a cancel's)."""
    skus = {e.sku for e in entries if e.transfer_id == moved.id}
    return sorted({(loc, sku) for sku in skus for loc in (moved.from_location, moved.to_location)})


def replayed_result(
    operation: str,
    entries: list[LedgerEntry],
    balances: list[Balance],
    reservations: list[Reservation],
) -> WriteResult:
    """A done call's result from the current state of what it changed: its ``entries`` (by
    key, in append order), those balances now (key order) and its reservations now."""
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
    if operation == "confirm":
        return ConfirmResult(reservations, balances, True)
    raise ValueError(f"no replay for operation {operation!r}")


async def done_call(
    conn: AsyncConnection, org_id: str, key: str, operation: str, request_hash: str
) -> Row[Any, Any, Any] | None:
    """The key row (``operation``, ``request_hash``, ``result_ref``) of the done call with
    idempotency ``key`` in ``org_id``, read on ``conn``; None when no call used ``key``.
    Raises IdempotencyKeyReusedError when it was used for another operation or request
    (:func:`~stockledger.domain.state.key_reused`, ARCHITECTURE section 5)."""
    row = (
        await conn.execute(
            select(K.c.operation, K.c.request_hash, K.c.result_ref).where(
                K.c.org_id == org_id, K.c.idempotency_key == key
            )
        )
    ).first()
    if row is None:
        return None
    reused = key_reused(key, (row.operation, row.request_hash), (operation, request_hash))
    if reused is not None:
        raise reused
    return row


async def key_done(conn: AsyncConnection, org_id: str, key: str) -> bool:
    """True when a call with ``key`` is done (its key row committed), read on ``conn``."""
    row = await conn.execute(
        select(K.c.operation).where(K.c.org_id == org_id, K.c.idempotency_key == key)
    )
    return row.first() is not None
