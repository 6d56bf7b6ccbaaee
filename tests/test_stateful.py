"""Randomized runs of the write services against a plain in-memory model, on both engines.

After every step the four invariants of ARCHITECTURE section 2 hold (the reconciliation query
finds nothing) and the database agrees with the model: every balance's on hand, reserved,
incoming, version and ledger entry count, every reservation's status, reference, expiry and
lines, every location and transfer (status and line figures), and whether each call succeeded
or raised which error. Transfers (immediate and in transit), receipts, cancels and location
(de)activation are mixed with every other command, and conservation (section 14) holds per SKU
after every step: on hand over all locations + in transit = restocks - deducts + adjusts.
"""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from conftest import make_settings
from hypothesis import HealthCheck
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from stockledger.db.engine import create_database
from stockledger.db.models import inventory_balance as B
from stockledger.db.models import inventory_ledger as L
from stockledger.db.models import location as LOC
from stockledger.db.models import reservation as R
from stockledger.db.models import reservation_line as RL
from stockledger.db.models import transfer as TR
from stockledger.db.models import transfer_line as TLN
from stockledger.domain.errors import LocationUnavailableError, TransferNotOpenError
from stockledger.domain.ids import transfer_global_id
from stockledger.services import (
    IdempotencyKeyReusedError,
    InsufficientStockError,
    InventoryService,
    Line,
    NotFoundError,
    Reference,
    ReservationNotActiveError,
    Shortage,
    StockError,
    ValidationError,
    VersionConflictError,
)
from stockledger.services.reconcile import find_violations
from stockledger.services.records import TransferLineRequest as TL

pytestmark = pytest.mark.slow

# Case and a trailing space make SKUs distinct (section 11): the model keeps them apart too.
SKUS = ("SKU-1", "sku-1", "SKU-1 ")
LOCATIONS = ("WH-1", "WH-2", "WH-3")
KEYS = [(loc, sku) for loc in LOCATIONS for sku in SKUS]  # (location, sku)
# A run starts with stock at the first two; WH-3 is registered by whatever first names it.
INITIAL_KEYS = [k for k in KEYS if k[0] != LOCATIONS[-1]]
# What restock, adjust, reserve and direct deduct draw from: WH-3, mostly stocked by
# transfers, half as often (else most carts naming it would be short).
DRAWN_KEYS = [*INITIAL_KEYS, *INITIAL_KEYS, *KEYS[len(INITIAL_KEYS) :]]
UNREGISTERED = "WH-9"  # never registered: updateLocation of it is NotFoundError
LOCATION_TYPES = ("WAREHOUSE", "STORE", "VIRTUAL")
REFS = (Reference("ORDER", "A-1"), Reference("ORDER", "a-1"))
TTLS = (1, 5, 30, 1800)
ADVANCES = (0.5, 1, 1, 4, 5, 5, 30, 1800)
BASE_TIME = datetime(2031, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)  # microseconds on purpose
DEFAULT_TTL = 1800
MAX_TTL = 7 * 24 * 3600
ACTIVE, COMMITTED, RELEASED, EXPIRED = "ACTIVE", "COMMITTED", "RELEASED", "EXPIRED"
CONFIRMED = "CONFIRMED"  # section 14: holds its units with no expiry until deducted or released
HOLDING = (ACTIVE, CONFIRMED)  # release and deduct act on these; confirm and extend on ACTIVE
IN_TRANSIT, PARTIALLY_RECEIVED, CANCELLED = "IN_TRANSIT", "PARTIALLY_RECEIVED", "CANCELLED"
RECEIVED = "RECEIVED"
OPEN = (IN_TRANSIT, PARTIALLY_RECEIVED)  # transfers with units in transit

Key = tuple[str, str]


# ---------------------------------------------------------------------------- the model


@dataclass
class MBalance:
    on_hand: int = 0
    reserved: int = 0
    version: int = 0
    entries: int = 0  # ledger entries of this balance


@dataclass
class MLine:
    quantity: int
    deducted: int = 0
    released: int = 0

    @property
    def remaining(self) -> int:
        return self.quantity - self.deducted - self.released


@dataclass
class MReservation:
    id: int
    reference: Reference | None
    expires_at: datetime | None  # None once CONFIRMED
    created_at: datetime
    lines: dict[Key, MLine]
    status: str = ACTIVE


@dataclass
class MLocation:
    name: str
    type: str = "WAREHOUSE"
    active: bool = True


@dataclass
class MTransferLine:
    quantity: int
    received: int = 0
    returned: int = 0

    @property
    def remaining(self) -> int:
        return self.quantity - self.received - self.returned


@dataclass
class MTransfer:
    id: int
    status: str
    source: str
    destination: str
    lines: dict[str, MTransferLine]  # by SKU
    reference: Reference | None
    reason: str | None


@dataclass
class Model:
    now: datetime = BASE_TIME
    balances: dict[Key, MBalance] = field(default_factory=dict)
    reservations: dict[int, MReservation] = field(default_factory=dict)
    locations: dict[str, MLocation] = field(default_factory=dict)
    transfers: dict[int, MTransfer] = field(default_factory=dict)
    made: dict[str, int] = field(default_factory=dict)  # restocks - deducts + adjusts per SKU

    def copy(self) -> Model:
        return copy.deepcopy(self)

    def move(self, key: Key, on_hand_delta: int, reserved_delta: int, made: bool = True) -> None:
        """One ledger entry on one balance (creating it, as restock and adjust do). The version
        counts ledger entries: a by-reference call that changes a balance through two
        reservations writes two entries (section 11) and adds two. ``made``: the change makes
        or loses units (every entry but a transfer's), tallied for conservation."""
        bal = self.balances.setdefault(key, MBalance())
        bal.on_hand += on_hand_delta
        bal.reserved += reserved_delta
        bal.version += 1
        bal.entries += 1
        if made:
            self.made[key[1]] = self.made.get(key[1], 0) + on_hand_delta

    def shift(self, key: Key, units: int) -> None:
        """A TRANSFER_OUT (``units`` < 0) or TRANSFER_IN entry: moves units, makes none."""
        self.move(key, units, 0, made=False)

    def register(self, code: str) -> None:
        """A restock, adjust or transfer to an unknown code registers it (section 14)."""
        self.locations.setdefault(code, MLocation(code))

    def inactive(self, code: str) -> bool:
        loc = self.locations.get(code)
        return loc is not None and not loc.active

    def in_transit(self) -> dict[str, int]:
        """Units in transit per SKU: the remaining of every open transfer's lines."""
        out: dict[str, int] = {}
        for t in self.transfers.values():
            if t.status in OPEN:
                for sku, ln in t.lines.items():
                    out[sku] = out.get(sku, 0) + ln.remaining
        return out

    def incoming(self) -> dict[Key, int]:
        """``Balance.incoming``: open transfers' remaining per destination balance (non-zero)."""
        out: dict[Key, int] = {}
        for t in self.transfers.values():
            if t.status in OPEN:
                for sku, ln in t.lines.items():
                    if ln.remaining:
                        k = (t.destination, sku)
                        out[k] = out.get(k, 0) + ln.remaining
        return out

    def open_transfer(self, opaque: str) -> MTransfer:
        """The open transfer a receive or cancel of ``opaque`` acts on, or its refusal."""
        number = next((i for i in self.transfers if transfer_global_id(i) == opaque), None)
        if number is None:
            raise Expect(NotFoundError("Transfer", unknown_transfer_key(opaque)))
        t = self.transfers[number]
        if t.status not in OPEN:
            raise Expect(TransferNotOpenError(t.id, t.status))
        return t

    def available(self, key: Key) -> int:
        bal = self.balances.get(key)
        return 0 if bal is None else bal.on_hand - bal.reserved

    def expire(self, res: MReservation) -> set[Key]:
        """EXPIRE: remaining -> released, status EXPIRED; returns the balances it changed."""
        changed = set()
        for key, ln in res.lines.items():
            if ln.remaining > 0:
                self.move(key, 0, -ln.remaining)
                ln.released += ln.remaining
                changed.add(key)
        res.status = EXPIRED
        return changed

    def due(self, res: MReservation) -> bool:
        return res.status == ACTIVE and res.expires_at is not None and self.now >= res.expires_at

    def by_id(self, rid: int | str, statuses: tuple[str, ...]) -> MReservation:
        """The reservation a call by id acts on, or the refusal it gets (raised): unknown ->
        NotFoundError; not of ``statuses`` -> ReservationNotActiveError; past due -> it is
        expired (that commits) and the call refused with status EXPIRED (section 11)."""
        res = self.reservations.get(int(rid)) if str(rid).isdigit() else None
        if res is None:
            raise Expect(NotFoundError("Reservation", str(rid)))
        if res.status not in statuses:
            raise Expect(ReservationNotActiveError(res.id, res.status))
        if self.due(res):
            self.expire(res)
            raise Expect(ReservationNotActiveError(res.id, EXPIRED), committed=self)
        return res

    def addressed(self, done: Done) -> list[MReservation]:
        """The reservations a retry of ``done`` looks at: by id that one, by reference every
        reservation with it (the service then keeps those of the statuses it acts on)."""
        if done.target is None:
            return []
        how, what = done.target
        if how == "id":
            return [self.reservations[int(what)]]
        return [r for _, r in sorted(self.reservations.items()) if r.reference == what]


Target = tuple[str, Any] | None  # ("id", reservation id) or ("reference", Reference)


@dataclass
class Done:
    """A call that succeeded: run ``call`` again to retry it with the same key and payload."""

    call: Callable[[], Awaitable[Any]]
    result: Any
    target: Target  # the reservation(s) a release, deduct, extend or confirm addressed
    acts_on: tuple[str, ...] = (ACTIVE,)  # the statuses it acts on (release, deduct: HOLDING)


class Expect(Exception):
    """Raised by a prediction: the call must fail with ``error``. ``committed`` is the model the
    failed call leaves behind when part of it commits anyway (expiry found on the way)."""

    def __init__(self, error: StockError, committed: Model | None = None) -> None:
        super().__init__(repr(error))
        self.error = error
        self.committed = committed


# Opaque ids of transfers no run makes: a well-formed one (NotFoundError keyed by its number)
# and text that is no transfer's id at all (keyed by itself).
MISSING_TRANSFER = 10**12
NOT_AN_ID = "T-1"


def unknown_transfer_key(opaque: str) -> str:
    return str(MISSING_TRANSFER) if opaque == transfer_global_id(MISSING_TRANSFER) else opaque


def describe(exc: BaseException) -> tuple[Any, ...]:
    """An error as the comparable facts its GraphQL type exposes."""
    if isinstance(exc, LocationUnavailableError):
        return ("LocationUnavailableError", exc.location, exc.exists)
    if isinstance(exc, TransferNotOpenError):
        return ("TransferNotOpenError", exc.transfer_id, exc.status)
    if isinstance(exc, InsufficientStockError):
        return ("InsufficientStockError", tuple(exc.shortages))
    if isinstance(exc, NotFoundError):
        return ("NotFoundError", exc.entity, exc.key)
    if isinstance(exc, ValidationError):
        return ("ValidationError", exc.field)
    if isinstance(exc, ReservationNotActiveError):
        return ("ReservationNotActiveError", exc.reservation_id, exc.status)
    if isinstance(exc, VersionConflictError):
        return ("VersionConflictError", exc.expected_version, exc.actual_version)
    if isinstance(exc, IdempotencyKeyReusedError):
        return ("IdempotencyKeyReusedError", exc.idempotency_key)
    return (type(exc).__name__, str(exc))


def merge(lines: Sequence[Line]) -> list[tuple[Key, int]]:
    """Lines summed per (location, sku) and sorted, as the services merge a cart."""
    out: dict[Key, int] = {}
    for ln in lines:
        out[(ln.location, ln.sku)] = out.get((ln.location, ln.sku), 0) + ln.quantity
    return sorted(out.items())


def first_index(lines: Sequence[Line], key: Key) -> int:
    return next(i for i, ln in enumerate(lines) if (ln.location, ln.sku) == key)


def merge_skus(lines: Sequence[TL]) -> list[tuple[str, int]]:
    """Transfer or receipt lines summed per SKU and sorted."""
    out: dict[str, int] = {}
    for ln in lines:
        out[ln.sku] = out.get(ln.sku, 0) + ln.quantity
    return sorted(out.items())


def ends_of(t: MTransfer) -> list[Key]:
    """The balances a transfer moves units between."""
    return [(loc, sku) for sku in t.lines for loc in (t.source, t.destination)]


def refuse_inactive(m: Model, codes: Sequence[str]) -> None:
    """LocationUnavailableError for the first inactive one of ``codes`` (restock, reserve,
    transfer in, receipt)."""
    for code in codes:
        if m.inactive(code):
            raise Expect(LocationUnavailableError(code, True))


def check_lines(lines: Sequence[Line] | None) -> list[tuple[Key, int]]:
    if not lines:  # None where lines are required, or []: both a ValidationError on "lines"
        raise Expect(ValidationError("", "lines"))
    return merge(lines)


def shortages(m: Model, merged: list[tuple[Key, int]]) -> set[Key]:
    """Raise the InsufficientStockError a reserve or direct deduct of ``merged`` gets.

    A line found short first expires the due reservations that hold its balance (issue 9:
    expired holds never refuse a cart); that expiry commits even when the call is still
    refused. Returns the balances those expiries changed.
    """

    def short() -> list[Shortage]:
        return [
            Shortage(sku, loc, q, max(m.available((loc, sku)), 0))
            for (loc, sku), q in merged
            if m.available((loc, sku)) < q
        ]

    expired: set[Key] = set()
    lacking = {(s.location, s.sku) for s in short()}
    if lacking:
        due = [r for r in m.reservations.values() if m.due(r)]  # due ones have an expiry
        for r in sorted(due, key=lambda r: (r.expires_at, r.id)):
            if any(r.lines[k].remaining for k in lacking if k in r.lines):
                expired |= m.expire(r)
    still = short()
    if still:
        raise Expect(InsufficientStockError(still), committed=m if expired else None)
    return expired


def consume(
    m: Model,
    rows: list[MReservation],
    lines: Sequence[Line] | None,
    operation: str,
) -> tuple[list[int], set[Key]]:
    """RELEASE / DEDUCT from ACTIVE or CONFIRMED ``rows`` (oldest first); returns the ids of
    the reservations touched, in order, and the balances changed."""
    take: list[tuple[MReservation, Key, int]] = []
    if lines is None:
        for r in rows:
            take += [(r, k, ln.remaining) for k, ln in sorted(r.lines.items()) if ln.remaining]
    else:
        for key, need in merge(lines):
            held = 0
            for r in rows:
                ln = r.lines.get(key)
                if ln is None:
                    continue
                held += ln.remaining
                t = min(ln.remaining, need)
                if t > 0:
                    take.append((r, key, t))
                    need -= t
            if need > 0:
                attr = "sku" if held == 0 else "quantity"
                raise Expect(ValidationError("", f"lines.{first_index(lines, key)}.{attr}"))
    for r, key, q in take:
        if operation == "deduct":
            r.lines[key].deducted += q
            m.move(key, -q, -q)
        else:
            r.lines[key].released += q
            m.move(key, 0, -q)
    touched = [r for r in rows if any(t[0] is r for t in take)]
    for r in touched:
        if all(ln.remaining == 0 for ln in r.lines.values()):
            r.status = COMMITTED if any(ln.deducted for ln in r.lines.values()) else RELEASED
    return [r.id for r in touched], {key for _, key, _ in take}


# ---------------------------------------------------------------------------- strategies


def transfer_lines_strategy(
    skus: Sequence[str], max_quantity: int, max_size: int = 3
) -> st.SearchStrategy[list[TL]]:
    line = st.builds(TL, st.sampled_from(list(skus)), st.integers(1, max_quantity))
    return st.lists(line, min_size=1, max_size=max_size)


def lines_strategy(keys: Sequence[Key], max_quantity: int) -> st.SearchStrategy[list[Line]]:
    line = st.builds(
        lambda key, q: Line(sku=key[1], quantity=q, location=key[0]),
        st.sampled_from(list(keys)),
        st.integers(1, max_quantity),
    )
    return st.lists(line, min_size=1, max_size=3)


class FixedClock:
    """Time stands still until the machine advances it, so the model knows "now" exactly."""

    def __init__(self) -> None:
        self.now = BASE_TIME

    def __call__(self) -> datetime:
        return self.now


# ---------------------------------------------------------------------------- the machine


class StockMachine(RuleBasedStateMachine):
    """The service under test comes from :meth:`open`; after every step :meth:`violations`
    and :meth:`snapshot` must agree with the model. Subclasses give the backend."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.settings = make_settings()
        self.clock = FixedClock()
        self.org_id = f"s-{uuid.uuid4().hex[:12]}"
        self.service = self.open()
        self.model = Model()
        self.counter = 0
        self.done: dict[str, Done] = {}  # keys of calls that succeeded
        self.failed_keys: list[str] = []  # keys only failed calls used: still free

    def open(self) -> InventoryService:
        raise NotImplementedError

    async def violations(self) -> list[str]:
        raise NotImplementedError

    async def snapshot(self) -> tuple[dict[Any, Any], ...]:
        raise NotImplementedError

    async def close(self) -> None:
        await self.service.close()

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.close())
        finally:
            self.loop.close()

    # -------------------------------------------------------------- helpers

    def new_key(self, data: st.DataObject) -> str:
        if self.failed_keys and data.draw(st.booleans(), label="reuse a failed call's key"):
            return data.draw(st.sampled_from(self.failed_keys), label="key")
        self.counter += 1
        return f"key-{self.counter}"

    def attempt(
        self,
        key: str | None,
        call: Callable[[], Awaitable[Any]],
        predict: Callable[[Model], Any],
        target: Target = None,
        acts_on: tuple[str, ...] = (ACTIVE,),
    ) -> tuple[Any, Any]:
        """Predict on a copy of the model, make the call, and compare. Returns (result, info)
        on success and (None, None) on the predicted failure. ``acts_on``: the statuses of the
        reservations the call acts on (what a retry of it looks at)."""
        m = self.model.copy()
        try:
            info = predict(m)
            expected: StockError | None = None
            after = m
        except Expect as e:
            info, expected = None, e.error
            after = e.committed if e.committed is not None else self.model
        try:
            result = self.run(call())
        except StockError as exc:
            assert expected is not None, f"predicted success, got {describe(exc)}: {exc}"
            assert describe(exc) == describe(expected), exc
            self.model = after
            if key is not None and key not in self.done and key not in self.failed_keys:
                self.failed_keys.append(key)
            return None, None
        assert expected is None, f"predicted {describe(expected)}, the call succeeded"
        assert not result.replayed, f"key {key!r} was replayed, it should have been free"
        self.model = after
        if key is not None:
            if key in self.failed_keys:
                self.failed_keys.remove(key)
            self.done[key] = Done(call, result, target, acts_on)
        return result, info

    def check_balances(self, records: Sequence[Any], keys: Sequence[Key]) -> None:
        got = sorted(
            (b.location, b.sku, b.on_hand, b.reserved, b.version, b.incoming) for b in records
        )
        want = []
        incoming = self.model.incoming()
        for loc, sku in sorted(set(keys)):
            b = self.model.balances[(loc, sku)]
            want.append((loc, sku, b.on_hand, b.reserved, b.version, incoming.get((loc, sku), 0)))
        assert got == want, (got, want)

    def check_reservation(self, record: Any) -> None:
        r = self.model.reservations[record.id]
        assert (record.status, record.reference, record.expires_at) == (
            r.status,
            r.reference,
            r.expires_at,
        )
        if record.lines is not None:
            assert {
                (ln.location, ln.sku): (ln.quantity, ln.deducted, ln.released)
                for ln in record.lines
            } == {k: (ln.quantity, ln.deducted, ln.released) for k, ln in r.lines.items()}

    def check_transfer(self, record: Any) -> None:
        t = self.model.transfers[record.id]
        assert (
            record.status,
            record.from_location,
            record.to_location,
            record.reference,
            record.reason,
        ) == (t.status, t.source, t.destination, t.reference, t.reason)
        assert [(ln.sku, ln.quantity, ln.received, ln.returned) for ln in record.lines] == [
            (sku, ln.quantity, ln.received, ln.returned) for sku, ln in sorted(t.lines.items())
        ]

    def check_location(self, record: Any) -> None:
        loc = self.model.locations[record.code]
        assert (record.name, record.type, record.active) == (loc.name, loc.type, loc.active)

    def check_moves(
        self,
        result: Any,
        moves: list[tuple[str, str, str, int]],
        keys: Sequence[Key],
        may_show: Sequence[Key] = (),
    ) -> None:
        """A transfer call's entries (event, location, sku, units) and balances: ``keys``,
        and maybe some of ``may_show``."""
        self.check_transfer(result.transfer)
        assert [
            (e.event_type, e.location, e.sku, e.on_hand_delta, e.reserved_delta, e.transfer_id)
            for e in result.ledger_entries
        ] == [(*mv, 0, result.transfer.id) for mv in moves]
        shown = {(b.location, b.sku) for b in result.balances}
        assert set(keys) <= shown <= set(keys) | set(may_show), (shown, keys)
        self.check_balances(result.balances, sorted(shown))

    def pick_transfer(self, data: st.DataObject) -> str:
        """Mostly an open transfer's opaque id, else any transfer's, else one naming none."""
        ids = sorted(self.model.transfers)
        open_ = [i for i in ids if self.model.transfers[i].status in OPEN]
        pool = data.draw(st.integers(0, 19), label="which kind of transfer id")
        if open_ and pool < 13:
            return transfer_global_id(data.draw(st.sampled_from(open_), label="open transfer"))
        if ids and pool < 18:
            return transfer_global_id(data.draw(st.sampled_from(ids), label="known transfer"))
        missing = [transfer_global_id(MISSING_TRANSFER), NOT_AN_ID]
        return data.draw(st.sampled_from(missing), label="unknown transfer")

    def pick_reservation(self, data: st.DataObject) -> int | str:
        ids = sorted(self.model.reservations)
        active = [i for i in ids if self.model.reservations[i].status in HOLDING]
        missing = max(ids, default=0) + 10**9  # no reservation of this org has it
        pool = data.draw(st.integers(0, 19), label="which kind of id")
        if active and pool < 13:
            rid: int | str = data.draw(st.sampled_from(active), label="holding id")
        elif ids and pool < 18:
            rid = data.draw(st.sampled_from(ids), label="known id")
        else:
            rid = data.draw(st.sampled_from([missing, "R-1"]), label="unknown id")
        if isinstance(rid, int) and data.draw(st.booleans(), label="id as string"):
            return str(rid)  # a GraphQL ID
        return rid

    def pick_reference(self, data: st.DataObject, statuses: tuple[str, ...]) -> Reference:
        """Mostly a reference some reservation of ``statuses`` has, else any."""
        held = sorted(
            {r.reference for r in self.model.reservations.values() if r.status in statuses}
            - {None},
            key=str,
        )
        if held and data.draw(st.integers(0, 9), label="held reference") < 8:
            ref: Reference = data.draw(st.sampled_from(held), label="reference")
        else:
            ref = data.draw(st.sampled_from(REFS), label="reference")
        return ref

    # -------------------------------------------------------------- rules

    @initialize(
        data=st.data(),
        stock=st.lists(st.integers(0, 12), min_size=len(INITIAL_KEYS), max_size=len(INITIAL_KEYS)),
        carts=st.integers(0, 3),
    )
    def initial_stock(self, data: st.DataObject, stock: list[int], carts: int) -> None:
        """Some stock and a few carts to start from (a run may start from nothing)."""
        lines = [Line(sku, q, loc) for (loc, sku), q in zip(INITIAL_KEYS, stock, strict=True) if q]
        if lines:
            self.restock_lines("init", lines, None, None)
        for _ in range(carts):
            self.reserve(data, data.draw(lines_strategy(DRAWN_KEYS, 3), label="cart"))

    @rule(data=st.data(), lines=lines_strategy(DRAWN_KEYS, 10))
    def restock(self, data: st.DataObject, lines: list[Line]) -> None:
        ref = data.draw(st.none() | st.sampled_from(REFS), label="reference")
        reason = data.draw(st.none() | st.just("delivery"), label="reason")
        self.restock_lines(self.new_key(data), lines, ref, reason)

    def restock_lines(
        self, key: str, lines: list[Line], ref: Reference | None, reason: str | None
    ) -> None:
        merged = merge(lines)

        def predict(m: Model) -> None:
            codes = list(dict.fromkeys(loc for (loc, _), _ in merged))
            refuse_inactive(m, codes)
            for code in codes:
                m.register(code)
            for k, q in merged:
                m.move(k, q, 0)

        result, _ = self.attempt(
            key,
            lambda: self.service.restock(key, lines, reference=ref, reason=reason),
            predict,
        )
        if result is None:
            return
        self.check_balances(result.balances, [k for k, _ in merged])
        assert [(e.location, e.sku, e.on_hand_delta) for e in result.ledger_entries] == [
            (loc, sku, q) for (loc, sku), q in merged
        ]

    @rule(
        data=st.data(),
        key=st.sampled_from(DRAWN_KEYS),
        delta=st.none() | st.integers(-6, 6),
        set_to=st.integers(0, 12),
        version=st.sampled_from(["none", "current", "wrong"]),
    )
    def adjust(
        self, data: st.DataObject, key: Key, delta: int | None, set_to: int, version: str
    ) -> None:
        current = self.model.balances.get(key, MBalance()).version
        expected_version = {
            "none": None,
            "current": current,
            "wrong": current + data.draw(st.sampled_from([-1, 1, 2]), label="version skew"),
        }[version]
        set_on_hand = set_to if delta is None else None
        ikey = self.new_key(data)

        def predict(m: Model) -> None:
            if expected_version is not None and expected_version < 0:
                raise Expect(ValidationError("", "expectedVersion"))
            bal = m.balances.get(key, MBalance())
            if expected_version is not None and expected_version != bal.version:
                raise Expect(VersionConflictError(expected_version, bal.version))
            d = delta if delta is not None else set_to - bal.on_hand
            if bal.on_hand + d < bal.reserved:
                raise Expect(
                    InsufficientStockError(
                        [Shortage(key[1], key[0], -d, bal.on_hand - bal.reserved)]
                    )
                )
            m.register(key[0])  # allowed at an inactive location
            m.move(key, d, 0)

        result, _ = self.attempt(
            ikey,
            lambda: self.service.adjust(
                ikey,
                key[1],
                key[0],
                delta=delta,
                set_on_hand=set_on_hand,
                expected_version=expected_version,
                reason="cycle count",
            ),
            predict,
        )
        if result is not None:
            self.check_balances([result.balance], [key])

    @rule(data=st.data(), lines=lines_strategy(DRAWN_KEYS, 3))
    def reserve(self, data: st.DataObject, lines: list[Line]) -> None:
        # mostly the same reference, so by-reference calls find several reservations
        ref = data.draw(st.sampled_from([None, REFS[0], REFS[0], REFS[1]]), label="reference")
        ttl = data.draw(st.sampled_from([None, *TTLS]), label="ttl")
        key = self.new_key(data)
        merged = merge(lines)

        def predict(m: Model) -> tuple[MReservation, set[Key]]:
            refuse_inactive(m, list(dict.fromkeys(loc for (loc, _), _ in merged)))
            expired = shortages(m, merged)
            for k, q in merged:
                m.move(k, 0, q)
            made = MReservation(
                id=0,
                reference=ref,
                expires_at=m.now + timedelta(seconds=DEFAULT_TTL if ttl is None else ttl),
                created_at=m.now,
                lines={k: MLine(q) for k, q in merged},
            )
            return made, expired

        result, info = self.attempt(
            key,
            lambda: self.service.reserve(key, lines, reference=ref, ttl_seconds=ttl),
            predict,
        )
        if result is None:
            return
        res, _ = info
        rid = result.reservation.id
        # ids grow, so "oldest first" (created_at, then id) is id order in the model
        assert rid > max(self.model.reservations, default=0)
        res.id = rid
        self.model.reservations[rid] = res
        self.check_reservation(result.reservation)
        # the cart's balances only, also when it expired others' holds on the way
        self.check_balances(result.balances, [k for k, _ in merged])

    def consume_lines(self, data: st.DataObject, keys: Sequence[Key]) -> list[Line] | None:
        kind = data.draw(st.sampled_from(["all"] * 4 + ["lines"] * 3 + ["empty"]), label="lines")
        if kind == "all":
            return None
        if kind == "empty":
            return []
        pool = sorted(set(keys)) + [data.draw(st.sampled_from(KEYS), label="other key")]
        return data.draw(lines_strategy(pool, 3), label="lines")

    @rule(
        data=st.data(),
        operation=st.sampled_from(["release", "deduct"]),
        by=st.sampled_from(["id", "reference"]),
    )
    def consume(self, data: st.DataObject, operation: str, by: str) -> None:
        """RELEASE or DEDUCT by reservation id or by reference, all remaining or some lines."""
        held = any(r.reference for r in self.model.reservations.values() if r.status in HOLDING)
        if self.model.reservations and (by == "id" or not held):
            self.consume_by_id(data, operation)
        else:
            self.consume_by_reference(data, operation)

    def consume_by_id(self, data: st.DataObject, operation: str) -> None:
        rid = self.pick_reservation(data)
        known = self.model.reservations.get(int(rid)) if str(rid).isdigit() else None
        lines = self.consume_lines(data, list(known.lines) if known else [])
        key = self.new_key(data)

        def predict(m: Model) -> tuple[list[int], set[Key], set[Key]]:
            if lines == []:
                raise Expect(ValidationError("", "lines"))
            res = m.by_id(rid, HOLDING)
            return (*consume(m, [res], lines, operation), set())

        method = getattr(self.service, operation)
        result, info = self.attempt(
            key,
            lambda: method(key, reservation_id=rid, lines=lines),
            predict,
            ("id", rid),
            HOLDING,
        )
        if result is not None:
            self.check_consumed(result, *info, operation)

    def consume_by_reference(self, data: st.DataObject, operation: str) -> None:
        ref = self.pick_reference(data, HOLDING)
        keys = [k for r in self.model.reservations.values() if r.reference == ref for k in r.lines]
        lines = self.consume_lines(data, keys)
        key = self.new_key(data)

        def predict(m: Model) -> tuple[list[int], set[Key], set[Key]]:
            if lines == []:
                raise Expect(ValidationError("", "lines"))
            rows = [
                r
                for _, r in sorted(m.reservations.items())
                if r.reference == ref and r.status in HOLDING
            ]
            if not rows:
                raise Expect(NotFoundError("Reservation", str(ref)))
            expired = set()  # past-due reservations found on the way are expired first
            for r in rows:
                if m.due(r):
                    expired |= m.expire(r)
            holding = [r for r in rows if r.status in HOLDING]
            if not holding:
                raise Expect(NotFoundError("Reservation", str(ref)), committed=m)
            return (*consume(m, holding, lines, operation), expired)

        method = getattr(self.service, operation)
        result, info = self.attempt(
            key,
            lambda: method(key, reference=ref, lines=lines),
            predict,
            ("reference", ref),
            HOLDING,
        )
        if result is not None:
            self.check_consumed(result, *info, operation)

    def check_consumed(
        self,
        result: Any,
        touched: list[int],
        consumed: set[Key],
        expired: set[Key],
        operation: str,
    ) -> None:
        assert [r.id for r in result.reservations] == touched
        for record in result.reservations:
            self.check_reservation(record)
        changed = [(b.location, b.sku) for b in result.balances]
        # every balance released / deducted; may include those only its expiry changed
        assert consumed <= set(changed) <= consumed | expired
        self.check_balances(result.balances, changed)
        if operation == "deduct":
            assert all(e.event_type == "DEDUCT" for e in result.ledger_entries)
            assert {e.reservation_id for e in result.ledger_entries} == set(touched)

    @rule(data=st.data())
    def deduct_direct(self, data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(["lines"] * 4 + ["none", "empty"]), label="lines")
        lines: list[Line] | None = None if kind == "none" else []
        if kind == "lines":
            lines = data.draw(lines_strategy(DRAWN_KEYS, 4), label="lines")
        key = self.new_key(data)

        def predict(m: Model) -> tuple[list[tuple[Key, int]], set[Key]]:
            merged = check_lines(lines)
            expired = shortages(m, merged)
            for k, q in merged:
                m.move(k, -q, 0)
            return merged, expired

        result, info = self.attempt(key, lambda: self.service.deduct(key, lines=lines), predict)
        if result is not None:
            merged, _ = info
            assert result.reservations == []
            self.check_balances(result.balances, [k for k, _ in merged])
            assert [(e.location, e.sku, e.on_hand_delta) for e in result.ledger_entries] == [
                (loc, sku, -q) for (loc, sku), q in merged
            ]

    @precondition(lambda self: self.model.reservations)
    @rule(data=st.data(), ttl=st.sampled_from([*TTLS, *TTLS, 0, MAX_TTL + 1]))
    def extend(self, data: st.DataObject, ttl: int) -> None:
        rid = self.pick_reservation(data)
        key = self.new_key(data)

        def predict(m: Model) -> None:
            if not 1 <= ttl <= MAX_TTL:
                raise Expect(ValidationError("", "ttlSeconds"))
            res = m.by_id(rid, (ACTIVE,))
            res.expires_at = m.now + timedelta(seconds=ttl)

        result, _ = self.attempt(
            key, lambda: self.service.extend_reservation(key, rid, ttl), predict, ("id", rid)
        )
        if result is not None:
            self.check_reservation(result.reservation)

    @precondition(lambda self: self.model.reservations)
    @rule(data=st.data(), by=st.sampled_from(["id", "id", "reference"]))
    def confirm(self, data: st.DataObject, by: str) -> None:
        """CONFIRM (section 14): ACTIVE reservations keep their lines and lose their expiry,
        with no ledger entry and no change to any balance; by reference every ACTIVE one with
        it. A past-due one is expired instead, as a release or deduct would."""
        key = self.new_key(data)
        if by == "id":
            rid = self.pick_reservation(data)

            def predict(m: Model) -> tuple[list[MReservation], set[Key]]:
                res = m.by_id(rid, (ACTIVE,))
                res.status, res.expires_at = CONFIRMED, None
                return [res], set()

            call: Callable[[], Awaitable[Any]] = lambda: self.service.confirm_reservation(  # noqa: E731
                key, reservation_id=rid
            )
            target: Target = ("id", rid)
        else:
            ref = self.pick_reference(data, (ACTIVE,))

            def predict(m: Model) -> tuple[list[MReservation], set[Key]]:
                rows = [
                    r
                    for _, r in sorted(m.reservations.items())
                    if r.reference == ref and r.status == ACTIVE
                ]
                if not rows:
                    raise Expect(NotFoundError("Reservation", str(ref)))
                expired: set[Key] = set()  # past-due ones found on the way are expired first
                for r in rows:
                    if m.due(r):
                        expired |= m.expire(r)
                active = [r for r in rows if r.status == ACTIVE]
                if not active:
                    raise Expect(NotFoundError("Reservation", str(ref)), committed=m)
                for r in active:
                    r.status, r.expires_at = CONFIRMED, None
                return active, expired

            call = lambda: self.service.confirm_reservation(key, reference=ref)  # noqa: E731
            target = ("reference", ref)
        result, info = self.attempt(key, call, predict, target)
        if result is not None:
            confirmed, expired = info
            assert [r.id for r in result.reservations] == [r.id for r in confirmed]
            for record in result.reservations:
                self.check_reservation(record)
            # the balances it holds, unchanged; may include those only an expiry changed
            held = {k for r in confirmed for k in r.lines}
            changed = [(b.location, b.sku) for b in result.balances]
            assert held <= set(changed) <= held | expired
            self.check_balances(result.balances, changed)

    # -------------------------------------------------------------- locations and transfers

    @rule(
        data=st.data(),
        source=st.sampled_from(LOCATIONS),
        lines=transfer_lines_strategy(SKUS, 4),
        in_transit=st.sampled_from([True, True, False]),
    )
    def transfer(self, data: st.DataObject, source: str, lines: list[TL], in_transit: bool) -> None:
        """TRANSFER (section 14): available >= q at the source for every line (due holds there
        expired first, as for a reserve), else nothing; the destination must be active (an
        unknown one is registered). Immediate: RECEIVED; in transit: IN_TRANSIT, the
        destination balance created with nothing on hand if missing."""
        others = [loc for loc in LOCATIONS if loc != source]
        dest = data.draw(st.sampled_from([*others, *others, source]), label="destination")
        ref = data.draw(st.none() | st.sampled_from(REFS), label="reference")
        reason = data.draw(st.none() | st.just("rebalance"), label="reason")
        key = self.new_key(data)
        merged = merge_skus(lines)

        def predict(m: Model) -> tuple[MTransfer, set[Key]]:
            if dest == source:
                raise Expect(ValidationError("", "toLocation"))
            refuse_inactive(m, [dest])  # the source may be inactive: units can leave
            expired = shortages(m, [((source, sku), q) for sku, q in merged])
            m.register(dest)
            made = MTransfer(
                0,
                IN_TRANSIT,
                source,
                dest,
                {sku: MTransferLine(q) for sku, q in merged},
                ref,
                reason,
            )
            for sku, q in merged:
                m.shift((source, sku), -q)
            for sku, q in merged:
                if in_transit:
                    m.balances.setdefault((dest, sku), MBalance())  # no entry, version 0
                else:
                    m.shift((dest, sku), q)
                    made.lines[sku].received = q
            if not in_transit:
                made.status = RECEIVED
            return made, expired

        existed = set(self.model.balances)
        result, info = self.attempt(
            key,
            lambda: self.service.transfer(
                key, source, dest, lines, in_transit=in_transit, reference=ref, reason=reason
            ),
            predict,
        )
        if result is None:
            return
        made, _ = info
        assert result.transfer.id > max(self.model.transfers, default=0)
        made.id = result.transfer.id
        self.model.transfers[made.id] = made
        moves = [("TRANSFER_OUT", source, sku, -q) for sku, q in merged]
        if not in_transit:
            moves += [("TRANSFER_IN", dest, sku, q) for sku, q in merged]
        # The balances it moves units between, not those only a hold it expired on the way
        # changed. An in-transit destination balance that already existed (it changes only
        # its derived incoming) is left out of a fresh result, but listed by its replay.
        ends = [(loc, sku) for sku, _ in merged for loc in (source, dest)]
        listed = [k for k in ends if not in_transit or k[0] == source or k not in existed]
        self.check_moves(result, moves, listed, may_show=ends)

    @precondition(lambda self: self.model.transfers)
    @rule(data=st.data(), kind=st.sampled_from(["all"] * 3 + ["lines"] * 4 + ["empty"]))
    def receive(self, data: st.DataObject, kind: str) -> None:
        """RECEIVE: all remaining, or given lines (summed per SKU, at most each line's
        remaining); PARTIALLY_RECEIVED until nothing remains, then RECEIVED."""
        opaque = self.pick_transfer(data)
        lines: list[TL] | None = None if kind == "all" else []
        if kind == "lines":
            known = next(
                (t for t in self.model.transfers.values() if transfer_global_id(t.id) == opaque),
                None,
            )
            pool = sorted(known.lines) * 3 if known else []
            pool.append(data.draw(st.sampled_from(SKUS), label="other sku"))
            lines = data.draw(transfer_lines_strategy(pool, 3, 2), label="receipt lines")
        key = self.new_key(data)

        def predict(m: Model) -> tuple[MTransfer, list[tuple[str, int]]]:
            if lines == []:
                raise Expect(ValidationError("", "lines"))
            t = m.open_transfer(opaque)
            refuse_inactive(m, [t.destination])
            if lines is None:
                wanted = [
                    (sku, ln.remaining) for sku, ln in sorted(t.lines.items()) if ln.remaining
                ]
            else:
                wanted = merge_skus(lines)
                for sku, q in wanted:
                    at = next(i for i, ln in enumerate(lines) if ln.sku == sku)
                    if sku not in t.lines:
                        raise Expect(ValidationError("", f"lines.{at}.sku"))
                    if q > t.lines[sku].remaining:
                        raise Expect(ValidationError("", f"lines.{at}.quantity"))
            for sku, q in wanted:
                m.shift((t.destination, sku), q)
                t.lines[sku].received += q
            done = all(ln.remaining == 0 for ln in t.lines.values())
            t.status = RECEIVED if done else PARTIALLY_RECEIVED
            return t, wanted

        result, info = self.attempt(
            key, lambda: self.service.receive_transfer(key, opaque, lines), predict
        )
        if result is not None:
            t, wanted = info
            moves = [("TRANSFER_IN", t.destination, sku, q) for sku, q in wanted]
            self.check_moves(result, moves, [(t.destination, sku) for sku, _ in wanted], ends_of(t))

    @precondition(lambda self: self.model.transfers)
    @rule(data=st.data(), reason=st.sampled_from(["truck broke down", "not needed"]))
    def cancel(self, data: st.DataObject, reason: str) -> None:
        """CANCEL: every unit still in transit goes back to the source (active or not)."""
        opaque = self.pick_transfer(data)
        key = self.new_key(data)

        def predict(m: Model) -> tuple[MTransfer, list[tuple[str, int]]]:
            t = m.open_transfer(opaque)
            back = [(sku, ln.remaining) for sku, ln in sorted(t.lines.items()) if ln.remaining]
            for sku, q in back:
                m.shift((t.source, sku), q)
                t.lines[sku].returned += q
            t.status = CANCELLED
            return t, back

        result, info = self.attempt(
            key, lambda: self.service.cancel_transfer(key, opaque, reason), predict
        )
        if result is not None:
            t, back = info
            moves = [("TRANSFER_IN", t.source, sku, q) for sku, q in back]
            # may list the destination too, whose incoming (a derived figure) it lowers
            self.check_moves(result, moves, [(t.source, sku) for sku, _ in back], ends_of(t))

    @rule(data=st.data(), code=st.sampled_from([*LOCATIONS, *LOCATIONS, *LOCATIONS, UNREGISTERED]))
    def manage_location(self, data: st.DataObject, code: str) -> None:
        """Deactivate, reactivate or rename a location (NotFoundError when not registered),
        or register one (a ValidationError on code when it exists)."""
        key = self.new_key(data)
        if data.draw(st.integers(0, 4), label="create") == 0:
            name = data.draw(st.sampled_from(["Main", "Back room"]), label="name")
            kind = data.draw(st.sampled_from(LOCATION_TYPES), label="type")

            def predict(m: Model) -> None:
                if code in m.locations:
                    raise Expect(ValidationError("", "code"))
                m.locations[code] = MLocation(name, kind)

            call: Callable[[], Awaitable[Any]] = lambda: self.service.create_location(  # noqa: E731
                key, code, name, kind
            )
        else:
            active = data.draw(st.sampled_from([False, True, True, None]), label="active")
            name_or_none = None if active is not None else "Renamed"

            def predict(m: Model) -> None:
                loc = m.locations.get(code)
                if loc is None:
                    raise Expect(NotFoundError("Location", code))
                if active is not None:
                    loc.active = active
                if name_or_none is not None:
                    loc.name = name_or_none

            call = lambda: self.service.update_location(  # noqa: E731
                key, code, name=name_or_none, active=active
            )
        result, _ = self.attempt(key, call, predict)
        if result is not None:
            assert result.location.code == code
            self.check_location(result.location)

    @rule(seconds=st.sampled_from(ADVANCES))
    def advance_clock(self, seconds: float) -> None:
        self.clock.now += timedelta(seconds=seconds)
        self.model.now = self.clock.now

    @rule(data=st.data(), sweep=st.booleans())
    def expire(self, data: st.DataObject, sweep: bool) -> None:
        """The sweeper's database scan (expire_due), or one reservation (expire_reservation)."""
        if sweep:
            self.expire_due()
        else:
            self.expire_one(data)

    def expire_due(self) -> None:
        m = self.model.copy()
        due = [r for r in m.reservations.values() if m.due(r)]
        for r in due:
            m.expire(r)
        got = self.run(self.service.expire_due())
        assert sorted(got) == sorted(r.id for r in due)
        when = [self.model.reservations[i].expires_at for i in got]
        assert when == sorted(when), "soonest first"
        self.model = m

    def expire_one(self, data: st.DataObject) -> None:
        rid = data.draw(
            st.sampled_from([*sorted(self.model.reservations), 10**12]), label="reservation id"
        )
        m = self.model.copy()
        res = m.reservations.get(rid)
        record = self.run(self.service.expire_reservation(rid))
        if res is not None and m.due(res):
            m.expire(res)
            self.model = m
            assert record is not None
            self.check_reservation(record)
        else:
            assert record is None

    @precondition(lambda self: self.done)
    @rule(data=st.data(), same_payload=st.booleans(), late=st.booleans())
    def retry_key(self, data: st.DataObject, same_payload: bool, late: bool) -> None:
        """A client retries a done key: same payload (``late``: once the reservation it acted
        on is due, not yet swept), or another payload."""
        if same_payload:
            self.replay(data, late)
        else:
            self.reuse_key(data)

    def replay(self, data: st.DataObject, late: bool) -> None:
        """The same key and payload again: replayed, its effects are not applied again.

        A release, deduct or extend retried once what it addresses is past due (not yet swept)
        still replays; like any call that finds a past-due reservation it expires it, and
        that expiry commits when nothing ACTIVE is left to act on (section 11, "Expiry").
        """
        m = self.model.copy()
        held = sorted(
            k for k, d in self.done.items() if any(r.status == ACTIVE for r in m.addressed(d))
        )
        if late and held:
            # The retry arrives exactly when a reservation it addresses falls due
            # (now >= expires_at), before any sweep.
            key = data.draw(st.sampled_from(held), label="done key")
            due_at = min(r.expires_at for r in m.addressed(self.done[key]) if r.status == ACTIVE)
            self.clock.now = m.now = self.model.now = max(m.now, due_at)
        else:
            key = data.draw(st.sampled_from(sorted(self.done)), label="done key")
        done = self.done[key]
        # What a fresh call would be refused after expiring: every reservation it would act
        # on past due. A CONFIRMED one a release or deduct acts on is never due.
        rows = [r for r in m.addressed(done) if r.status in done.acts_on]
        if rows and all(m.due(r) for r in rows):
            for r in rows:
                m.expire(r)
        again = self.run(done.call())
        self.model = m
        first = done.result
        assert again.replayed
        if hasattr(first, "reservation"):
            assert again.reservation.id == first.reservation.id
        if hasattr(first, "reservations"):
            assert [r.id for r in again.reservations] == [r.id for r in first.reservations]
        if hasattr(first, "transfer"):  # its current state, and the entries it wrote then
            assert again.transfer.id == first.transfer.id
            self.check_transfer(again.transfer)
            assert [e.id for e in again.ledger_entries] == [e.id for e in first.ledger_entries]
            keys = [(b.location, b.sku) for b in again.balances]
            t = again.transfer
            ends = {(loc, ln.sku) for ln in t.lines for loc in (t.from_location, t.to_location)}
            if any(e.event_type == "TRANSFER_OUT" for e in first.ledger_entries):
                assert set(keys) == ends  # a transfer's both ends
            else:  # what its entries changed, maybe the other end's incoming too
                assert {(e.location, e.sku) for e in first.ledger_entries} <= set(keys) <= ends
            self.check_balances(again.balances, keys)
        if hasattr(first, "location"):
            assert again.location.code == first.location.code
            self.check_location(again.location)

    def reuse_key(self, data: st.DataObject) -> None:
        """A done key with another operation or payload: refused, nothing changes. The probe
        is valid, and would change stock under a free key (no rule sends its payload)."""
        key = data.draw(st.sampled_from(sorted(self.done)), label="done key")
        opaque = transfer_global_id(max(self.model.transfers, default=MISSING_TRANSFER))
        probes: dict[str, Callable[[], Awaitable[Any]]] = {
            "adjust": lambda: self.service.adjust(
                key, "SKU-1", "WH-1", delta=1, reason="key probe"
            ),
            "transfer": lambda: self.service.transfer(
                key, "WH-1", "WH-2", [TL("SKU-1", 1)], reason="key probe"
            ),
            "receive": lambda: self.service.receive_transfer(key, opaque, [TL("probe", 1)]),
            "cancel": lambda: self.service.cancel_transfer(key, opaque, "key probe"),
            "location": lambda: self.service.update_location(key, "WH-1", name="key probe"),
        }
        probe = data.draw(st.sampled_from(sorted(probes)), label="probe")
        with pytest.raises(IdempotencyKeyReusedError) as info:
            self.run(probes[probe]())
        assert info.value.idempotency_key == key

    # -------------------------------------------------------------- after every step

    @invariant()
    def database_agrees_with_model(self) -> None:
        violations = self.run(self.violations())
        assert violations == []
        snap = self.run(self.snapshot())
        balances, entries, reservations, lines = snap[:4]
        incoming, locations, transfers, transfer_lines = snap[4:]
        self.check_conservation(balances, transfers, transfer_lines)
        m = self.model
        assert balances == {k: (b.on_hand, b.reserved, b.version) for k, b in m.balances.items()}
        assert entries == {k: b.entries for k, b in m.balances.items() if b.entries}
        assert reservations == {
            r.id: (r.status, r.reference, r.expires_at, r.created_at)
            for r in m.reservations.values()
        }
        assert lines == {
            (r.id, *k): (ln.quantity, ln.deducted, ln.released)
            for r in m.reservations.values()
            for k, ln in r.lines.items()
        }
        assert incoming == m.incoming()
        assert locations == {c: (loc.name, loc.type, loc.active) for c, loc in m.locations.items()}
        assert transfers == {
            t.id: (t.status, t.source, t.destination, t.reference, t.reason)
            for t in m.transfers.values()
        }
        assert transfer_lines == {
            (t.id, sku): (ln.quantity, ln.received, ln.returned)
            for t in m.transfers.values()
            for sku, ln in t.lines.items()
        }

    def check_conservation(
        self,
        balances: dict[Key, tuple[int, int, int]],
        transfers: dict[int, tuple[Any, ...]],
        transfer_lines: dict[tuple[int, str], tuple[int, int, int]],
    ) -> None:
        """Section 14, per SKU: on hand over all locations + in transit = restocks - deducts
        + adjusts, as the model tallied them (the model's own figures, then the service's)."""
        m = self.model
        away: dict[str, int] = {}
        for (tid, sku), (q, received, returned) in transfer_lines.items():
            if transfers[tid][0] in OPEN:
                away[sku] = away.get(sku, 0) + q - received - returned
        for sku in sorted(set(m.made) | {sku for _, sku in balances} | set(away)):
            here = sum(b.on_hand for (_, s), b in m.balances.items() if s == sku)
            assert here + m.in_transit().get(sku, 0) == m.made.get(sku, 0), sku
            db_here = sum(on_hand for (_, s), (on_hand, _, _) in balances.items() if s == sku)
            assert db_here + away.get(sku, 0) == m.made.get(sku, 0), (sku, db_here, away)


class DatabaseMachine(StockMachine):
    """The service on a real database; set ``new_url`` (returns a migrated database URL)."""

    new_url: Callable[[], str]

    def open(self) -> InventoryService:
        self.url = type(self).new_url()
        self.db = create_database(self.settings, self.url)
        return InventoryService(self.db, self.settings, clock=self.clock, org_id=self.org_id)

    async def close(self) -> None:
        try:
            await super().close()
            await self.db.dispose()
        finally:
            if self.url.startswith("sqlite"):
                shutil.rmtree(Path(self.url.split("///", 1)[1]).parent, ignore_errors=True)

    async def violations(self) -> list[str]:
        return await find_violations(self.db, self.org_id)

    async def snapshot(self) -> tuple[dict[Any, Any], ...]:
        org = self.org_id
        async with self.db.read() as conn:
            balances, incoming = {}, {}
            for r in await conn.execute(select(B).where(B.c.org_id == org)):
                balances[(r.location, r.sku)] = (r.on_hand, r.reserved, r.version)
                incoming[(r.location, r.sku)] = r.incoming  # Balance.incoming, kept by the rules
            entries = {
                (r.location, r.sku): r.n
                for r in await conn.execute(
                    select(L.c.location, L.c.sku, func.count().label("n"))
                    .where(L.c.org_id == org)
                    .group_by(L.c.location, L.c.sku)
                )
            }
            reservations = {
                r.id: (
                    r.status,
                    None if r.ref_type is None else Reference(r.ref_type, r.ref_id),
                    None if r.expires_at is None else r.expires_at.replace(tzinfo=UTC),
                    r.created_at.replace(tzinfo=UTC),
                )
                for r in await conn.execute(select(R).where(R.c.org_id == org))
            }
            lines = {
                (r.reservation_id, r.location, r.sku): (r.quantity, r.deducted, r.released)
                for r in await conn.execute(select(RL).where(RL.c.org_id == org))
            }
            locations = {
                r.code: (r.name, r.type, bool(r.active))
                for r in await conn.execute(select(LOC).where(LOC.c.org_id == org))
            }
            transfers, transfer_lines = {}, {}  # one query: each transfer with its lines
            for r in await conn.execute(
                select(TR, TLN.c.sku, TLN.c.quantity, TLN.c.received, TLN.c.returned)
                .outerjoin(TLN, (TLN.c.transfer_id == TR.c.id) & (TLN.c.org_id == TR.c.org_id))
                .where(TR.c.org_id == org)
            ):
                ref = None if r.ref_type is None else Reference(r.ref_type, r.ref_id)
                transfers[r.id] = (r.status, r.from_location, r.to_location, ref, r.reason)
                if r.sku is not None:
                    transfer_lines[(r.id, r.sku)] = (r.quantity, r.received, r.returned)
        incoming = {k: units for k, units in incoming.items() if units}
        return (
            balances,
            entries,
            reservations,
            lines,
            incoming,
            locations,
            transfers,
            transfer_lines,
        )


# ---------------------------------------------------------------------------- the tests

# STOCKLEDGER_STATEFUL_EXAMPLES raises the number of runs (e.g. nightly); 40 keeps each
# backend under a minute.
RUN_SETTINGS = hypothesis.settings(
    max_examples=int(os.environ.get("STOCKLEDGER_STATEFUL_EXAMPLES", "40")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def machine_on(new_url: Callable[[], str]) -> type[StockMachine]:
    return type("StockMachineRun", (DatabaseMachine,), {"new_url": staticmethod(new_url)})


def test_stateful_sqlite(sqlite_template: Path) -> None:
    def new_url() -> str:
        path = Path(tempfile.mkdtemp(prefix="stateful-")) / "stockledger.sqlite3"
        shutil.copy(sqlite_template, path)
        return f"sqlite+aiosqlite:///{path}"

    run_state_machine_as_test(machine_on(new_url), settings=RUN_SETTINGS)


def test_stateful_mysql(mysql_url: str) -> None:
    # the migrated test database; each machine run works in a fresh org_id
    run_state_machine_as_test(machine_on(lambda: mysql_url), settings=RUN_SETTINGS)
