"""Row -> domain value conversion and the small SQL building blocks of the read side
(queries, replays, reconciliation)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, and_, bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from stockledger.db.models import inventory_balance as B
from stockledger.db.models import inventory_ledger as L
from stockledger.db.models import location as LOC
from stockledger.db.models import reservation as R
from stockledger.db.models import reservation_line as RL
from stockledger.db.models import transfer as T
from stockledger.db.models import transfer_line as TL
from stockledger.db.store import reorder_point_of
from stockledger.domain.model import (
    Balance,
    BalanceKey,
    LedgerEntry,
    Location,
    Reference,
    Reservation,
    ReservationLine,
    Transfer,
    TransferLine,
)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the default clock of the services)."""
    return datetime.now(UTC)


def to_db_time(value: datetime) -> datetime:
    """A timezone-aware datetime as the naive UTC value stored in DATETIME(6) columns."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def from_db_time(value: datetime) -> datetime:
    """A stored naive UTC value as a timezone-aware datetime."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def reference_of(ref_type: str | None, ref_id: str | None) -> Reference | None:
    """The reference stored as two columns, or None."""
    return None if ref_type is None or ref_id is None else Reference(ref_type, ref_id)


def balance_record(row: Any) -> Balance:
    """A balance row as a domain value."""
    return Balance(
        sku=row.sku,
        location=row.location,
        on_hand=row.on_hand,
        reserved=row.reserved,
        version=row.version,
        updated_at=from_db_time(row.updated_at),
        committed=row.committed,
        incoming=row.incoming,
        reorder=reorder_point_of(row.reorder_minimum, row.reorder_quantity, row.reorder_maximum),
        alert=row.alert_state,
    )


def ledger_record(row: Any) -> LedgerEntry:
    """A ledger row as a domain value."""
    return LedgerEntry(
        id=row.id,
        event_type=row.event_type,
        sku=row.sku,
        location=row.location,
        on_hand_delta=row.on_hand_delta,
        reserved_delta=row.reserved_delta,
        on_hand_after=row.on_hand_after,
        reserved_after=row.reserved_after,
        reservation_id=row.reservation_id,
        reference=reference_of(row.ref_type, row.ref_id),
        reason=row.reason,
        idempotency_key=row.idempotency_key,
        created_at=from_db_time(row.created_at),
        transfer_id=row.transfer_id,
    )


def location_record(row: Any) -> Location:
    """A location row as a domain value."""
    return Location(
        code=row.code,
        name=row.name,
        type=row.type,
        active=bool(row.active),
        created_at=from_db_time(row.created_at),
        updated_at=from_db_time(row.updated_at),
    )


def transfer_record(row: Any, lines: Sequence[Any]) -> Transfer:
    """A transfer row and its line rows as a domain value."""
    return Transfer(
        id=row.id,
        status=row.status,
        from_location=row.from_location,
        to_location=row.to_location,
        lines=tuple(
            TransferLine(ln.sku, ln.quantity, ln.received, ln.returned)
            for ln in sorted(lines, key=lambda ln: ln.sku)
        ),
        reference=reference_of(row.ref_type, row.ref_id),
        reason=row.reason,
        created_at=from_db_time(row.created_at),
        updated_at=from_db_time(row.updated_at),
    )


async def select_transfers(
    conn: AsyncConnection, org_id: str, transfer_ids: Sequence[int]
) -> list[Transfer]:
    """Transfers of ``org_id`` with their lines, in the order of ``transfer_ids`` (unknown
    ones left out)."""
    if not transfer_ids:
        return []
    wanted = list(dict.fromkeys(transfer_ids))
    rows = (await conn.execute(select(T).where(T.c.org_id == org_id, T.c.id.in_(wanted)))).all()
    lines: dict[int, list[Any]] = {r.id: [] for r in rows}
    if lines:
        stmt = select(TL).where(TL.c.org_id == org_id, TL.c.transfer_id.in_(list(lines)))
        for ln in (await conn.execute(stmt)).all():
            lines[ln.transfer_id].append(ln)
    by_id = {r.id: r for r in rows}
    return [transfer_record(by_id[i], lines[i]) for i in wanted if i in by_id]


async def select_location(conn: AsyncConnection, org_id: str, code: str) -> Location | None:
    """The registered location ``code`` of ``org_id``, or None."""
    row = (
        await conn.execute(select(LOC).where(LOC.c.org_id == org_id, LOC.c.code == code))
    ).first()
    return None if row is None else location_record(row)


def line_record(row: Any) -> ReservationLine:
    """A reservation line row as a domain value."""
    return ReservationLine(
        sku=row.sku,
        location=row.location,
        quantity=row.quantity,
        deducted=row.deducted,
        released=row.released,
    )


def reservation_record(row: Any, lines: Sequence[Any] | None = None) -> Reservation:
    """A reservation row (and its line rows, when given) as a domain value."""
    return Reservation(
        id=row.id,
        status=row.status,
        reference=reference_of(row.ref_type, row.ref_id),
        expires_at=None if row.expires_at is None else from_db_time(row.expires_at),
        created_at=from_db_time(row.created_at),
        updated_at=from_db_time(row.updated_at),
        lines=None if lines is None else tuple(line_record(r) for r in lines),
    )


@functools.lru_cache(maxsize=1024)
def _balances_statement(count: int, for_update: bool) -> Select[Any]:
    """The balance read for ``count`` keys with bind parameters ``l<i>``/``s<i>``, built once
    per shape so each call is a compiled-cache hit instead of a new statement."""
    clause = or_(
        *(
            and_(B.c.location == bindparam(f"l{i}"), B.c.sku == bindparam(f"s{i}"))
            for i in range(count)
        )
    )
    stmt = (
        select(B)
        .where(B.c.org_id == bindparam("org"), clause)
        .order_by(B.c.location, B.c.sku)
        # InnoDB locks rows in the order it scans them: force the primary key so that order is
        # (location, sku) whatever the optimizer would pick (it sometimes chose the (org, sku)
        # index plus a filesort, locking in sku order and deadlocking against other carts).
        .with_hint(B, "FORCE INDEX (PRIMARY)", "mysql")
    )
    return stmt.with_for_update() if for_update else stmt


async def select_balances(
    conn: AsyncConnection, org_id: str, keys: Sequence[BalanceKey], *, for_update: bool
) -> dict[BalanceKey, Any]:
    """The balance rows of ``keys`` (missing ones absent), in one statement ordered by key.

    With ``for_update`` the rows are locked in (location, sku) order (ARCHITECTURE section 4).
    """
    if not keys:
        return {}
    params: dict[str, Any] = {"org": org_id}
    for i, (loc, sku) in enumerate(keys):
        params[f"l{i}"] = loc
        params[f"s{i}"] = sku
    rows = (await conn.execute(_balances_statement(len(keys), for_update), params)).all()
    return {(r.location, r.sku): r for r in rows}


async def select_lines(
    conn: AsyncConnection, org_id: str, reservation_ids: Sequence[int]
) -> dict[int, list[Any]]:
    """Lines of the given reservations of ``org_id``, by reservation id, each list in
    (location, sku) order."""
    out: dict[int, list[Any]] = {rid: [] for rid in reservation_ids}
    if not reservation_ids:
        return out
    stmt = (
        select(RL)
        .where(RL.c.org_id == org_id, RL.c.reservation_id.in_(list(reservation_ids)))
        .order_by(RL.c.reservation_id, RL.c.location, RL.c.sku)
    )
    for row in (await conn.execute(stmt)).all():
        out[row.reservation_id].append(row)
    return out


async def select_reservations(
    conn: AsyncConnection, org_id: str, reservation_ids: Sequence[int]
) -> list[Reservation]:
    """Reservations with their lines, in the order of ``reservation_ids``."""
    if not reservation_ids:
        return []
    rows = (
        await conn.execute(select(R).where(R.c.org_id == org_id, R.c.id.in_(list(reservation_ids))))
    ).all()
    by_id = {r.id: r for r in rows}
    lines = await select_lines(conn, org_id, list(by_id))
    return [reservation_record(by_id[i], lines[i]) for i in reservation_ids if i in by_id]


async def select_ledger_by_key(conn: AsyncConnection, org_id: str, key: str) -> list[LedgerEntry]:
    """The ledger entries written under one idempotency key, in append order."""
    stmt = select(L).where(L.c.org_id == org_id, L.c.idempotency_key == key).order_by(L.c.id)
    return [ledger_record(r) for r in (await conn.execute(stmt)).all()]
