"""Locations and transfers (ARCHITECTURE sections 3 and 14) on the pure domain core, no I/O.

Each test builds a :class:`Stock` (balances, reservations, locations, transfers) from plain
values, decides one command at a fixed time with ``rules.decide`` and checks the returned
:class:`Changes` or :class:`Refusal` with exact values. Every decision goes through
:func:`decide`, which also checks that ``decide`` leaves the stock it is given as it was.

The last test is a property: over random sequences of commands across three locations and two
SKUs, on hand plus what is in transit is conserved, computed from an independent tally.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck
from hypothesis import strategies as st

from stockledger.domain import rules
from stockledger.domain.commands import (
    Adjust,
    CancelTransfer,
    CreateLocation,
    Deduct,
    DeductDirect,
    ReceiveTransfer,
    Release,
    Reserve,
    Restock,
    TransferStock,
    UpdateLocation,
)
from stockledger.domain.errors import (
    InsufficientStockError,
    LocationUnavailableError,
    NotFoundError,
    Shortage,
    StockError,
    TransferNotOpenError,
    ValidationError,
)
from stockledger.domain.ids import global_id, reservation_global_id, transfer_global_id
from stockledger.domain.model import (
    ACTIVE,
    CANCELLED,
    EXPIRED,
    IN_TRANSIT,
    PARTIALLY_RECEIVED,
    RECEIVED,
    STORE,
    VIRTUAL,
    WAREHOUSE,
    Balance,
    LedgerEntry,
    Line,
    Location,
    Reference,
    Reservation,
    ReservationLine,
    Transfer,
    TransferLine,
)
from stockledger.domain.state import Changes, KeyRow, Refusal, Stock
from stockledger.domain.validation import MAX_BALANCE
from unit.fakes import with_derived

NOW = datetime(2030, 6, 1, 8, 0, 0, 123_457, tzinfo=UTC)
EARLIER = NOW - timedelta(hours=1)
LATER = NOW + timedelta(minutes=30)
DEFAULT_TTL = 1800
MAX_TTL = 7 * 24 * 3600
NEW_RID = 100  # the id the unit of work hands a new reservation
NEW_TID = 7  # the id the unit of work hands a new transfer
WH, ST = "wh-1", "store-1"
ORDER = Reference("ORDER", "o-1")
MOVE = Reference("MOVE", "m-1")


@dataclass(frozen=True)
class TL:
    """A transfer line as the client sends it (``TransferLineInput``)."""

    sku: str
    quantity: int


# ---------------------------------------------------------------------------- building state


def loc(code: str, active: bool = True, type: str = WAREHOUSE, name: str | None = None):
    return Location(code, name or code.upper(), type, active, EARLIER, EARLIER)


def bal(sku: str, on_hand: int, reserved: int = 0, version: int = 1, location: str = WH):
    return Balance(sku, location, on_hand, reserved, version, EARLIER)


def resv(rid: int, *lines: ReservationLine, expires_at: datetime = LATER) -> Reservation:
    return Reservation(
        id=rid,
        status=ACTIVE,
        reference=ORDER,
        expires_at=expires_at,
        created_at=EARLIER,
        updated_at=EARLIER,
        lines=tuple(sorted(lines, key=lambda ln: ln.key)),
    )


def sent(
    *lines: TransferLine,
    tid: int = NEW_TID,
    status: str = IN_TRANSIT,
    frm: str = WH,
    to: str = ST,
) -> Transfer:
    """A transfer as stored, with ``MOVE`` and reason "rebalance"."""
    return Transfer(tid, status, frm, to, lines, MOVE, "rebalance", EARLIER, EARLIER)


def stock(
    *balances: Balance,
    locations: tuple[Location, ...] = (loc(WH), loc(ST)),
    reservations: tuple[Reservation, ...] = (),
    transfers: tuple[Transfer, ...] = (),
    required: bool = False,
) -> Stock:
    return Stock(
        with_derived(balances, reservations, transfers),
        reservations,
        locations=locations,
        transfers=transfers,
        locations_required=required,
    )


# ---------------------------------------------------------------------------- building commands


def restock(*lines: Line, key: str = "rs-1") -> Restock:
    return Restock.validated(key, list(lines))


def adjust(sku: str, location: str, delta: int, key: str = "adj-1") -> Adjust:
    return Adjust.validated(key, sku, location, delta=delta, reason="count")


def reserve(*lines: Line, key: str = "rv-1", ttl: int | None = None) -> Reserve:
    return Reserve.validated(
        key,
        list(lines),
        reference=ORDER,
        ttl_seconds=ttl,
        default_ttl_seconds=DEFAULT_TTL,
        max_ttl_seconds=MAX_TTL,
    )


def deduct_direct(*lines: Line, key: str = "dd-1") -> DeductDirect:
    command = Deduct.validated(key, lines=list(lines))
    assert isinstance(command, DeductDirect)
    return command


def move(
    frm: str, to: str, *lines: TL, in_transit: bool = False, key: str = "tr-1", **kw: Any
) -> TransferStock:
    return TransferStock.validated(key, frm, to, list(lines), in_transit=in_transit, **kw)


def receive(tid: int = NEW_TID, *lines: TL, key: str = "rc-1") -> ReceiveTransfer:
    return ReceiveTransfer.validated(key, transfer_global_id(tid), list(lines) or None)


def cancel(tid: int = NEW_TID, reason: str = "wrong truck", key: str = "cx-1") -> CancelTransfer:
    return CancelTransfer.validated(key, transfer_global_id(tid), reason)


# ---------------------------------------------------------------------------- deciding


def snapshot(s: Stock) -> tuple[Any, ...]:
    return (dict(s.balances), dict(s.reservations), dict(s.locations), dict(s.transfers))


def decide(s: Stock, command: Any, now: datetime = NOW) -> Changes | Refusal:
    """Decide ``command`` at ``now``; the stock itself is left as it was."""
    before = snapshot(s)
    decision = rules.decide(s, command, now, new_reservation_id=NEW_RID, new_transfer_id=NEW_TID)
    assert snapshot(s) == before, "decide changed the stock"
    return decision


def changes_of(s: Stock, command: Any, now: datetime = NOW) -> Changes:
    decision = decide(s, command, now)
    assert isinstance(decision, Changes), decision
    return decision


def refusal_of(s: Stock, command: Any, now: datetime = NOW) -> Refusal:
    decision = decide(s, command, now)
    assert isinstance(decision, Refusal), decision
    assert isinstance(decision.error, StockError)
    return decision


def apply(s: Stock, command: Any, now: datetime = NOW) -> Changes:
    changes = changes_of(s, command, now)
    s.apply(changes)
    return changes


def error_of(refusal: Refusal, kind: type[StockError]) -> Any:
    assert isinstance(refusal.error, kind), refusal.error
    return refusal.error


def unavailable(refusal: Refusal) -> tuple[str, bool]:
    """(location, exists) of a LocationUnavailableError that commits nothing."""
    error = error_of(refusal, LocationUnavailableError)
    assert error.code == "LOCATION_UNAVAILABLE"
    assert refusal.committed is None
    return (error.location, error.exists)


def entry(e: LedgerEntry) -> tuple[Any, ...]:
    """(event, location, sku, on_hand_delta, reserved_delta, on_hand_after, transfer_id)."""
    return (
        e.event_type,
        e.location,
        e.sku,
        e.on_hand_delta,
        e.reserved_delta,
        e.on_hand_after,
        e.transfer_id,
    )


def entries(changes: Changes) -> list[tuple[Any, ...]]:
    return [entry(e) for e in changes.entries]


def figures(changes: Changes) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(on_hand, reserved, version) of every balance the changes list."""
    return {b.key: (b.on_hand, b.reserved, b.version) for b in changes.balances}


def held(s: Stock, location: str, sku: str) -> tuple[int, int, int]:
    b = s.balance((location, sku))
    assert b is not None, (location, sku)
    return (b.on_hand, b.reserved, b.version)


def the_transfer(changes: Changes) -> Transfer:
    (found,) = changes.transfers
    return found


def line_figures(t: Transfer) -> dict[str, tuple[int, int, int, int]]:
    """sku -> (quantity, received, returned, remaining)."""
    return {ln.sku: (ln.quantity, ln.received, ln.returned, ln.remaining) for ln in t.lines}


def in_transit_stock(*lines: TransferLine, to_active: bool = True, **kw: Any) -> Stock:
    """WH -> ST transfer ``NEW_TID`` IN_TRANSIT (or ``status``) with ``lines``; ST holds A=1."""
    return stock(
        bal("A", 1, location=ST),
        locations=(loc(WH), loc(ST, active=to_active)),
        transfers=(sent(*lines, **kw),),
    )


# ============================================================================ REGISTERING


def test_restock_to_an_unknown_location_registers_a_warehouse_named_after_the_code():
    """A restock naming an unregistered code creates a WAREHOUSE of that name, active."""
    changes = changes_of(stock(), restock(Line("A", 5, "wh-9")))

    assert changes.locations == (Location("wh-9", "wh-9", WAREHOUSE, True, NOW, NOW),)
    assert figures(changes) == {("wh-9", "A"): (5, 0, 1)}
    assert entries(changes) == [("RESTOCK", "wh-9", "A", 5, 0, 5, None)]


def test_restock_of_several_unknown_locations_registers_each_once():
    """Two lines at one new code and one at another register two locations."""
    changes = changes_of(
        stock(), restock(Line("A", 1, "n-2"), Line("B", 2, "n-1"), Line("C", 3, "n-1"))
    )

    assert sorted((x.code, x.name, x.type, x.active) for x in changes.locations) == [
        ("n-1", "n-1", WAREHOUSE, True),
        ("n-2", "n-2", WAREHOUSE, True),
    ]


def test_adjust_to_an_unknown_location_registers_it():
    """An adjust naming an unregistered code creates the WAREHOUSE and the balance."""
    changes = changes_of(stock(), adjust("A", "wh-9", 4))

    assert changes.locations == (Location("wh-9", "wh-9", WAREHOUSE, True, NOW, NOW),)
    assert figures(changes) == {("wh-9", "A"): (4, 0, 1)}
    assert entries(changes) == [("ADJUST", "wh-9", "A", 4, 0, 4, None)]


def test_restock_to_a_registered_location_registers_nothing():
    """A known code is used as it is: no location in the changes."""
    changes = changes_of(stock(), restock(Line("A", 5, ST)))

    assert changes.locations == ()


def test_transfer_to_an_unknown_location_registers_it():
    """A transfer to an unregistered code creates the WAREHOUSE there and moves the units."""
    changes = changes_of(stock(bal("A", 10)), move(WH, "wh-9", TL("A", 4)))

    assert changes.locations == (Location("wh-9", "wh-9", WAREHOUSE, True, NOW, NOW),)
    assert figures(changes) == {(WH, "A"): (6, 0, 2), ("wh-9", "A"): (4, 0, 1)}


def test_an_auto_registered_location_is_seen_by_later_commands():
    """Once applied, the registered location exists: creating it again is refused."""
    s = stock()
    apply(s, restock(Line("A", 5, "wh-9")))

    assert s.locations["wh-9"] == Location("wh-9", "wh-9", WAREHOUSE, True, NOW, NOW)
    assert (
        error_of(
            refusal_of(s, CreateLocation.validated("cl", "wh-9", "X", STORE)), ValidationError
        ).field
        == "code"
    )


@pytest.mark.parametrize(
    ("command", "code"),
    [
        pytest.param(restock(Line("A", 1, WH), Line("A", 1, "wh-9")), "wh-9", id="restock"),
        pytest.param(adjust("A", "wh-9", 1), "wh-9", id="adjust"),
        pytest.param(reserve(Line("A", 1, "wh-9")), "wh-9", id="reserve"),
        pytest.param(deduct_direct(Line("A", 1, "wh-9")), "wh-9", id="deduct-direct"),
        pytest.param(move("wh-9", WH, TL("A", 1)), "wh-9", id="transfer-from"),
        pytest.param(move(WH, "wh-9", TL("A", 1)), "wh-9", id="transfer-to"),
        pytest.param(move(WH, "wh-9", TL("A", 1), in_transit=True), "wh-9", id="transit-to"),
    ],
)
def test_where_locations_must_be_registered_an_unknown_code_is_unavailable(command, code):
    """With locations_required every write naming an unknown code answers
    LocationUnavailableError with exists False, and commits nothing."""
    s = stock(bal("A", 10), required=True)

    assert unavailable(refusal_of(s, command)) == (code, False)


def test_where_locations_must_be_registered_known_codes_still_work():
    """locations_required refuses nothing at registered locations."""
    s = stock(bal("A", 10), required=True)

    assert figures(apply(s, restock(Line("A", 1, ST)))) == {(ST, "A"): (1, 0, 1)}
    assert the_transfer(apply(s, move(WH, ST, TL("A", 2), key="t2"))).status == RECEIVED
    assert held(s, ST, "A") == (3, 0, 2)


def test_reserve_at_an_unknown_location_is_short_with_available_zero():
    """Without the requirement, a reserve at an unknown code is InsufficientStockError with
    available 0 (and registers nothing)."""
    refusal = refusal_of(stock(), reserve(Line("A", 2, "wh-9")))

    assert error_of(refusal, InsufficientStockError).shortages == [Shortage("A", "wh-9", 2, 0)]
    assert refusal.committed is None


def test_direct_deduct_at_an_unknown_location_is_short_with_available_zero():
    """Without the requirement, a direct deduct at an unknown code is short with available 0."""
    refusal = refusal_of(stock(), deduct_direct(Line("A", 2, "wh-9")))

    assert error_of(refusal, InsufficientStockError).shortages == [Shortage("A", "wh-9", 2, 0)]


def test_transfer_from_an_unknown_location_is_short_with_available_zero():
    """Without the requirement, a transfer from an unknown code is short with available 0."""
    refusal = refusal_of(stock(), move("wh-9", WH, TL("A", 3)))

    assert error_of(refusal, InsufficientStockError).shortages == [Shortage("A", "wh-9", 3, 0)]


# ============================================================================ INACTIVE


def closed_stock() -> Stock:
    """WH is inactive and holds A=10 (4 reserved by reservation 1) and B=5; ST is active."""
    return stock(
        bal("A", 10, 4, version=2),
        bal("B", 5),
        locations=(loc(WH, active=False), loc(ST)),
        reservations=(resv(1, ReservationLine("A", WH, 4, 0, 0)),),
    )


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(restock(Line("A", 1, ST), Line("A", 1, WH)), id="restock"),
        pytest.param(reserve(Line("B", 1, WH)), id="reserve"),
        pytest.param(move(ST, WH, TL("A", 1)), id="transfer-in"),
        pytest.param(move(ST, WH, TL("A", 1), in_transit=True), id="transit-in"),
    ],
)
def test_an_inactive_location_takes_no_new_stock(command):
    """Restock, reserve and transfer into an inactive location answer
    LocationUnavailableError with exists True."""
    s = closed_stock()
    s.apply(Changes(balances=(bal("A", 5, location=ST),)))

    assert unavailable(refusal_of(s, command)) == (WH, True)


def test_a_receipt_at_an_inactive_destination_is_refused():
    """receiveTransfer into an inactive destination is LocationUnavailableError (exists)."""
    s = in_transit_stock(TransferLine("A", 5, 0, 0), to_active=False)

    assert unavailable(refusal_of(s, receive())) == (ST, True)


def test_an_inactive_location_can_be_adjusted():
    """An adjust at an inactive location applies."""
    changes = changes_of(closed_stock(), adjust("A", WH, -6))

    assert figures(changes) == {(WH, "A"): (4, 4, 3)}
    assert entries(changes) == [("ADJUST", WH, "A", -6, 0, 4, None)]


def test_an_inactive_location_can_be_deducted_directly():
    """A direct deduct at an inactive location applies."""
    changes = changes_of(closed_stock(), deduct_direct(Line("B", 5, WH)))

    assert figures(changes) == {(WH, "B"): (0, 0, 2)}
    assert entries(changes) == [("DEDUCT", WH, "B", -5, 0, 0, None)]


@pytest.mark.parametrize(
    ("command", "after", "event", "delta"),
    [
        (Release.validated("rl", reservation_id=1), (10, 0, 3), "RELEASE", (0, -4)),
        (Deduct.validated("dd", reservation_id=1), (6, 0, 3), "DEDUCT", (-4, -4)),
    ],
    ids=["release", "deduct"],
)
def test_a_reservation_at_an_inactive_location_can_be_released_or_deducted(
    command, after, event, delta
):
    """Release and deduct of a reservation held at an inactive location apply."""
    changes = changes_of(closed_stock(), command)

    assert figures(changes) == {(WH, "A"): after}
    (e,) = changes.entries
    assert (e.event_type, e.on_hand_delta, e.reserved_delta, e.reservation_id) == (
        event,
        *delta,
        1,
    )


def test_an_inactive_location_can_transfer_out():
    """A transfer out of an inactive location applies (it must leave reserved units)."""
    changes = changes_of(closed_stock(), move(WH, ST, TL("A", 6), TL("B", 5)))

    assert figures(changes) == {
        (WH, "A"): (4, 4, 3),
        (WH, "B"): (0, 0, 2),
        (ST, "A"): (6, 0, 1),
        (ST, "B"): (5, 0, 1),
    }
    assert the_transfer(changes).status == RECEIVED


def test_a_cancel_back_to_an_inactive_source_applies():
    """Cancelling a transfer whose source has since been deactivated puts the units back."""
    s = stock(
        bal("A", 2),
        locations=(loc(WH, active=False), loc(ST)),
        transfers=(sent(TransferLine("A", 5, 1, 0)),),
    )

    changes = changes_of(s, cancel())

    # The destination is listed too: its incoming went from 4 to 0 (no entry there).
    assert figures(changes) == {(WH, "A"): (6, 0, 2), (ST, "A"): (0, 0, 0)}
    assert [b.incoming for b in changes.balances if b.key == (ST, "A")] == [0]
    assert entries(changes) == [("TRANSFER_IN", WH, "A", 4, 0, 6, NEW_TID)]
    assert the_transfer(changes).status == CANCELLED


# ============================================================================ TRANSFER


def test_immediate_transfer_posts_out_then_in_and_is_received():
    """inTransit false: TRANSFER_OUT at the source, TRANSFER_IN at the destination, both with
    the transfer's id, reference and reason; the transfer is RECEIVED, received == quantity."""
    s = stock(bal("A", 10, version=3), bal("A", 1, location=ST))

    changes = changes_of(s, move(WH, ST, TL("A", 3), reference=MOVE, reason="rebalance"))

    assert entries(changes) == [
        ("TRANSFER_OUT", WH, "A", -3, 0, 7, NEW_TID),
        ("TRANSFER_IN", ST, "A", 3, 0, 4, NEW_TID),
    ]
    assert {
        (e.reference, e.reason, e.reservation_id, e.idempotency_key) for e in changes.entries
    } == {(MOVE, "rebalance", None, "tr-1")}
    assert figures(changes) == {(WH, "A"): (7, 0, 4), (ST, "A"): (4, 0, 2)}
    assert the_transfer(changes) == Transfer(
        NEW_TID, RECEIVED, WH, ST, (TransferLine("A", 3, 3, 0),), MOVE, "rebalance", NOW, NOW
    )
    assert line_figures(the_transfer(changes)) == {"A": (3, 3, 0, 0)}
    assert changes.answer == (NEW_TID,)
    command = move(WH, ST, TL("A", 3), reference=MOVE, reason="rebalance")
    assert changes.key_row == KeyRow("tr-1", "transfer", command.request_hash, None)


def test_immediate_transfer_of_two_skus_moves_both():
    """Every line posts its own TRANSFER_OUT and TRANSFER_IN; lines sorted by SKU."""
    s = stock(bal("A", 10), bal("B", 4))

    changes = changes_of(s, move(WH, ST, TL("B", 4), TL("A", 1)))

    assert entries(changes) == [
        ("TRANSFER_OUT", WH, "A", -1, 0, 9, NEW_TID),
        ("TRANSFER_OUT", WH, "B", -4, 0, 0, NEW_TID),
        ("TRANSFER_IN", ST, "A", 1, 0, 1, NEW_TID),
        ("TRANSFER_IN", ST, "B", 4, 0, 4, NEW_TID),
    ]
    assert line_figures(the_transfer(changes)) == {"A": (1, 1, 0, 0), "B": (4, 4, 0, 0)}


def test_in_transit_transfer_posts_only_transfer_out():
    """inTransit true: TRANSFER_OUT only; IN_TRANSIT; the missing destination balance is
    created with on hand 0 and version 0, listed in the changes, with no entry."""
    changes = changes_of(
        stock(bal("A", 10, version=3)), move(WH, ST, TL("A", 3), in_transit=True, reason="r")
    )

    assert entries(changes) == [("TRANSFER_OUT", WH, "A", -3, 0, 7, NEW_TID)]
    assert figures(changes) == {(WH, "A"): (7, 0, 4), (ST, "A"): (0, 0, 0)}
    assert [b for b in changes.balances if b.key == (ST, "A")] == [
        Balance("A", ST, 0, 0, 0, NOW, incoming=3)
    ]
    t = the_transfer(changes)
    assert (t.status, t.from_location, t.to_location, t.reason) == (IN_TRANSIT, WH, ST, "r")
    assert line_figures(t) == {"A": (3, 0, 0, 3)}


def test_in_transit_transfer_leaves_an_existing_destination_balance_as_it_is():
    """An existing destination balance keeps its on hand and version while units travel."""
    s = stock(bal("A", 10), bal("A", 2, version=5, location=ST))

    changes = apply(s, move(WH, ST, TL("A", 3), in_transit=True))

    assert [e.location for e in changes.entries] == [WH]
    assert held(s, ST, "A") == (2, 0, 5)


def test_reserved_units_cannot_be_transferred():
    """Each line needs available >= quantity at the source: reserved units stay; every short
    line is listed, and nothing is committed."""
    s = stock(
        bal("A", 10, 4, version=2),
        bal("B", 3, 3, version=2),
        bal("C", 5),
        reservations=(
            resv(1, ReservationLine("A", WH, 4, 0, 0), ReservationLine("B", WH, 3, 0, 0)),
        ),
    )

    refusal = refusal_of(s, move(WH, ST, TL("C", 5), TL("B", 1), TL("A", 7)))

    assert error_of(refusal, InsufficientStockError).shortages == [
        Shortage("A", WH, 7, 6),
        Shortage("B", WH, 1, 0),
    ]
    assert refusal.committed is None


def test_exactly_the_available_units_can_be_transferred():
    """available == quantity is enough; the reserved units stay at the source."""
    s = stock(
        bal("A", 10, 4, version=2), reservations=(resv(1, ReservationLine("A", WH, 4, 0, 0)),)
    )

    changes = changes_of(s, move(WH, ST, TL("A", 6)))

    assert figures(changes) == {(WH, "A"): (4, 4, 3), (ST, "A"): (6, 0, 1)}


def test_a_due_reservation_at_the_source_is_expired_first():
    """A past-due, unswept hold on the source is expired in the same decision, so the
    transfer goes through: EXPIRE (key expire:1) then TRANSFER_OUT."""
    s = stock(
        bal("A", 10, 4, version=2),
        reservations=(resv(1, ReservationLine("A", WH, 4, 0, 0), expires_at=EARLIER),),
    )

    changes = changes_of(s, move(WH, ST, TL("A", 8)))

    assert entries(changes) == [
        ("EXPIRE", WH, "A", 0, -4, 10, None),
        ("TRANSFER_OUT", WH, "A", -8, 0, 2, NEW_TID),
        ("TRANSFER_IN", ST, "A", 8, 0, 8, NEW_TID),
    ]
    assert [(e.reservation_id, e.idempotency_key) for e in changes.entries] == [
        (1, "expire:1"),
        (None, "tr-1"),
        (None, "tr-1"),
    ]
    assert figures(changes) == {(WH, "A"): (2, 0, 4), (ST, "A"): (8, 0, 1)}
    (r,) = changes.reservations
    assert (r.id, r.status) == (1, EXPIRED)
    assert changes.expired() == [1]


def test_a_transfer_still_short_after_expiring_commits_the_expiry():
    """When the source is short even after expiring due holds, the refusal still commits
    the expiry (section 11, "Expiry")."""
    s = stock(
        bal("A", 10, 7, version=3),
        reservations=(
            resv(1, ReservationLine("A", WH, 4, 0, 0), expires_at=EARLIER),
            resv(2, ReservationLine("A", WH, 3, 0, 0)),
        ),
    )

    refusal = refusal_of(s, move(WH, ST, TL("A", 8)))

    assert error_of(refusal, InsufficientStockError).shortages == [Shortage("A", WH, 8, 7)]
    assert refusal.committed is not None
    assert entries(refusal.committed) == [("EXPIRE", WH, "A", 0, -4, 10, None)]
    assert figures(refusal.committed) == {(WH, "A"): (10, 3, 4)}
    assert refusal.committed.key_row is None


def test_transfer_to_the_same_location_is_refused_at_construction():
    """fromLocation == toLocation is a ValidationError on toLocation."""
    with pytest.raises(ValidationError) as caught:
        move(WH, WH, TL("A", 1))

    assert caught.value.field == "toLocation"


def test_transfer_lines_of_one_sku_are_summed():
    """Duplicate SKU lines become one line and one entry per balance."""
    command = move(WH, ST, TL("A", 2), TL("B", 1), TL("A", 3))
    assert [(ln.location, ln.sku, ln.quantity) for ln in command.cart.lines] == [
        (WH, "A", 5),
        (WH, "B", 1),
    ]

    changes = changes_of(stock(bal("A", 5), bal("B", 1)), command)

    assert line_figures(the_transfer(changes)) == {"A": (5, 5, 0, 0), "B": (1, 1, 0, 0)}
    assert Counter((e.event_type, e.location, e.sku) for e in changes.entries) == Counter(
        {
            ("TRANSFER_OUT", WH, "A"): 1,
            ("TRANSFER_OUT", WH, "B"): 1,
            ("TRANSFER_IN", ST, "A"): 1,
            ("TRANSFER_IN", ST, "B"): 1,
        }
    )
    assert [e.on_hand_delta for e in changes.entries if e.sku == "A"] == [-5, 5]


def test_summed_lines_are_checked_against_available_together():
    """Lines 3 + 3 of A against 5 available are short by their sum."""
    refusal = refusal_of(stock(bal("A", 5)), move(WH, ST, TL("A", 3), TL("A", 3)))

    assert error_of(refusal, InsufficientStockError).shortages == [Shortage("A", WH, 6, 5)]


def test_transfer_up_to_the_32_bit_bound_at_the_destination_is_accepted():
    """A destination reaching exactly 2**31-1 is fine."""
    s = stock(bal("A", 5), bal("A", MAX_BALANCE - 5, location=ST))

    changes = changes_of(s, move(WH, ST, TL("A", 5)))

    assert figures(changes)[(ST, "A")] == (MAX_BALANCE, 0, 2)


def test_transfer_past_the_32_bit_bound_at_the_destination_is_refused():
    """An immediate transfer taking the destination's on hand past 2**31-1 is a
    ValidationError naming the line's quantity."""
    s = stock(bal("A", 5), bal("A", MAX_BALANCE - 4, location=ST))

    refusal = refusal_of(s, move(WH, ST, TL("A", 5)))

    assert error_of(refusal, ValidationError).field == "lines.0.quantity"
    assert refusal.committed is None


def test_transfer_past_the_bound_names_the_clients_line():
    """The path names the line as the client sent it (second line here), not its place in
    the SKU-sorted, merged lines."""
    s = stock(bal("A", 5), bal("B", 5), bal("A", MAX_BALANCE, location=ST))

    refusal = refusal_of(s, move(WH, ST, TL("B", 1), TL("A", 1)))

    assert error_of(refusal, ValidationError).field == "lines.1.quantity"


def test_in_transit_past_the_bound_is_refused_at_the_receipt():
    """In transit nothing lands at the destination yet; the receipt that would pass 2**31-1
    is the ValidationError, and the units stay in transit."""
    s = stock(bal("A", 5), bal("A", MAX_BALANCE - 1, location=ST))
    apply(s, move(WH, ST, TL("A", 5), in_transit=True))

    refusal = refusal_of(s, receive())

    assert isinstance(refusal.error, ValidationError)
    assert line_figures(s.transfers[NEW_TID]) == {"A": (5, 0, 0, 5)}


def test_a_transfer_needs_the_id_of_the_transfer_it_creates():
    """decide without new_transfer_id is a programming error."""
    with pytest.raises(ValueError):
        rules.decide(stock(bal("A", 5)), move(WH, ST, TL("A", 1)), NOW)


# ============================================================================ RECEIVE


def test_receive_partially_then_the_rest():
    """A partial receipt is PARTIALLY_RECEIVED; receiving the rest (no lines) is RECEIVED.
    The TRANSFER_IN entries carry the transfer's id, reference and reason."""
    s = stock(bal("A", 10))
    apply(s, move(WH, ST, TL("A", 5), in_transit=True, reference=MOVE, reason="rebalance"))
    assert held(s, ST, "A") == (0, 0, 0)

    first = apply(s, receive(NEW_TID, TL("A", 2), key="rc-1"), LATER)

    assert entries(first) == [("TRANSFER_IN", ST, "A", 2, 0, 2, NEW_TID)]
    (e,) = first.entries
    assert (e.reference, e.reason, e.idempotency_key, e.created_at) == (
        MOVE,
        "rebalance",
        "rc-1",
        LATER,
    )
    t = the_transfer(first)
    assert (t.status, t.created_at, t.updated_at) == (PARTIALLY_RECEIVED, NOW, LATER)
    assert line_figures(t) == {"A": (5, 2, 0, 3)}
    assert held(s, ST, "A") == (2, 0, 1)

    rest = apply(s, receive(NEW_TID, key="rc-2"))

    assert entries(rest) == [("TRANSFER_IN", ST, "A", 3, 0, 5, NEW_TID)]
    assert the_transfer(rest).status == RECEIVED
    assert line_figures(the_transfer(rest)) == {"A": (5, 5, 0, 0)}
    assert held(s, ST, "A") == (5, 0, 2)
    assert held(s, WH, "A") == (5, 0, 2)


def test_receive_of_exactly_the_remaining_by_lines_is_received():
    """Lines that take every remaining unit end the transfer RECEIVED."""
    s = in_transit_stock(TransferLine("A", 5, 2, 0), status=PARTIALLY_RECEIVED)

    changes = changes_of(s, receive(NEW_TID, TL("A", 3)))

    assert the_transfer(changes).status == RECEIVED
    assert figures(changes) == {(ST, "A"): (4, 0, 2)}


def test_receive_of_one_sku_of_two_leaves_the_other_in_transit():
    """Only the named SKU lands; the other line has no entry and stays in transit."""
    s = in_transit_stock(TransferLine("A", 5, 0, 0), TransferLine("B", 2, 0, 0))

    changes = changes_of(s, receive(NEW_TID, TL("B", 2)))

    assert entries(changes) == [("TRANSFER_IN", ST, "B", 2, 0, 2, NEW_TID)]
    t = the_transfer(changes)
    assert t.status == PARTIALLY_RECEIVED
    assert line_figures(t) == {"A": (5, 0, 0, 5), "B": (2, 2, 0, 0)}


def test_receive_without_lines_takes_only_what_remains():
    """No lines: each line's remaining, lines with nothing left get no entry."""
    s = in_transit_stock(
        TransferLine("A", 5, 5, 0), TransferLine("B", 4, 1, 0), status=PARTIALLY_RECEIVED
    )

    changes = changes_of(s, receive())

    assert entries(changes) == [("TRANSFER_IN", ST, "B", 3, 0, 3, NEW_TID)]
    assert line_figures(the_transfer(changes)) == {"A": (5, 5, 0, 0), "B": (4, 4, 0, 0)}


def test_receive_key_row_carries_the_transfer_number():
    """The key row's result_ref is the transfer's number; the answer is the transfer."""
    s = in_transit_stock(TransferLine("A", 5, 0, 0))
    command = receive()

    changes = changes_of(s, command)

    assert changes.key_row == KeyRow("rc-1", "receiveTransfer", command.request_hash, "7")
    assert changes.answer == (NEW_TID,)


def test_receive_more_than_remains_names_the_lines_quantity():
    """Asking more than a line's remaining is a ValidationError on lines.N.quantity."""
    s = in_transit_stock(TransferLine("A", 5, 0, 0), TransferLine("B", 5, 2, 0))

    refusal = refusal_of(s, receive(NEW_TID, TL("A", 1), TL("B", 4)))

    assert error_of(refusal, ValidationError).field == "lines.1.quantity"
    assert refusal.committed is None


def test_receive_over_asking_names_the_clients_line():
    """The path names the line as the client sent it (first line here), not its place in
    the SKU-sorted lines."""
    s = in_transit_stock(TransferLine("A", 5, 0, 0), TransferLine("B", 5, 0, 0))

    refusal = refusal_of(s, receive(NEW_TID, TL("B", 9), TL("A", 1)))

    assert error_of(refusal, ValidationError).field == "lines.0.quantity"


def test_receive_lines_of_one_sku_are_summed():
    """Two receipt lines of one SKU are one TRANSFER_IN of their sum."""
    s = in_transit_stock(TransferLine("A", 5, 0, 0))

    changes = changes_of(s, receive(NEW_TID, TL("A", 2), TL("A", 1)))

    assert entries(changes) == [("TRANSFER_IN", ST, "A", 3, 0, 4, NEW_TID)]
    assert line_figures(the_transfer(changes)) == {"A": (5, 3, 0, 2)}


def test_receive_summed_lines_over_asking_name_the_first_line():
    """Lines 3 + 3 against 5 remaining are refused naming the SKU's first line."""
    s = in_transit_stock(TransferLine("A", 5, 0, 0), TransferLine("B", 5, 0, 0))

    refusal = refusal_of(s, receive(NEW_TID, TL("B", 1), TL("A", 3), TL("A", 3)))

    assert error_of(refusal, ValidationError).field == "lines.1.quantity"


def test_receive_of_a_sku_not_in_the_transfer_names_the_lines_sku():
    """A SKU the transfer does not move is a ValidationError on lines.N.sku."""
    s = in_transit_stock(TransferLine("A", 5, 0, 0))

    refusal = refusal_of(s, receive(NEW_TID, TL("A", 1), TL("Z", 1)))

    assert error_of(refusal, ValidationError).field == "lines.1.sku"


def test_receive_of_an_unknown_sku_names_the_clients_line():
    """The path names the client's line (first here) even though it sorts after another."""
    s = in_transit_stock(TransferLine("A", 5, 0, 0))

    refusal = refusal_of(s, receive(NEW_TID, TL("Z", 1), TL("A", 1)))

    assert error_of(refusal, ValidationError).field == "lines.0.sku"


def test_receive_of_a_line_already_received_names_its_quantity():
    """A line with nothing remaining refuses even one more unit."""
    s = in_transit_stock(
        TransferLine("A", 5, 5, 0), TransferLine("B", 5, 0, 0), status=PARTIALLY_RECEIVED
    )

    refusal = refusal_of(s, receive(NEW_TID, TL("A", 1)))

    assert error_of(refusal, ValidationError).field == "lines.0.quantity"


@pytest.mark.parametrize("status", [RECEIVED, CANCELLED])
@pytest.mark.parametrize("operation", ["receive", "cancel"])
def test_a_closed_transfer_is_not_open(operation, status):
    """Receive or cancel of a RECEIVED or CANCELLED transfer is TransferNotOpenError with
    the transfer's id and status."""
    done = TransferLine("A", 5, 5, 0) if status == RECEIVED else TransferLine("A", 5, 2, 3)
    s = in_transit_stock(done, status=status)

    refusal = refusal_of(s, receive() if operation == "receive" else cancel())

    error = error_of(refusal, TransferNotOpenError)
    assert (error.transfer_id, error.status, error.code) == (NEW_TID, status, "TRANSFER_NOT_OPEN")
    assert refusal.committed is None


@pytest.mark.parametrize("operation", ["receive", "cancel"])
def test_an_unknown_transfer_is_not_found(operation):
    """A well-formed id naming no transfer is NotFoundError (entity Transfer, its number)."""
    s = in_transit_stock(TransferLine("A", 5, 0, 0))

    refusal = refusal_of(s, receive(8) if operation == "receive" else cancel(8))

    error = error_of(refusal, NotFoundError)
    assert (error.entity, error.key) == ("Transfer", "8")


@pytest.mark.parametrize(
    "bad",
    [
        "nope",
        "7",
        reservation_global_id(7),
        global_id("Transfer", "07"),
        global_id("Transfer", "0"),
        transfer_global_id(7) + "=",
    ],
    ids=["text", "v1-number", "reservation-id", "leading-zero", "zero", "padded"],
)
@pytest.mark.parametrize("operation", ["receive", "cancel"])
def test_a_malformed_transfer_id_is_not_found_at_construction(operation, bad):
    """An id that is not a Transfer's opaque id is NotFoundError when the command is built."""
    with pytest.raises(NotFoundError) as caught:
        if operation == "receive":
            ReceiveTransfer.validated("rc-1", bad)
        else:
            CancelTransfer.validated("cx-1", bad, "why")

    assert (caught.value.entity, caught.value.key) == ("Transfer", bad)


# ============================================================================ CANCEL


def test_cancel_of_an_in_transit_transfer_returns_everything():
    """Every unit in transit goes back to the source (TRANSFER_IN there, with the cancel's
    reason and the transfer's id and reference); the transfer is CANCELLED."""
    s = stock(bal("A", 10), bal("B", 2))
    apply(s, move(WH, ST, TL("A", 4), TL("B", 2), in_transit=True, reference=MOVE))

    changes = apply(s, cancel(reason="wrong truck"))

    assert entries(changes) == [
        ("TRANSFER_IN", WH, "A", 4, 0, 10, NEW_TID),
        ("TRANSFER_IN", WH, "B", 2, 0, 2, NEW_TID),
    ]
    assert {(e.reason, e.reference, e.idempotency_key) for e in changes.entries} == {
        ("wrong truck", MOVE, "cx-1")
    }
    t = the_transfer(changes)
    assert t.status == CANCELLED
    assert line_figures(t) == {"A": (4, 0, 4, 0), "B": (2, 0, 2, 0)}
    assert (held(s, WH, "A"), held(s, WH, "B")) == ((10, 0, 3), (2, 0, 3))
    assert (held(s, ST, "A"), held(s, ST, "B")) == ((0, 0, 0), (0, 0, 0))


def test_cancel_after_a_partial_receipt_returns_only_the_remaining():
    """Received units stay at the destination; returned counts what went back."""
    s = stock(bal("A", 10))
    apply(s, move(WH, ST, TL("A", 5), in_transit=True))
    apply(s, receive(NEW_TID, TL("A", 2)))

    changes = apply(s, cancel())

    assert entries(changes) == [("TRANSFER_IN", WH, "A", 3, 0, 8, NEW_TID)]
    assert line_figures(the_transfer(changes)) == {"A": (5, 2, 3, 0)}
    assert the_transfer(changes).status == CANCELLED
    assert held(s, WH, "A") == (8, 0, 3)
    assert held(s, ST, "A") == (2, 0, 1)


def test_cancel_skips_lines_with_nothing_remaining():
    """A fully received line gets no entry; only the other line goes back."""
    s = in_transit_stock(
        TransferLine("A", 5, 5, 0), TransferLine("B", 3, 1, 0), status=PARTIALLY_RECEIVED
    )

    changes = changes_of(s, cancel())

    assert entries(changes) == [("TRANSFER_IN", WH, "B", 2, 0, 2, NEW_TID)]
    assert line_figures(the_transfer(changes)) == {"A": (5, 5, 0, 0), "B": (3, 1, 2, 0)}


def test_cancel_key_row_carries_the_transfer_number():
    """The key row's result_ref is the transfer's number; the answer is the transfer."""
    s = in_transit_stock(TransferLine("A", 5, 0, 0))
    command = cancel()

    changes = changes_of(s, command)

    assert changes.key_row == KeyRow("cx-1", "cancelTransfer", command.request_hash, "7")
    assert changes.answer == (NEW_TID,)


def test_cancel_needs_a_reason():
    """cancelTransfer's reason is required."""
    with pytest.raises(ValidationError) as caught:
        CancelTransfer.validated("cx-1", transfer_global_id(7), None)

    assert caught.value.field == "reason"


# ============================================================================ LOCATIONS


def test_create_location_registers_it_active():
    """createLocation adds an active location; no ledger entry, no balance; the key row
    names the code."""
    command = CreateLocation.validated("cl-1", "store-9", "Store 9", STORE)

    changes = changes_of(stock(), command)

    assert changes.locations == (Location("store-9", "Store 9", STORE, True, NOW, NOW),)
    assert (changes.entries, changes.balances, changes.transfers) == ((), (), ())
    assert changes.key_row == KeyRow("cl-1", "createLocation", command.request_hash, "store-9")


@pytest.mark.parametrize("active", [True, False])
def test_create_location_of_an_existing_code_is_refused(active):
    """A code already registered (active or not) is a ValidationError on code."""
    s = stock(locations=(loc(WH, active=active),))

    refusal = refusal_of(s, CreateLocation.validated("cl-1", WH, "Again", VIRTUAL))

    assert error_of(refusal, ValidationError).field == "code"


def test_create_location_with_an_unknown_type_is_refused_at_construction():
    """type must be one of WAREHOUSE, STORE, VIRTUAL."""
    with pytest.raises(ValidationError) as caught:
        CreateLocation.validated("cl-1", "x", "X", "SHOP")

    assert caught.value.field == "type"


def test_update_location_of_an_unknown_code_is_not_found():
    """updateLocation of an unregistered code is NotFoundError (entity Location)."""
    refusal = refusal_of(stock(), UpdateLocation.validated("ul-1", "wh-9", active=False))

    error = error_of(refusal, NotFoundError)
    assert (error.entity, error.key) == ("Location", "wh-9")


def test_update_location_with_neither_name_nor_active_is_refused_at_construction():
    """At least one of name and active is required."""
    with pytest.raises(ValidationError) as caught:
        UpdateLocation.validated("ul-1", WH)

    assert caught.value.field == "name"


def test_deactivate_then_reactivate():
    """Deactivating stops restocks, reactivating allows them again; name, type and
    created_at are kept, updated_at moves; the key rows name the code."""
    s = stock(bal("A", 3), locations=(loc(WH, type=STORE, name="Main"),))
    off = UpdateLocation.validated("ul-1", WH, active=False)

    changes = apply(s, off)

    assert changes.locations == (Location(WH, "Main", STORE, False, EARLIER, NOW),)
    assert changes.key_row == KeyRow("ul-1", "updateLocation", off.request_hash, WH)
    assert (changes.entries, changes.balances) == ((), ())
    assert unavailable(refusal_of(s, restock(Line("A", 1, WH)))) == (WH, True)
    assert held(s, WH, "A") == (3, 0, 1), "deactivating leaves the stock where it is"

    back = apply(s, UpdateLocation.validated("ul-2", WH, active=True), LATER)

    assert back.locations == (Location(WH, "Main", STORE, True, EARLIER, LATER),)
    assert figures(apply(s, restock(Line("A", 1, WH)))) == {(WH, "A"): (4, 0, 2)}


def test_rename_keeps_the_active_flag():
    """A name alone changes the name only."""
    s = stock(locations=(loc(WH, active=False),))

    changes = changes_of(s, UpdateLocation.validated("ul-1", WH, name="Closed"))

    assert changes.locations == (Location(WH, "Closed", WAREHOUSE, False, EARLIER, NOW),)


# ============================================================================ CONSERVATION

CODES = ("L1", "L2", "L3")
SKUS = ("A", "B")
PROPERTY_SETTINGS = hypothesis.settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class Model:
    """An independent account of what each successful command did (not read from the
    ledger): on hand per balance, remaining per reservation and per transfer line, which
    locations are active, and the running total restocks - deducts + adjusts."""

    def __init__(self) -> None:
        self.on_hand: Counter[tuple[str, str]] = Counter()
        self.holds: dict[int, dict[tuple[str, str], int]] = {}
        self.expires: dict[int, datetime] = {}
        self.transfers: dict[int, dict[str, Any]] = {}
        self.active = dict.fromkeys(CODES, True)
        self.total = 0
        self.entries: Counter[tuple[str, str]] = Counter()
        self.now = NOW

    def reserved(self, key: tuple[str, str]) -> int:
        return sum(h.get(key, 0) for h in self.holds.values())

    def not_due_reserved(self, key: tuple[str, str]) -> int:
        return sum(h.get(key, 0) for r, h in self.holds.items() if self.now < self.expires[r])

    def can_take(self, lines: dict[tuple[str, str], int]) -> bool:
        """Available (after expiring due holds) covers every line."""
        return all(q <= self.on_hand[k] - self.not_due_reserved(k) for k, q in lines.items())

    def in_transit(self) -> int:
        return sum(sum(t["lines"].values()) for t in self.transfers.values() if t["open"])


def run(s: Stock, m: Model, command: Any, rid: int, tid: int) -> Changes | None:
    """Decide and apply one command (or what a refusal commits); count its entries and take
    the expiries it made out of the model's holds. None when refused."""
    decision = rules.decide(s, command, m.now, new_reservation_id=rid, new_transfer_id=tid)
    changes = decision if isinstance(decision, Changes) else decision.committed
    if changes is not None:
        s.apply(changes)
        for e in changes.entries:
            m.entries[e.key] += 1
        for r in changes.expired():
            assert m.now >= m.expires[r], "only a due reservation expires"
            m.holds.pop(r)
    return decision if isinstance(decision, Changes) else None


def check(s: Stock, m: Model) -> None:
    """Conservation and the balance invariants after a step."""
    on_hand = sum(b.on_hand for b in s.balances.values())
    transit = sum(ln.remaining for t in s.transfers.values() if t.open for ln in t.lines)
    assert on_hand + transit == m.total
    assert transit == m.in_transit()
    for key, b in s.balances.items():
        assert 0 <= b.reserved <= b.on_hand, b
        assert b.on_hand == m.on_hand[key], b
        assert b.reserved == m.reserved(key), b
        assert b.version == m.entries[key], b
    for key, q in m.on_hand.items():
        assert q == 0 or key in s.balances, key
    for t in s.transfers.values():
        model = m.transfers[t.id]
        assert t.open == model["open"]
        for ln in t.lines:
            assert min(ln.quantity, ln.received, ln.returned, ln.remaining) >= 0, ln
            assert ln.remaining == (model["lines"][ln.sku] if t.open else 0), ln
    for code, active in m.active.items():
        assert s.locations[code].active == active


KINDS = (
    *("restock",) * 3,
    *("reserve", "release", "deduct", "deduct_direct", "adjust"),
    *("transfer",) * 4,
    *("receive",) * 3,
    "cancel",
    "toggle",
    "wait",
)
"""Step kinds, weighted so that transfers often find stock and open transfers to act on."""


def quantities(most: int) -> st.SearchStrategy[int]:
    return st.integers(1, most)


def step(data: Any, s: Stock, m: Model, n: int) -> None:
    """Draw one command, predict from the model whether it applies, run it, and bring the
    model up to date from the command's own input."""
    kind = data.draw(st.sampled_from(KINDS))
    key = f"k-{n}"
    rid, tid = 1000 + n, 2000 + n
    code = data.draw(st.sampled_from(CODES))
    sku = data.draw(st.sampled_from(SKUS))
    if kind == "wait":
        m.now += timedelta(seconds=data.draw(st.integers(0, 900)))
        return
    if kind == "toggle":
        active = not m.active[code]
        assert run(s, m, UpdateLocation.validated(key, code, active=active), rid, tid)
        m.active[code] = active
        return
    if kind == "restock":
        q = data.draw(quantities(20))
        done = run(s, m, restock(Line(sku, q, code), key=key), rid, tid)
        assert (done is not None) == m.active[code]
        if done:
            m.on_hand[(code, sku)] += q
            m.total += q
        return
    if kind == "adjust":
        delta = data.draw(st.integers(-12, 12))
        done = run(s, m, adjust(sku, code, delta, key=key), rid, tid)
        after = m.on_hand[(code, sku)] + delta
        assert (done is not None) == (after >= m.reserved((code, sku)))
        if done:
            m.on_hand[(code, sku)] = after
            m.total += delta
        return
    if kind in ("reserve", "deduct_direct"):
        picked = data.draw(st.lists(st.sampled_from(SKUS), min_size=1, max_size=2, unique=True))
        lines = {(code, x): data.draw(quantities(5)) for x in picked}
        as_lines = [Line(x, q, c) for (c, x), q in lines.items()]
        if kind == "reserve":
            ttl = data.draw(st.integers(1, 900))
            done = run(s, m, reserve(*as_lines, key=key, ttl=ttl), rid, tid)
            assert (done is not None) == (m.active[code] and m.can_take(lines))
            if done:
                m.holds[rid] = dict(lines)
                m.expires[rid] = m.now + timedelta(seconds=ttl)
        else:
            done = run(s, m, deduct_direct(*as_lines, key=key), rid, tid)
            assert (done is not None) == m.can_take(lines)
            if done:
                for k, q in lines.items():
                    m.on_hand[k] -= q
                    m.total -= q
        return
    if kind in ("release", "deduct"):
        if not m.holds:
            return
        r = data.draw(st.sampled_from(sorted(m.holds)))
        hold = m.holds[r]
        want: dict[tuple[str, str], int] | None = None
        if data.draw(st.booleans()):
            k = data.draw(st.sampled_from(sorted(hold)))
            want = {k: data.draw(st.integers(1, hold[k] + 1))}
        lines = None if want is None else [Line(x, q, c) for (c, x), q in want.items()]
        maker = Release if kind == "release" else Deduct
        due = m.now >= m.expires[r]
        taken = dict(hold) if want is None else want
        fits = all(q <= hold.get(k, 0) for k, q in taken.items())
        done = run(s, m, maker.validated(key, reservation_id=r, lines=lines), rid, tid)
        assert (done is not None) == (not due and fits)
        if done:
            for k, q in taken.items():
                hold[k] -= q
                if kind == "deduct":
                    m.on_hand[k] -= q
                    m.total -= q
            m.holds[r] = {k: q for k, q in hold.items() if q}
            if not m.holds[r]:
                del m.holds[r]
        return
    if kind == "transfer":
        to = data.draw(st.sampled_from([c for c in CODES if c != code]))
        picked = data.draw(st.lists(st.sampled_from(SKUS), min_size=1, max_size=2, unique=True))
        lines = {x: data.draw(quantities(5)) for x in picked}
        in_transit = data.draw(st.booleans())
        command = move(
            code, to, *(TL(x, q) for x, q in lines.items()), in_transit=in_transit, key=key
        )
        done = run(s, m, command, rid, tid)
        ok = m.active[to] and m.can_take({(code, x): q for x, q in lines.items()})
        assert (done is not None) == ok
        if done:
            for x, q in lines.items():
                m.on_hand[(code, x)] -= q
                if not in_transit:
                    m.on_hand[(to, x)] += q
            m.transfers[tid] = {
                "from": code,
                "to": to,
                "lines": dict.fromkeys(lines, 0) if not in_transit else dict(lines),
                "open": in_transit,
            }
            assert the_transfer(done).status == (IN_TRANSIT if in_transit else RECEIVED)
        return
    open_ids = sorted(t for t, v in m.transfers.items() if v["open"])
    if not open_ids:
        return
    t = data.draw(st.sampled_from(open_ids))
    moving = m.transfers[t]
    if kind == "receive":
        want_all = data.draw(st.booleans())
        left = {x: q for x, q in moving["lines"].items() if q}
        if want_all:
            taken = left
            command = receive(t, key=key)
        else:
            x = data.draw(st.sampled_from(sorted(moving["lines"])))
            taken = {x: data.draw(st.integers(1, moving["lines"][x] + 1))}
            command = receive(t, *(TL(x, q) for x, q in taken.items()), key=key)
        fits = all(q <= moving["lines"][x] for x, q in taken.items())
        done = run(s, m, command, rid, tid)
        assert (done is not None) == (m.active[moving["to"]] and fits)
        if done:
            for x, q in taken.items():
                moving["lines"][x] -= q
                m.on_hand[(moving["to"], x)] += q
            moving["open"] = any(moving["lines"].values())
            expected = PARTIALLY_RECEIVED if moving["open"] else RECEIVED
            assert the_transfer(done).status == expected
        return
    done = run(s, m, cancel(t, key=key), rid, tid)
    assert done is not None
    for x, q in moving["lines"].items():
        m.on_hand[(moving["from"], x)] += q
        moving["lines"][x] = 0
    moving["open"] = False
    assert the_transfer(done).status == CANCELLED


@PROPERTY_SETTINGS
@hypothesis.given(st.data())
def test_on_hand_plus_in_transit_is_conserved(data):
    """Over random restock / reserve / release / deduct / adjust / transfer / receive /
    cancel / (de)activate / wait sequences across three locations and two SKUs: on hand plus
    in transit equals restocks - deducts + adjusts after every step, reserved <= on hand,
    nothing negative, and each balance's version counts its ledger entries."""
    s = Stock(locations=[Location(c, c, WAREHOUSE, True, EARLIER, EARLIER) for c in CODES])
    m = Model()
    for n in range(data.draw(st.integers(1, 60))):
        step(data, s, m, n)
        check(s, m)
