"""Input rules of ARCHITECTURE sections 9 and 11 at the service boundary, on the in-memory
store (``fakes.py``): validation runs before anything reaches a store, so this needs no
database (``tests/test_rules.py`` checks what only a database can show, e.g. that 255-character
strings and 500-line carts are stored exactly).

Bad input gets a ``ValidationError`` whose ``field`` names the input path at fault, and changes
nothing: no balance, no ledger entry, no reservation, and no idempotency key consumed (the same
key then works for a valid request). The boundaries themselves (500 lines, 1,000,000,000 units,
the TTL maximum) are accepted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import Clock, make_settings

from stockledger.config import Settings
from stockledger.services import (
    IdempotencyKeyReusedError,
    InventoryService,
    Line,
    Reference,
    ValidationError,
)
from unit.fakes import MemoryDatabase, memory_service, violations

MAX_TTL = 7 * 24 * 3600  # the default server maximum (settings.max_reservation_ttl_seconds)


# ---------------------------------------------------------------------------- helpers


MEMORY: dict[int, MemoryDatabase] = {}  # id(service) -> its tables


@pytest.fixture
async def service(settings: Settings, clock: Clock) -> AsyncIterator[InventoryService]:
    """The write services over a fresh in-memory store, on the test clock."""
    svc, mem = memory_service(settings, clock)
    MEMORY[id(svc)] = mem
    yield svc
    await svc.close()
    del MEMORY[id(svc)]


async def snapshot(service: InventoryService) -> tuple[Any, ...]:
    """Everything the org has in every table."""
    mem = MEMORY[id(service)]
    return (
        sorted(map(repr, mem.balances.values())),
        list(map(repr, mem.ledger)),
        sorted(map(repr, mem.reservations.values())),
        sorted(map(repr, mem.keys.items())),
    )


def check_invariants(service: InventoryService) -> None:
    assert violations(MEMORY[id(service)]) == []


@pytest.fixture
async def stocked(service: InventoryService) -> int:
    """A=10, B=10 on hand, a reservation of A 2, B 2 (ACTIVE). Returns the reservation id."""
    await service.restock("setup-rs", [Line("A", 10), Line("B", 10)])
    res = await service.reserve("setup-rv", [Line("A", 2), Line("B", 2)])
    return res.reservation.id


async def refused(
    service: InventoryService,
    call: Callable[[], Awaitable[Any]],
    field: str,
    key: str | None = "k-bad",
) -> ValidationError:
    """Run ``call``, expect a ValidationError on ``field`` that changed nothing.

    With ``key``, also prove the key was not consumed: a valid restock with it then applies.
    """
    before = await snapshot(service)
    with pytest.raises(ValidationError) as err:
        await call()
    assert err.value.field == field, err.value
    assert err.value.code == "VALIDATION_ERROR"
    assert err.value.message
    assert await snapshot(service) == before
    if key is not None:
        ok = await service.restock(key, [Line("KEY-PROBE", 1)])
        assert ok.replayed is False
    check_invariants(service)
    return err.value


def lines_call(service: InventoryService, rid: int, operation: str, lines: Any) -> Any:
    """A call of ``operation`` taking ``lines`` (release/deduct act on reservation ``rid``)."""
    if operation == "restock":
        return lambda: service.restock("k-bad", lines)
    if operation == "reserve":
        return lambda: service.reserve("k-bad", lines)
    if operation == "deduct-direct":
        return lambda: service.deduct("k-bad", lines=lines)
    if operation == "deduct":
        return lambda: service.deduct("k-bad", reservation_id=rid, lines=lines)
    if operation == "release":
        return lambda: service.release("k-bad", reservation_id=rid, lines=lines)
    raise AssertionError(operation)


LINE_OPERATIONS = ["restock", "reserve", "deduct-direct", "deduct", "release"]


# ---------------------------------------------------------------------------- quantities


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
@pytest.mark.parametrize(
    "quantity",
    [0, -1, -1_000_000_000, 1_000_000_001, 10**20, True, False, 1.0, 2.5, "3", None],
    ids=repr,
)
async def test_bad_quantity_is_refused(service, stocked, operation, quantity):
    lines = [Line("A", 1), Line("B", 1), Line("A", quantity)]
    await refused(service, lines_call(service, stocked, operation, lines), "lines.2.quantity")


@pytest.mark.parametrize("operation", ["restock", "reserve", "deduct-direct"])
async def test_lines_of_one_balance_adding_up_past_the_bound_are_refused(
    service, stocked, operation
):
    lines = [Line("B", 1), Line("A", 600_000_000), Line("A", 600_000_000)]
    await refused(service, lines_call(service, stocked, operation, lines), "lines.1.quantity")


async def test_quantity_of_exactly_one_billion_is_accepted(service):
    result = await service.restock("rs-1", [Line("A", 1_000_000_000)])
    assert result.balances[0].on_hand == 1_000_000_000
    res = await service.reserve("rv-1", [Line("A", 1_000_000_000)])
    assert res.reservation.lines[0].quantity == 1_000_000_000
    check_invariants(service)


# ---------------------------------------------------------------------------- strings

BAD_STRINGS = [
    pytest.param("", id="empty"),
    pytest.param(" ", id="blank"),
    pytest.param("      ", id="blanks"),
    pytest.param("a" * 256, id="256-chars"),
    pytest.param("x" * 10_240, id="10kB"),
    pytest.param("é" * 256, id="256-non-ascii"),
    pytest.param("a\x00b", id="NUL"),
    pytest.param("a\nb", id="LF"),
    pytest.param("\tab", id="TAB"),
    pytest.param("ab\r", id="CR"),
    pytest.param("a\x7f", id="DEL"),
    pytest.param("a\x85b", id="NEL-C1"),
    pytest.param("\x1b[31mred", id="ESC"),
    pytest.param(5, id="not-a-string"),
    pytest.param(None, id="None"),
]


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
@pytest.mark.parametrize("bad", BAD_STRINGS)
async def test_bad_sku_is_refused(service, stocked, operation, bad):
    lines = [Line("A", 1), Line(bad, 1)]
    await refused(service, lines_call(service, stocked, operation, lines), "lines.1.sku")


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
@pytest.mark.parametrize("bad", BAD_STRINGS)
async def test_bad_location_is_refused(service, stocked, operation, bad):
    lines = [Line("A", 1), Line("B", 1, bad)]
    await refused(service, lines_call(service, stocked, operation, lines), "lines.1.location")


@pytest.mark.parametrize("operation", ["restock", "reserve"])
async def test_lone_surrogate_in_a_sku_is_a_validation_error(service, stocked, operation):
    """A JSON string may carry an unpaired surrogate (e.g. "\\ud800"); it is no storable text."""
    lines = [Line("A\ud800", 1)]
    await refused(service, lines_call(service, stocked, operation, lines), "lines.0.sku")


# ---------------------------------------------------------------------------- carts


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
async def test_empty_cart_is_refused(service, stocked, operation):
    await refused(service, lines_call(service, stocked, operation, []), "lines")


@pytest.mark.parametrize("operation", ["restock", "reserve", "deduct-direct"])
async def test_missing_lines_are_refused_where_required(service, stocked, operation):
    await refused(service, lines_call(service, stocked, operation, None), "lines")


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
@pytest.mark.parametrize("size", [501, 10_000])
async def test_too_many_lines_are_refused(service, stocked, operation, size):
    lines = [Line(f"SKU-{i:05d}", 1) for i in range(size)]
    await refused(service, lines_call(service, stocked, operation, lines), "lines")


# ---------------------------------------------------------------------------- TTL

BAD_TTLS = [0, -1, -1800, MAX_TTL + 1, 10**12, True, 1.5, "60"]


@pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
async def test_bad_reserve_ttl_is_refused(service, stocked, ttl):
    await refused(
        service, lambda: service.reserve("k-bad", [Line("A", 1)], ttl_seconds=ttl), "ttlSeconds"
    )


@pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
async def test_bad_extend_ttl_is_refused(service, stocked, ttl):
    await refused(service, lambda: service.extend_reservation("k-bad", stocked, ttl), "ttlSeconds")


async def test_ttl_bounds_are_accepted(service, stocked):
    one = await service.reserve("rv-1", [Line("A", 1)], ttl_seconds=1)
    assert (one.reservation.expires_at - one.reservation.created_at).total_seconds() == 1
    top = await service.reserve("rv-2", [Line("A", 1)], ttl_seconds=MAX_TTL)
    assert (top.reservation.expires_at - top.reservation.created_at).total_seconds() == MAX_TTL
    ext = await service.extend_reservation("ex-1", stocked, MAX_TTL)
    assert ext.reservation.status == "ACTIVE"


async def test_a_lower_server_maximum_is_enforced(clock):
    service, mem = memory_service(make_settings(max_reservation_ttl_seconds=600), clock)
    MEMORY[id(service)] = mem
    await service.restock("rs-1", [Line("A", 10)])
    await refused(
        service, lambda: service.reserve("k-bad", [Line("A", 1)], ttl_seconds=601), "ttlSeconds"
    )
    ok = await service.reserve("rv-1", [Line("A", 1)], ttl_seconds=600)
    assert ok.reservation.status == "ACTIVE"


# ---------------------------------------------------------------------------- adjust


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param({"delta": 1, "set_on_hand": 1}, "delta", id="both"),
        pytest.param({}, "delta", id="neither"),
        pytest.param({"delta": 0, "set_on_hand": 0}, "delta", id="both-zero"),
        pytest.param({"delta": 1_000_000_001}, "delta", id="delta-too-big"),
        pytest.param({"delta": -1_000_000_001}, "delta", id="delta-too-small"),
        pytest.param({"delta": True}, "delta", id="delta-bool"),
        pytest.param({"delta": 1.5}, "delta", id="delta-float"),
        pytest.param({"set_on_hand": -1}, "setOnHand", id="set-negative"),
        pytest.param({"set_on_hand": 2**40}, "setOnHand", id="set-huge"),
        pytest.param({"set_on_hand": False}, "setOnHand", id="set-bool"),
        pytest.param({"delta": 1, "expected_version": -1}, "expectedVersion", id="version-neg"),
        pytest.param({"delta": 1, "expected_version": True}, "expectedVersion", id="version-bool"),
        pytest.param({"delta": 1, "reason": ""}, "reason", id="reason-empty"),
        pytest.param({"delta": 1, "reason": "   "}, "reason", id="reason-blank"),
        pytest.param({"delta": 1, "reason": "r" * 256}, "reason", id="reason-long"),
        pytest.param({"delta": 1, "reason": "a\nb"}, "reason", id="reason-control"),
        pytest.param({"delta": 1, "sku": ""}, "sku", id="sku-empty"),
        pytest.param({"delta": 1, "sku": "x" * 10_240}, "sku", id="sku-10kB"),
        pytest.param({"delta": 1, "location": " "}, "location", id="location-blank"),
        pytest.param(
            {"delta": 1, "reference": Reference("", "x")}, "reference.type", id="ref-type"
        ),
        pytest.param(
            {"delta": 1, "reference": Reference("ORDER", "a\x00")}, "reference.id", id="ref-id"
        ),
    ],
)
async def test_bad_adjust_is_refused(service, stocked, kwargs, field):
    args = {"sku": "A", "location": "default", "reason": "count", **kwargs}
    await refused(service, lambda: service.adjust("k-bad", **args), field)


# ---------------------------------------------------------------------------- addressing


@pytest.mark.parametrize("operation", ["release", "deduct"])
async def test_both_reservation_id_and_reference_are_refused(service, stocked, operation):
    ref = Reference("ORDER", "o-1")
    call = getattr(service, operation)
    await refused(
        service, lambda: call("k-bad", reservation_id=stocked, reference=ref), "reservationId"
    )


async def test_release_with_neither_reservation_id_nor_reference_is_refused(service, stocked):
    await refused(service, lambda: service.release("k-1"), "reservationId", key="k-1")
    await refused(
        service, lambda: service.release("k-2", lines=[Line("A", 1)]), "reservationId", key="k-2"
    )


@pytest.mark.parametrize("operation", ["release", "deduct"])
@pytest.mark.parametrize(
    ("ref", "field"),
    [
        (Reference("", "o-1"), "reference.type"),
        (Reference("ORDER", ""), "reference.id"),
        (Reference(" ", "o-1"), "reference.type"),
        (Reference("ORDER", "o" * 256), "reference.id"),
        (Reference("ORD\tER", "o-1"), "reference.type"),
    ],
)
async def test_bad_reference_is_refused(service, stocked, operation, ref, field):
    await refused(service, lambda: getattr(service, operation)("k-bad", reference=ref), field)


async def test_bad_reference_on_restock_and_reserve_is_refused(service, stocked):
    bad = Reference("ORDER", " ")
    await refused(
        service,
        lambda: service.restock("k-1", [Line("A", 1)], reference=bad),
        "reference.id",
        key="k-1",
    )
    await refused(
        service,
        lambda: service.reserve("k-2", [Line("A", 1)], reference=bad),
        "reference.id",
        key="k-2",
    )
    await refused(
        service,
        lambda: service.restock("k-3", [Line("A", 1)], reason="\x07"),
        "reason",
        key="k-3",
    )


@pytest.mark.parametrize("operation", ["release", "deduct", "extend"])
@pytest.mark.parametrize("rid", ["", "  ", "1\n", "9" * 256])
async def test_bad_reservation_id_is_refused(service, stocked, operation, rid):
    if operation == "extend":
        call = lambda: service.extend_reservation("k-bad", rid, 60)  # noqa: E731
    else:
        call = lambda: getattr(service, operation)("k-bad", reservation_id=rid)  # noqa: E731
    await refused(service, call, "reservationId")


# ---------------------------------------------------------------------------- keys

BAD_KEYS = [
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param("k" * 256, id="256-chars"),
    pytest.param("k" * 10_240, id="10kB"),
    pytest.param("key\n", id="control"),
    pytest.param(None, id="None"),
    pytest.param(42, id="int"),
    pytest.param("expire:", id="expire-prefix"),
    pytest.param("expire:1", id="expire-1"),
    pytest.param("expire:anything", id="expire-any"),
]


def every_operation(service: InventoryService, rid: int, key: Any) -> list[Any]:
    return [
        lambda: service.restock(key, [Line("A", 1)]),
        lambda: service.adjust(key, "A", delta=1, reason="count"),
        lambda: service.reserve(key, [Line("A", 1)]),
        lambda: service.release(key, reservation_id=rid),
        lambda: service.release(key, reference=Reference("ORDER", "o-1")),
        lambda: service.deduct(key, reservation_id=rid),
        lambda: service.deduct(key, lines=[Line("A", 1)]),
        lambda: service.extend_reservation(key, rid, 60),
    ]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_idempotency_key_is_refused_by_every_operation(service, stocked, key):
    for call in every_operation(service, stocked, key):
        await refused(service, call, "idempotencyKey", key=None)


async def test_the_expire_key_of_a_real_reservation_is_refused(service, stocked):
    key = f"expire:{stocked}"
    for call in every_operation(service, stocked, key):
        await refused(service, call, "idempotencyKey", key=None)


async def test_validation_runs_before_the_key_is_looked_up(service, stocked):
    """A used key with an invalid request is a ValidationError, not a key reuse or a replay."""
    await service.restock("used", [Line("A", 1)])
    before = await snapshot(service)
    for call in (
        lambda: service.restock("used", [Line("A", 0)]),
        lambda: service.restock("used", []),
        lambda: service.reserve("used", [Line("A", 1)], ttl_seconds=0),
        lambda: service.adjust("used", "A", reason="count"),
    ):
        with pytest.raises(ValidationError):
            await call()
    assert await snapshot(service) == before
    with pytest.raises(IdempotencyKeyReusedError):
        await service.reserve("used", [Line("A", 1)])
