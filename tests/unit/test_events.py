"""The events of part EVENTS in the domain core (ARCHITECTURE section 15), with no database:
the alert transitions, which events each command emits, reorder points and suggestions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from stockledger.domain import rules
from stockledger.domain.commands import (
    ClearReorderPoint,
    Command,
    Deduct,
    Release,
    Reserve,
    Restock,
    SetReorderPoint,
)
from stockledger.domain.errors import ValidationError
from stockledger.domain.events import (
    RESERVATION_EXPIRED,
    STOCK_CHANGED,
    STOCK_LOW,
    STOCK_OUT,
    STOCK_REPLENISHED,
    reorder_quantity,
    suggested,
    target_alert,
    transition,
)
from stockledger.domain.model import LOW, OK, OUT, Balance, Line, ReorderPoint
from stockledger.domain.state import Changes, Stock

NOW = datetime(2030, 6, 1, 8, 0, tzinfo=UTC)
ALERTS = (STOCK_LOW, STOCK_OUT, STOCK_REPLENISHED)


def bal(on_hand: int, reserved: int = 0, *, minimum: int | None = None, alert: str = OK) -> Balance:
    reorder = None if minimum is None else ReorderPoint(minimum, 10)
    return Balance("A", "default", on_hand, reserved, 1, NOW, reorder=reorder, alert=alert)


@pytest.mark.parametrize(
    ("balance", "expected"),
    [
        (bal(5), (OK, ())),
        (bal(0), (OUT, (STOCK_OUT,))),
        (bal(3, minimum=3), (LOW, (STOCK_LOW,))),
        (bal(4, minimum=3), (OK, ())),
        (bal(0, minimum=3), (OUT, (STOCK_LOW, STOCK_OUT))),  # OK -> OUT with a reorder point
        (bal(2, 2, minimum=0), (OUT, (STOCK_LOW, STOCK_OUT))),  # all reserved: available 0
        (bal(0, minimum=3, alert=LOW), (OUT, (STOCK_OUT,))),
        (bal(2, minimum=3, alert=OUT), (LOW, ())),  # OUT -> LOW: still low
        (bal(9, minimum=3, alert=LOW), (OK, (STOCK_REPLENISHED,))),
        (bal(1, alert=OUT), (OK, (STOCK_REPLENISHED,))),
        (bal(1, minimum=3, alert=LOW), (LOW, ())),
    ],
)
def test_the_transition_table(balance: Balance, expected: tuple[str, tuple[str, ...]]) -> None:
    assert transition(balance) == expected
    assert target_alert(balance) == expected[0]


class Shop:
    """Applies commands one after another to one balance of SKU A, as a batch would."""

    def __init__(self) -> None:
        self.stock = Stock()
        self.now = NOW
        self.next_id = 1
        self.seen: list[list[str]] = []

    def run(self, command: Command) -> Changes:
        decision = rules.decide(self.stock, command, self.now, new_reservation_id=self.next_id)
        assert isinstance(decision, Changes), decision
        if isinstance(command, Reserve):
            self.next_id += 1  # reservation ids 1, 2, ... in reserve order
        self.stock.apply(decision)
        self.seen.append([e.type for e in decision.events])
        return decision

    def alerts(self) -> list[list[str]]:
        return [[t for t in types if t in ALERTS] for types in self.seen]


def lines(q: int) -> list[Line]:
    return [Line("A", q)]


def test_a_day_of_stock_across_the_minimum_and_zero_alerts_once_each() -> None:
    """Restock, a reorder point, reserves down to it and to 0, a release back above it, a
    deduct, a restock: exactly the expected LOW, OUT and REPLENISHED events, once each."""
    shop = Shop()
    shop.run(Restock.validated("s1", lines(10)))
    shop.run(SetReorderPoint.validated("rp", "A", minimum_level=3, reorder_quantity=10))
    shop.run(Reserve.validated("r1", lines(4), default_ttl_seconds=60, max_ttl_seconds=600))
    shop.run(Reserve.validated("r2", lines(3), default_ttl_seconds=60, max_ttl_seconds=600))
    shop.run(Reserve.validated("r3", lines(1), default_ttl_seconds=60, max_ttl_seconds=600))
    shop.run(Reserve.validated("r4", lines(2), default_ttl_seconds=60, max_ttl_seconds=600))
    shop.run(Release.validated("x4", reservation_id=4))
    shop.run(Release.validated("x3", reservation_id=3))
    shop.run(Release.validated("x2", reservation_id=2))
    shop.run(Deduct.validated("d1", reservation_id=1))
    shop.run(Restock.validated("s2", lines(20)))
    assert shop.alerts() == [
        [],  # restock 10: available 10, no reorder point
        [],  # setting a reorder point changes no state and emits nothing
        [],  # available 6
        [STOCK_LOW],  # available 3 <= 3
        [],  # available 2: still LOW
        [STOCK_OUT],  # available 0
        [],  # available 2: OUT -> LOW emits nothing
        [],  # available 3: still LOW
        [STOCK_REPLENISHED],  # available 6
        [],  # deduct 4: on hand 6, available 6
        [],  # restock: still OK
    ]
    balance = shop.stock.balance(("default", "A"))
    assert balance is not None and balance.alert == OK


def test_each_command_reports_each_balance_it_moved_once_with_its_entries() -> None:
    shop = Shop()
    changes = shop.run(Restock.validated("s1", [Line("A", 2), Line("B", 1), Line("A", 1)]))
    changed = [e for e in changes.events if e.type == STOCK_CHANGED]
    assert [(e.balance.sku if e.balance else None, e.entries) for e in changed] == [
        ("A", (0,)),
        ("B", (1,)),
    ]
    assert changed[0].balance is not None and changed[0].balance.version == 1


def test_a_setting_of_the_reorder_point_creates_an_empty_balance_and_emits_nothing() -> None:
    shop = Shop()
    changes = shop.run(
        SetReorderPoint.validated(
            "rp", "NEW", "east", minimum_level=2, reorder_quantity=5, maximum_level=9
        )
    )
    assert changes.events == () and changes.entries == ()
    [balance] = changes.balances
    assert (balance.on_hand, balance.version, balance.alert) == (0, 0, OK)
    assert balance.reorder == ReorderPoint(2, 5, 9)
    assert balance.low_stock  # available 0 <= 2: shown by lowStock, though no event went out
    assert [loc.code for loc in changes.locations] == ["east"]  # registered, as a restock does
    cleared = shop.run(ClearReorderPoint.validated("cl", "NEW", "east"))
    assert cleared.balances[0].reorder is None and cleared.events == ()


def test_clearing_the_reorder_point_of_no_balance_is_a_validation_error() -> None:
    decision = rules.decide(Stock(), ClearReorderPoint.validated("cl", "A"), NOW)
    assert isinstance(decision.error, ValidationError)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"minimum_level": -1, "reorder_quantity": 1}, "minimumLevel"),
        ({"minimum_level": 0, "reorder_quantity": 0}, "reorderQuantity"),
        ({"minimum_level": 5, "reorder_quantity": 1, "maximum_level": 4}, "maximumLevel"),
        ({"minimum_level": True, "reorder_quantity": 1}, "minimumLevel"),
        ({"minimum_level": 2**31, "reorder_quantity": 1}, "minimumLevel"),
    ],
)
def test_reorder_point_bounds(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        SetReorderPoint.validated("rp", "A", **kw)  # type: ignore[arg-type]
    assert err.value.field == field


def test_an_expiry_emits_reservation_expired_and_the_balance_it_moved() -> None:
    shop = Shop()
    shop.run(Restock.validated("s1", lines(5)))
    shop.run(Reserve.validated("r1", lines(5), default_ttl_seconds=60, max_ttl_seconds=600))
    shop.now = NOW + timedelta(minutes=5)
    changes = shop.run(
        Reserve.validated("r2", lines(5), default_ttl_seconds=60, max_ttl_seconds=600)
    )
    assert [e.type for e in changes.events] == [STOCK_CHANGED, RESERVATION_EXPIRED]
    expired = changes.events[1].reservation
    assert expired is not None and (expired.id, expired.status) == (1, "EXPIRED")
    assert [changes.entries[i].event_type for i in changes.events[1].entries] == ["EXPIRE"]
    # Expired then reserved again in one command: one STOCK_CHANGED, with both entries.
    assert [changes.entries[i].event_type for i in changes.events[0].entries] == [
        "EXPIRE",
        "RESERVE",
    ]


def test_suggestions_count_what_is_on_its_way() -> None:
    point = ReorderPoint(5, 10, None)
    low = Balance("A", "wh", 4, 0, 1, NOW, reorder=point)
    assert suggested(low) and reorder_quantity(low) == 10
    covered = Balance("A", "wh", 4, 0, 1, NOW, incoming=2, reorder=point)
    assert not suggested(covered)  # 4 + 2 > 5
    filled = Balance("A", "wh", 4, 1, 1, NOW, incoming=1, reorder=ReorderPoint(5, 10, 20))
    assert suggested(filled) and reorder_quantity(filled) == 20 - (3 + 1)
    assert not suggested(Balance("A", "wh", 0, 0, 1, NOW))  # no reorder point
