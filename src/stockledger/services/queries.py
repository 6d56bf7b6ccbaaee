"""The read side: balances, ledger entries and reservations, paged with opaque keyset cursors.

Every method is one read-only transaction (:meth:`Database.read`) scoped to one org. Paging is
forward only and keyset based (no OFFSET), so a cursor stays valid while rows are appended
(ARCHITECTURE section 11, "Paging"): a page asks for ``first + 1`` rows to know whether another
page follows, and ``has_previous_page`` is true exactly when ``after`` was given.

Cursors are base64url (unpadded) of a small JSON object tagged with the kind of list it pages,
so a cursor of one list given to another is refused like any malformed cursor.

Invalid input (``first`` outside 1..500, a malformed cursor, a bad filter string) raises
:class:`~stockledger.domain.errors.ValidationError` naming the argument, before any SQL runs.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import and_, or_, select
from sqlalchemy.sql.elements import ColumnElement

from stockledger.db.engine import Database
from stockledger.db.models import inventory_balance as B
from stockledger.db.models import inventory_ledger as L
from stockledger.db.models import location as LOC
from stockledger.db.models import reservation as R
from stockledger.db.models import reservation_line as RL
from stockledger.db.models import transfer as TR
from stockledger.db.models import transfer_line as TL
from stockledger.domain.errors import ValidationError
from stockledger.domain.events import reorder_quantity, suggested
from stockledger.domain.ids import TRANSFER, typed_number_of
from stockledger.domain.model import (
    LEDGER_EVENT_TYPES,
    RESERVATION_STATUSES,
    TRANSFER_STATUSES,
    Balance,
    LedgerEntry,
    Location,
    Reference,
    Reservation,
    ReservationLine,
    Transfer,
)
from stockledger.domain.validation import (
    MAX_LINES,
    check_reference,
    check_string,
    parse_reservation_id,
)
from stockledger.services.rows import (
    balance_record,
    ledger_record,
    line_record,
    location_record,
    reservation_record,
    select_balances,
    select_location,
    select_transfers,
    to_db_time,
)

T = TypeVar("T")

MAX_PAGE_SIZE = 500  # ARCHITECTURE section 11, "Limits": first from 1 to 500
MAX_FILTER_VALUES = MAX_LINES  # a filter's list is capped like an input's lines
MAX_CURSOR_LENGTH = 2048  # far above any cursor this module makes (two 255-char strings)
_MAX_ID = 2**63 - 1  # ids are BIGINT

# The kind tags carried by cursors.
_BALANCES, _LEDGER, _RESERVATIONS, _LOCATIONS, _TRANSFERS = "b", "l", "r", "o", "t"


@dataclass(frozen=True)
class StockLevels:
    """One SKU's balances at every location that has or had it (by location code), with
    their totals (units of stock)."""

    sku: str
    balances: list[Balance]

    # The totals over the listed balances, in units of stock.
    @property
    def on_hand(self) -> int:
        return sum(b.on_hand for b in self.balances)

    @property
    def reserved(self) -> int:
        return sum(b.reserved for b in self.balances)

    @property
    def available(self) -> int:
        return sum(b.available for b in self.balances)

    @property
    def incoming(self) -> int:
        return sum(b.incoming for b in self.balances)


@dataclass(frozen=True)
class TransferFilter:
    """Transfers with this ``status``, between these locations, or moving ``sku``."""

    status: str | None = None
    from_location: str | None = None
    to_location: str | None = None
    sku: str | None = None


@dataclass(frozen=True)
class BalanceFilter:
    """Balances of these ``skus`` (any location unless ``location``), and only those whose
    available (on hand - reserved) is strictly below ``available_below`` units."""

    skus: Sequence[str] | None = None
    location: str | None = None
    available_below: int | None = None


@dataclass(frozen=True)
class LedgerFilter:
    """Ledger entries matching every given criterion.

    ``event_types``: any of RESTOCK, ADJUST, RESERVE, RELEASE, EXPIRE, DEDUCT. ``since`` is
    inclusive and ``until`` exclusive (timezone-aware datetimes; naive ones are taken as UTC).
    ``reservation_id`` is the ``ID`` string; one that is no number matches nothing.
    """

    sku: str | None = None
    location: str | None = None
    event_types: Sequence[str] | None = None
    reservation_id: str | None = None
    reference: Reference | None = None
    idempotency_key: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class ReservationFilter:
    """Reservations with this ``status`` and ``reference``, expiring strictly before
    ``expires_before``."""

    status: str | None = None
    reference: Reference | None = None
    expires_before: datetime | None = None


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list: ``edges`` are (cursor, record) pairs in list order."""

    edges: list[tuple[str, T]] = field(default_factory=list)
    has_next_page: bool = False
    has_previous_page: bool = False

    @property
    def start_cursor(self) -> str | None:
        return self.edges[0][0] if self.edges else None

    @property
    def end_cursor(self) -> str | None:
        return self.edges[-1][0] if self.edges else None


def encode_cursor(kind: str, value: Any) -> str:
    """An opaque cursor: base64url (no padding) of ``{"k": kind, "v": value}`` as JSON."""
    raw = json.dumps({"k": kind, "v": value}, separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, kind: str) -> Any:
    """The value inside a cursor made by :func:`encode_cursor` for ``kind``.

    Raises ValidationError (field ``after``) when the cursor is not one of ours for this list,
    also when its JSON escapes a lone surrogate (``"\\ud800"``): no string of ours holds one
    (they are UTF-8 in the database), and one would fail only when the SQL driver encodes it.
    """
    if not isinstance(cursor, str) or not cursor or len(cursor) > MAX_CURSOR_LENGTH:
        raise ValidationError("is not a valid cursor", "after")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw.decode("utf-8"))
        # Lone surrogates (RFC 8259, section 8.2) raise UnicodeEncodeError here.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (binascii.Error, ValueError, UnicodeError):
        raise ValidationError("is not a valid cursor", "after") from None
    if not isinstance(data, dict) or data.get("k") != kind or "v" not in data:
        raise ValidationError("is not a valid cursor for this list", "after")
    return data["v"]


def _id_cursor_value(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_ID:
        raise ValidationError("is not a valid cursor", "after")
    return value


def _balance_cursor_value(value: Any) -> tuple[str, str]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, str) and len(v) <= 255 for v in value)
    ):
        raise ValidationError("is not a valid cursor", "after")
    return value[0], value[1]


def check_first(first: Any) -> int:
    """A page size from 1 to 500; raises ValidationError (field ``first``) otherwise."""
    if isinstance(first, bool) or not isinstance(first, int):
        raise ValidationError("must be an integer", "first")
    if not 1 <= first <= MAX_PAGE_SIZE:
        raise ValidationError(f"must be between 1 and {MAX_PAGE_SIZE}, got {first}", "first")
    return first


def _check_strings(values: Sequence[str], field_name: str) -> list[str]:
    if len(values) > MAX_FILTER_VALUES:
        raise ValidationError(f"must have at most {MAX_FILTER_VALUES} values", field_name)
    return [check_string(v, f"{field_name}.{i}") for i, v in enumerate(values)]


class InventoryQueries:
    """Reads for one org over ``db``. Units are units of stock; times are aware UTC datetimes."""

    def __init__(self, db: Database, org_id: str) -> None:
        self.db = db
        self.org_id = org_id

    async def balance(self, sku: str, location: str = "default") -> Balance | None:
        """The balance of ``sku`` at ``location``; None when never stocked there.

        Raises ValidationError for a SKU or location that breaks the string rules.
        """
        sku = check_string(sku, "sku")
        location = check_string(location, "location")
        async with self.db.read() as conn:
            rows = await select_balances(conn, self.org_id, [(location, sku)], for_update=False)
        row = rows.get((location, sku))
        return None if row is None else balance_record(row)

    async def balances(
        self, filter: BalanceFilter | None = None, first: int = 50, after: str | None = None
    ) -> Page[Balance]:
        """Balances ordered by (location, sku), ``first`` (1..500) of them after ``after``.

        Raises ValidationError for a bad ``first``, cursor or filter.
        """
        first = check_first(first)
        filter = filter or BalanceFilter()
        conds: list[ColumnElement[bool]] = [B.c.org_id == self.org_id]
        if filter.skus is not None:
            skus = _check_strings(filter.skus, "filter.skus")
            if not skus:
                return Page(has_previous_page=after is not None)
            conds.append(B.c.sku.in_(skus))
        if filter.location is not None:
            conds.append(B.c.location == check_string(filter.location, "filter.location"))
        if filter.available_below is not None:
            conds.append(B.c.on_hand - B.c.reserved < filter.available_below)
        if after is not None:
            loc, sku = _balance_cursor_value(decode_cursor(after, _BALANCES))
            conds.append(or_(B.c.location > loc, and_(B.c.location == loc, B.c.sku > sku)))
        stmt = select(B).where(*conds).order_by(B.c.location, B.c.sku).limit(first + 1)
        async with self.db.read() as conn:
            rows = (await conn.execute(stmt)).all()
        edges = [
            (encode_cursor(_BALANCES, [r.location, r.sku]), balance_record(r)) for r in rows[:first]
        ]
        return Page(edges, len(rows) > first, after is not None)

    async def ledger(
        self,
        filter: LedgerFilter | None = None,
        first: int = 50,
        after: str | None = None,
        direction: str = "DESC",
    ) -> Page[LedgerEntry]:
        """Ledger entries in append (id) order, ``DESC`` (newest first) or ``ASC``.

        Raises ValidationError for a bad ``first``, cursor, direction or filter.
        """
        first = check_first(first)
        if direction not in ("ASC", "DESC"):
            raise ValidationError("must be ASC or DESC", "direction")
        filter = filter or LedgerFilter()
        conds: list[ColumnElement[bool]] = [L.c.org_id == self.org_id]
        if filter.sku is not None:
            conds.append(L.c.sku == check_string(filter.sku, "filter.sku"))
        if filter.location is not None:
            conds.append(L.c.location == check_string(filter.location, "filter.location"))
        if filter.event_types is not None:
            types = list(dict.fromkeys(filter.event_types))
            for i, t in enumerate(types):
                if t not in LEDGER_EVENT_TYPES:
                    raise ValidationError("is not a ledger event type", f"filter.eventTypes.{i}")
            if not types:
                return Page(has_previous_page=after is not None)
            conds.append(L.c.event_type.in_(types))
        if filter.reservation_id is not None:
            rid = parse_reservation_id(check_string(filter.reservation_id, "filter.reservationId"))
            if rid is None:  # an id that is no number names no reservation
                return Page(has_previous_page=after is not None)
            conds.append(L.c.reservation_id == rid)
        reference = check_reference(filter.reference, "filter.reference")
        if reference is not None:
            conds += [L.c.ref_type == reference.type, L.c.ref_id == reference.id]
        if filter.idempotency_key is not None:
            key = check_string(filter.idempotency_key, "filter.idempotencyKey")
            conds.append(L.c.idempotency_key == key)
        if filter.since is not None:
            conds.append(L.c.created_at >= to_db_time(filter.since))
        if filter.until is not None:
            conds.append(L.c.created_at < to_db_time(filter.until))
        if after is not None:
            last = _id_cursor_value(decode_cursor(after, _LEDGER))
            conds.append(L.c.id < last if direction == "DESC" else L.c.id > last)
        order = L.c.id.desc() if direction == "DESC" else L.c.id.asc()
        stmt = select(L).where(*conds).order_by(order).limit(first + 1)
        async with self.db.read() as conn:
            rows = (await conn.execute(stmt)).all()
        edges = [(encode_cursor(_LEDGER, r.id), ledger_record(r)) for r in rows[:first]]
        return Page(edges, len(rows) > first, after is not None)

    async def reservation(self, reservation_id: str | int) -> Reservation | None:
        """The reservation with this id (without lines; see :meth:`lines_for`), or None.

        An id that is no number names no reservation (None).
        """
        rid = (
            reservation_id
            if isinstance(reservation_id, int)
            else parse_reservation_id(check_string(reservation_id, "id"))
        )
        if rid is None:
            return None
        async with self.db.read() as conn:
            row = (
                await conn.execute(select(R).where(R.c.org_id == self.org_id, R.c.id == rid))
            ).first()
        return None if row is None else reservation_record(row)

    async def reservations(
        self, filter: ReservationFilter | None = None, first: int = 50, after: str | None = None
    ) -> Page[Reservation]:
        """Reservations by id ascending (without lines; see :meth:`lines_for`).

        Raises ValidationError for a bad ``first``, cursor or filter.
        """
        first = check_first(first)
        filter = filter or ReservationFilter()
        conds: list[ColumnElement[bool]] = [R.c.org_id == self.org_id]
        if filter.status is not None:
            if filter.status not in RESERVATION_STATUSES:
                raise ValidationError("is not a reservation status", "filter.status")
            conds.append(R.c.status == filter.status)
        reference = check_reference(filter.reference, "filter.reference")
        if reference is not None:
            conds += [R.c.ref_type == reference.type, R.c.ref_id == reference.id]
        if filter.expires_before is not None:
            conds.append(R.c.expires_at < to_db_time(filter.expires_before))
        if after is not None:
            conds.append(R.c.id > _id_cursor_value(decode_cursor(after, _RESERVATIONS)))
        stmt = select(R).where(*conds).order_by(R.c.id).limit(first + 1)
        async with self.db.read() as conn:
            rows = (await conn.execute(stmt)).all()
        edges = [(encode_cursor(_RESERVATIONS, r.id), reservation_record(r)) for r in rows[:first]]
        return Page(edges, len(rows) > first, after is not None)

    async def lines_for(
        self, reservation_ids: Sequence[int]
    ) -> dict[int, tuple[ReservationLine, ...]]:
        """The lines of many reservations in one query, by reservation id ((location, sku) order).

        Ids with no lines (or no reservation) map to an empty tuple. For a DataLoader.
        """
        ids = list(dict.fromkeys(reservation_ids))
        if not ids:
            return {}
        # select_lines plus the tenant: ids come from this org's pages, but a DataLoader key
        # should never be able to reach another org's lines.
        stmt = (
            select(RL)
            .where(RL.c.org_id == self.org_id, RL.c.reservation_id.in_(ids))
            .order_by(RL.c.reservation_id, RL.c.location, RL.c.sku)
        )
        out: dict[int, list[ReservationLine]] = {rid: [] for rid in ids}
        async with self.db.read() as conn:
            for row in (await conn.execute(stmt)).all():
                out[row.reservation_id].append(line_record(row))
        return {rid: tuple(lines) for rid, lines in out.items()}

    async def stock_levels(self, sku: str) -> StockLevels | None:
        """``sku``'s balances at every location, by location code; None when no location has
        a balance of it.

        Raises ValidationError for a SKU that breaks the string rules.
        """
        sku = check_string(sku, "sku")
        stmt = select(B).where(B.c.org_id == self.org_id, B.c.sku == sku).order_by(B.c.location)
        async with self.db.read() as conn:
            balances = [balance_record(r) for r in (await conn.execute(stmt)).all()]
        if not balances:
            return None
        return StockLevels(sku, balances)

    async def location(self, code: str) -> Location | None:
        """The registered location ``code``, or None. Raises ValidationError for a bad code."""
        code = check_string(code, "code")
        async with self.db.read() as conn:
            return await select_location(conn, self.org_id, code)

    async def locations(
        self, active_only: bool = False, first: int = 50, after: str | None = None
    ) -> Page[Location]:
        """Registered locations by code, ``first`` (1..500) after ``after``; ``active_only``
        leaves the inactive ones out. Raises ValidationError for a bad ``first`` or cursor."""
        first = check_first(first)
        conds: list[ColumnElement[bool]] = [LOC.c.org_id == self.org_id]
        if active_only:
            conds.append(LOC.c.active.is_(True))
        if after is not None:
            last = decode_cursor(after, _LOCATIONS)
            if not isinstance(last, str):
                raise ValidationError("is not a valid cursor", "after")
            conds.append(LOC.c.code > last)
        stmt = select(LOC).where(*conds).order_by(LOC.c.code).limit(first + 1)
        async with self.db.read() as conn:
            rows = (await conn.execute(stmt)).all()
        edges = [(encode_cursor(_LOCATIONS, r.code), location_record(r)) for r in rows[:first]]
        return Page(edges, len(rows) > first, after is not None)

    async def transfer(self, transfer_id: str | int) -> Transfer | None:
        """The transfer with this opaque id (or number), with its lines; None when none."""
        number = (
            transfer_id
            if isinstance(transfer_id, int)
            else typed_number_of(TRANSFER, check_string(transfer_id, "id"))
        )
        if number is None:
            return None
        async with self.db.read() as conn:
            found = await select_transfers(conn, self.org_id, [number])
        return found[0] if found else None

    async def transfers(
        self, filter: TransferFilter | None = None, first: int = 50, after: str | None = None
    ) -> Page[Transfer]:
        """Transfers newest first (by id, descending), with their lines, ``first`` (1..500)
        after ``after``. Raises ValidationError for a bad ``first``, cursor or filter."""
        first = check_first(first)
        filter = filter or TransferFilter()
        conds: list[ColumnElement[bool]] = [TR.c.org_id == self.org_id]
        if filter.status is not None:
            if filter.status not in TRANSFER_STATUSES:
                raise ValidationError("is not a transfer status", "filter.status")
            conds.append(TR.c.status == filter.status)
        if filter.from_location is not None:
            source = check_string(filter.from_location, "filter.fromLocation")
            conds.append(TR.c.from_location == source)
        if filter.to_location is not None:
            conds.append(TR.c.to_location == check_string(filter.to_location, "filter.toLocation"))
        if filter.sku is not None:
            sku = check_string(filter.sku, "filter.sku")
            moving = select(TL.c.transfer_id).where(TL.c.org_id == self.org_id, TL.c.sku == sku)
            conds.append(TR.c.id.in_(moving))
        if after is not None:
            conds.append(TR.c.id < _id_cursor_value(decode_cursor(after, _TRANSFERS)))
        stmt = select(TR.c.id).where(*conds).order_by(TR.c.id.desc()).limit(first + 1)
        async with self.db.read() as conn:
            ids = [r.id for r in (await conn.execute(stmt)).all()]
            found = await select_transfers(conn, self.org_id, ids[:first])
        edges = [(encode_cursor(_TRANSFERS, t.id), t) for t in found]
        return Page(edges, len(ids) > first, after is not None)

    async def low_stock(
        self, location: str | None = None, first: int = 50, after: str | None = None
    ) -> Page[Balance]:
        """Balances with a reorder point whose available <= its minimum level (part EVENTS:
        seed 004's checkLowStock; ``Balance.low_stock`` in SQL, for keyset paging), by
        (location, sku); at ``location`` only when given.
        Raises ValidationError for a bad ``first``, cursor or location."""
        first = check_first(first)
        conds: list[ColumnElement[bool]] = [
            B.c.org_id == self.org_id,
            B.c.reorder_minimum.is_not(None),
            B.c.on_hand - B.c.reserved <= B.c.reorder_minimum,
        ]
        if location is not None:
            conds.append(B.c.location == check_string(location, "location"))
        if after is not None:
            loc, sku = _balance_cursor_value(decode_cursor(after, _BALANCES))
            conds.append(or_(B.c.location > loc, and_(B.c.location == loc, B.c.sku > sku)))
        stmt = select(B).where(*conds).order_by(B.c.location, B.c.sku).limit(first + 1)
        async with self.db.read() as conn:
            rows = (await conn.execute(stmt)).all()
        edges = [
            (encode_cursor(_BALANCES, [r.location, r.sku]), balance_record(r)) for r in rows[:first]
        ]
        return Page(edges, len(rows) > first, after is not None)

    async def reorder_suggestions(
        self, location: str, first: int = 100
    ) -> list[tuple[Balance, int]]:
        """(balance, units to order) at ``location`` by section 15's formula: a balance with
        a reorder point is suggested when available + incoming <= its minimum level (stock on
        its way counts); the quantity is maximum level - (available + incoming) when a maximum
        is set, else the reorder quantity. Largest quantity first, then location and sku; at
        most ``first`` (1..500). Raises ValidationError for a bad location or ``first``."""
        location = check_string(location, "location")
        first = check_first(first)
        # The rule itself is the domain's (events.suggested); SQL narrows to the balances it
        # can name.
        stmt = select(B).where(
            B.c.org_id == self.org_id,
            B.c.location == location,
            B.c.reorder_minimum.is_not(None),
        )
        async with self.db.read() as conn:
            found = [balance_record(r) for r in (await conn.execute(stmt)).all()]
        chosen = [(b, reorder_quantity(b)) for b in found if suggested(b)]
        chosen.sort(key=lambda x: (-x[1], x[0].location, x[0].sku))
        return chosen[:first]
