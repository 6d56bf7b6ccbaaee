"""Idempotency keys (ARCHITECTURE sections 2 (invariant 4), 5 and 11), on both backends.

Same key, operation and normalized payload: ``replayed=True`` with the current state of what the
first call changed, and nothing changes again. Same key with another payload or operation:
``IdempotencyKeyReusedError``. A call that failed changed nothing and did not consume its key.
Concurrent duplicates of one request have exactly one effect.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import func, select

from stockledger.db.models import idempotency_key as K
from stockledger.db.models import inventory_balance as B
from stockledger.db.models import inventory_ledger as L
from stockledger.db.models import reservation as R
from stockledger.db.models import reservation_line as RL
from stockledger.services import (
    IdempotencyKeyReusedError,
    InsufficientStockError,
    InventoryService,
    Line,
    NotFoundError,
    Reference,
    ReservationNotActiveError,
    ValidationError,
    VersionConflictError,
)
from stockledger.services.reconcile import find_violations

LOC = "default"


# ---------------------------------------------------------------------------- helpers


async def snapshot(service: InventoryService) -> tuple[Any, ...]:
    """Everything the org has in every table."""
    async with service.db.read() as conn:
        out = []
        for table in (B, L, R, RL, K):
            rows = (await conn.execute(select(table).where(table.c.org_id == service.org_id))).all()
            out.append(sorted(tuple(map(str, r)) for r in rows))
    return tuple(out)


async def ledger(service: InventoryService, key: str | None = None) -> list[Any]:
    stmt = select(L).where(L.c.org_id == service.org_id)
    if key is not None:
        stmt = stmt.where(L.c.idempotency_key == key)
    async with service.db.read() as conn:
        return list((await conn.execute(stmt.order_by(L.c.id))).all())


async def stock(service: InventoryService, sku: str, location: str = LOC) -> tuple[int, int, int]:
    async with service.db.read() as conn:
        row = (
            await conn.execute(
                select(B).where(
                    B.c.org_id == service.org_id, B.c.location == location, B.c.sku == sku
                )
            )
        ).one()
    return (row.on_hand, row.reserved, row.version)


async def count(service: InventoryService, table: Any) -> int:
    async with service.db.read() as conn:
        stmt = select(func.count()).select_from(table).where(table.c.org_id == service.org_id)
        return int((await conn.execute(stmt)).scalar_one())


async def key_rows(service: InventoryService) -> dict[str, str]:
    async with service.db.read() as conn:
        rows = (await conn.execute(select(K).where(K.c.org_id == service.org_id))).all()
    return {r.idempotency_key: r.operation for r in rows}


async def assert_invariants(service: InventoryService) -> None:
    assert await find_violations(service.db, service.org_id) == []


def bal(records: Any) -> list[tuple[str, str, int, int, int]]:
    return sorted((b.location, b.sku, b.on_hand, b.reserved, b.version) for b in records)


def res_state(r: Any) -> tuple[Any, ...]:
    lines = sorted((ln.location, ln.sku, ln.quantity, ln.deducted, ln.released) for ln in r.lines)
    return (r.id, r.status, r.reference, r.expires_at, tuple(lines))


async def stocked(service: InventoryService, **kw: Any) -> Any:
    """A=10, B=10 on hand; a reservation of A 3, B 2 (returned)."""
    await service.restock("setup-rs", [Line("A", 10), Line("B", 10)])
    return (await service.reserve("setup-rv", [Line("A", 3), Line("B", 2)], **kw)).reservation


# ---------------------------------------------------------------------------- replays


async def test_restock_replay(service):
    first = await service.restock(
        "k-1", [Line("A", 5), Line("B", 2)], reference=Reference("PO", "1"), reason="delivery"
    )
    before = await snapshot(service)

    again = await service.restock(
        "k-1", [Line("A", 5), Line("B", 2)], reference=Reference("PO", "1"), reason="delivery"
    )

    assert (first.replayed, again.replayed) == (False, True)
    assert bal(again.balances) == bal(first.balances)
    assert [e.id for e in again.ledger_entries] == [e.id for e in first.ledger_entries]
    assert await snapshot(service) == before
    assert await stock(service, "A") == (5, 0, 1)
    await assert_invariants(service)


async def test_restock_replay_returns_the_current_state(service):
    await service.restock("k-1", [Line("A", 5)])
    await service.reserve("k-2", [Line("A", 2)])
    await service.restock("k-3", [Line("A", 1)])

    again = await service.restock("k-1", [Line("A", 5)])

    assert again.replayed is True
    assert bal(again.balances) == [(LOC, "A", 6, 2, 3)]
    # The ledger entries are those the key wrote, unchanged.
    assert [(e.on_hand_delta, e.on_hand_after) for e in again.ledger_entries] == [(5, 5)]
    assert await stock(service, "A") == (6, 2, 3)
    await assert_invariants(service)


async def test_adjust_replay(service):
    await service.restock("k-0", [Line("A", 10)])
    first = await service.adjust("k-1", "A", delta=-3, expected_version=1, reason="damaged")
    before = await snapshot(service)

    # The expected version no longer matches, yet this is a replay, not a conflict.
    again = await service.adjust("k-1", "A", delta=-3, expected_version=1, reason="damaged")

    assert again.replayed is True
    assert again.ledger_entry.id == first.ledger_entry.id
    assert (again.balance.on_hand, again.balance.version) == (7, 2)
    assert await snapshot(service) == before
    await assert_invariants(service)


async def test_adjust_zero_change_replay_does_not_bump_the_version(service):
    await service.restock("k-0", [Line("A", 10)])
    await service.adjust("k-1", "A", set_on_hand=10, reason="count")
    before = await snapshot(service)
    for _ in range(3):
        again = await service.adjust("k-1", "A", set_on_hand=10, reason="count")
        assert again.replayed is True
    assert await snapshot(service) == before
    assert await stock(service, "A") == (10, 0, 2)
    await assert_invariants(service)


async def test_reserve_replay(service):
    await service.restock("k-0", [Line("A", 10)])
    first = await service.reserve("k-1", [Line("A", 4)], reference=Reference("CART", "c"))
    before = await snapshot(service)

    again = await service.reserve("k-1", [Line("A", 4)], reference=Reference("CART", "c"))

    assert again.replayed is True
    assert res_state(again.reservation) == res_state(first.reservation)
    assert bal(again.balances) == bal(first.balances) == [(LOC, "A", 10, 4, 2)]
    assert await snapshot(service) == before
    assert await count(service, R) == 1
    await assert_invariants(service)


async def test_reserve_replay_after_release_and_expiry_shows_the_current_state(service, clock):
    await service.restock("k-0", [Line("A", 10)])
    first = await service.reserve("k-1", [Line("A", 4)], ttl_seconds=60)
    await service.release("k-2", reservation_id=first.reservation.id, lines=[Line("A", 1)])

    mid = await service.reserve("k-1", [Line("A", 4)], ttl_seconds=60)
    assert mid.replayed is True
    assert mid.reservation.id == first.reservation.id
    assert mid.reservation.status == "ACTIVE"
    assert [(ln.quantity, ln.released) for ln in mid.reservation.lines] == [(4, 1)]
    assert bal(mid.balances) == [(LOC, "A", 10, 3, 3)]

    clock.advance(61)
    assert await service.expire_due() == [first.reservation.id]
    late = await service.reserve("k-1", [Line("A", 4)], ttl_seconds=60)
    assert late.replayed is True
    assert late.reservation.status == "EXPIRED"
    assert bal(late.balances) == [(LOC, "A", 10, 0, 4)]
    assert await count(service, R) == 1
    await assert_invariants(service)


@pytest.mark.parametrize("how", ["id", "reference", "lines"])
async def test_release_replay(service, how):
    res = await stocked(service, reference=Reference("ORDER", "o-1"))
    kwargs: dict[str, Any] = {
        "id": {"reservation_id": res.id},
        "reference": {"reference": Reference("ORDER", "o-1")},
        "lines": {"reservation_id": res.id, "lines": [Line("A", 2)]},
    }[how]
    first = await service.release("k-1", **kwargs)
    before = await snapshot(service)

    again = await service.release("k-1", **kwargs)

    assert (first.replayed, again.replayed) == (False, True)
    assert [res_state(r) for r in again.reservations] == [res_state(r) for r in first.reservations]
    assert bal(again.balances) == bal(first.balances)
    assert await snapshot(service) == before
    await assert_invariants(service)


@pytest.mark.parametrize("how", ["id", "reference", "lines", "direct"])
async def test_deduct_replay(service, how):
    res = await stocked(service, reference=Reference("ORDER", "o-1"))
    kwargs: dict[str, Any] = {
        "id": {"reservation_id": res.id},
        "reference": {"reference": Reference("ORDER", "o-1")},
        "lines": {"reservation_id": res.id, "lines": [Line("B", 1)]},
        "direct": {"lines": [Line("A", 7)]},
    }[how]
    first = await service.deduct("k-1", **kwargs)
    before = await snapshot(service)

    again = await service.deduct("k-1", **kwargs)

    assert (first.replayed, again.replayed) == (False, True)
    assert [res_state(r) for r in again.reservations] == [res_state(r) for r in first.reservations]
    assert bal(again.balances) == bal(first.balances)
    assert [e.id for e in again.ledger_entries] == [e.id for e in first.ledger_entries]
    assert await snapshot(service) == before
    await assert_invariants(service)


async def test_direct_deduct_replay_is_not_refused_when_stock_ran_out(service):
    await service.restock("k-0", [Line("A", 5)])
    await service.deduct("k-1", lines=[Line("A", 5)])
    again = await service.deduct("k-1", lines=[Line("A", 5)])
    assert again.replayed is True
    assert await stock(service, "A") == (0, 0, 2)
    await assert_invariants(service)


async def test_extend_replay(service, clock):
    res = await stocked(service)
    first = await service.extend_reservation("k-1", res.id, 600)
    before = await snapshot(service)
    clock.advance(30)

    again = await service.extend_reservation("k-1", res.id, 600)

    assert again.replayed is True
    # The expiry is the one the first call set, not now + 600.
    assert again.reservation.expires_at == first.reservation.expires_at
    assert again.reservation.id == res.id
    assert await snapshot(service) == before
    await assert_invariants(service)


async def test_extend_replay_after_the_reservation_was_deducted(service):
    res = await stocked(service)
    await service.extend_reservation("k-1", res.id, 600)
    await service.deduct("k-2", reservation_id=res.id)

    again = await service.extend_reservation("k-1", res.id, 600)

    assert again.replayed is True
    assert again.reservation.status == "COMMITTED"
    await assert_invariants(service)


# ---------------------------------------------------------------------------- normalized payloads


async def test_payload_is_normalized_before_hashing(service):
    await service.restock("k-1", [Line("A", 2), Line("B", 1), Line("A", 3)])
    for same in (
        [Line("B", 1), Line("A", 5)],
        [Line("A", 5), Line("B", 1)],
        [Line("A", 1), Line("B", 1), Line("A", 4)],
    ):
        assert (await service.restock("k-1", same)).replayed is True
    assert await stock(service, "A") == (5, 0, 1)
    await assert_invariants(service)


async def test_omitted_ttl_is_the_default_in_the_payload(service):
    await service.restock("k-0", [Line("A", 10)])
    await service.reserve("k-1", [Line("A", 1)])
    assert (await service.reserve("k-1", [Line("A", 1)], ttl_seconds=1800)).replayed is True
    await service.reserve("k-2", [Line("A", 1)], ttl_seconds=1800)
    assert (await service.reserve("k-2", [Line("A", 1)])).replayed is True
    with pytest.raises(IdempotencyKeyReusedError):
        await service.reserve("k-2", [Line("A", 1)], ttl_seconds=1801)
    assert await count(service, R) == 2
    await assert_invariants(service)


async def test_reservation_id_as_int_or_string_is_one_payload(service):
    res = await stocked(service)
    await service.release("k-1", reservation_id=res.id)
    assert (await service.release("k-1", reservation_id=str(res.id))).replayed is True
    await assert_invariants(service)


# ---------------------------------------------------------------------------- key reuse


async def _first_use(service: InventoryService) -> Any:
    res = await stocked(service, reference=Reference("ORDER", "o-1"))
    await service.restock("used", [Line("A", 1)], reason="delivery")
    return res


def other_payloads(service: InventoryService, res: Any) -> list[Any]:
    """Calls with the key "used" that differ from its first use (a restock of A 1)."""
    ref = Reference("ORDER", "o-1")
    return [
        lambda: service.restock("used", [Line("A", 2)], reason="delivery"),
        lambda: service.restock("used", [Line("A", 1)], reason="other"),
        lambda: service.restock("used", [Line("A", 1)]),
        lambda: service.restock("used", [Line("A", 1), Line("B", 1)], reason="delivery"),
        lambda: service.restock("used", [Line("A", 1, "wh-2")], reason="delivery"),
        lambda: service.restock("used", [Line("a", 1)], reason="delivery"),
        lambda: service.restock("used", [Line("A ", 1)], reason="delivery"),
        lambda: service.restock(
            "used", [Line("A", 1)], reason="delivery", reference=Reference("PO", "1")
        ),
        lambda: service.adjust("used", "A", delta=1, reason="delivery"),
        lambda: service.reserve("used", [Line("A", 1)]),
        lambda: service.release("used", reservation_id=res.id),
        lambda: service.release("used", reference=ref),
        lambda: service.deduct("used", reservation_id=res.id),
        lambda: service.deduct("used", lines=[Line("A", 1)]),
        lambda: service.extend_reservation("used", res.id, 60),
    ]


async def test_same_key_with_another_payload_or_operation_is_refused(service):
    res = await _first_use(service)
    before = await snapshot(service)

    for i, call in enumerate(other_payloads(service, res)):
        with pytest.raises(IdempotencyKeyReusedError) as err:
            await call()
        assert err.value.idempotency_key == "used", i
        assert err.value.code == "IDEMPOTENCY_KEY_REUSED"

    assert await snapshot(service) == before
    assert (await service.restock("used", [Line("A", 1)], reason="delivery")).replayed is True
    await assert_invariants(service)


async def test_reservation_id_and_reference_are_different_payloads(service):
    res = await stocked(service, reference=Reference("ORDER", "o-1"))
    await service.release("k-1", reservation_id=res.id, lines=[Line("A", 1)])
    with pytest.raises(IdempotencyKeyReusedError):
        await service.release("k-1", reference=Reference("ORDER", "o-1"), lines=[Line("A", 1)])
    with pytest.raises(IdempotencyKeyReusedError):
        await service.release("k-1", reservation_id=res.id)  # all remaining: another payload
    with pytest.raises(IdempotencyKeyReusedError):
        await service.deduct("k-1", reservation_id=res.id, lines=[Line("A", 1)])
    assert await stock(service, "A") == (10, 2, 3)
    await assert_invariants(service)


async def test_keys_are_compared_exactly(service):
    await service.restock("key", [Line("A", 1)])
    for other in ("Key", "KEY", "key ", " key", "kéy"):
        result = await service.restock(other, [Line("A", 2)])
        assert result.replayed is False, other
    assert await stock(service, "A") == (11, 0, 6)
    assert set(await key_rows(service)) == {"key", "Key", "KEY", "key ", " key", "kéy"}
    await assert_invariants(service)


async def test_keys_belong_to_one_org(service, db, settings, clock):
    other = InventoryService(db, settings, clock=clock, org_id=service.org_id + "-b")
    await service.restock("shared", [Line("A", 1)])
    result = await other.restock("shared", [Line("A", 5)])
    assert result.replayed is False
    assert await stock(other, "A") == (5, 0, 1)
    assert await stock(service, "A") == (1, 0, 1)
    await assert_invariants(service)
    await assert_invariants(other)


# ---------------------------------------------------------------------------- failed calls


async def test_retry_after_insufficient_stock_works_once_stock_arrives(service):
    await service.restock("k-0", [Line("A", 1)])
    for _ in range(2):
        with pytest.raises(InsufficientStockError):
            await service.reserve("cart-1", [Line("A", 3)])
    assert "cart-1" not in await key_rows(service)

    await service.restock("k-1", [Line("A", 5)])
    ok = await service.reserve("cart-1", [Line("A", 3)])
    assert ok.replayed is False
    again = await service.reserve("cart-1", [Line("A", 3)])
    assert again.replayed is True
    assert again.reservation.id == ok.reservation.id
    assert await stock(service, "A") == (6, 3, 3)
    await assert_invariants(service)


async def test_failed_calls_do_not_consume_their_keys(service, clock):
    res = await stocked(service, ttl_seconds=60)
    await service.restock("k-c", [Line("C", 1)])
    done = (await service.reserve("k-done", [Line("C", 1)])).reservation
    await service.release("k-rel", reservation_id=done.id)
    s, rid, v9 = service, res.id, {"expected_version": 9}
    failures = [
        (ValidationError, lambda: s.restock("f-1", [Line("A", 0)])),
        (ValidationError, lambda: s.reserve("f-2", [Line("A", 1)], ttl_seconds=0)),
        (ValidationError, lambda: s.release("f-3", reservation_id=rid, lines=[Line("A", 9)])),
        (ValidationError, lambda: s.deduct("f-4", reservation_id=rid, lines=[Line("Z", 1)])),
        (InsufficientStockError, lambda: s.reserve("f-5", [Line("A", 8)])),
        (InsufficientStockError, lambda: s.deduct("f-6", lines=[Line("A", 8)])),
        (InsufficientStockError, lambda: s.adjust("f-7", "A", delta=-8, reason="x")),
        (VersionConflictError, lambda: s.adjust("f-8", "A", delta=1, reason="r", **v9)),
        (NotFoundError, lambda: s.release("f-9", reservation_id=10**15)),
        (NotFoundError, lambda: s.deduct("f-10", reference=Reference("NO", "such"))),
        (ReservationNotActiveError, lambda: s.deduct("f-11", reservation_id=done.id)),
        (ReservationNotActiveError, lambda: s.extend_reservation("f-12", done.id, 60)),
    ]  # fmt: skip
    before = await snapshot(service)
    for error, call in failures:
        with pytest.raises(error):
            await call()
    assert await snapshot(service) == before

    # Every key is still free: each now applies a valid (different) request.
    for i in range(1, 13):
        result = await service.restock(f"f-{i}", [Line("D", 1)])
        assert result.replayed is False
    assert await stock(service, "D") == (12, 0, 12)
    await assert_invariants(service)


async def test_key_of_a_call_that_found_its_reservation_expired_is_not_consumed(service, clock):
    res = await stocked(service, ttl_seconds=60)
    clock.advance(61)
    for call in (
        lambda: service.deduct("k-x", reservation_id=res.id),
        lambda: service.release("k-y", reservation_id=res.id),
        lambda: service.extend_reservation("k-z", res.id, 600),
    ):
        with pytest.raises(ReservationNotActiveError):
            await call()
    assert not {"k-x", "k-y", "k-z"} & set(await key_rows(service))
    # The retry of the very same request now finds the reservation EXPIRED: still not consumed.
    with pytest.raises(ReservationNotActiveError) as err:
        await service.deduct("k-x", reservation_id=res.id)
    assert err.value.status == "EXPIRED"
    assert not {"k-x", "k-y", "k-z"} & set(await key_rows(service))
    assert len(await ledger(service, f"expire:{res.id}")) == 2
    await assert_invariants(service)


# ---------------------------------------------------------------------------- concurrent duplicates


async def _gather(calls: list[Any]) -> list[Any]:
    return await asyncio.gather(*(c() for c in calls), return_exceptions=True)


@pytest.mark.parametrize(
    "operation", ["restock", "reserve", "deduct", "release", "adjust", "extend"]
)
async def test_same_request_twenty_times_concurrently_has_one_effect(service, operation):
    res = await stocked(service, reference=Reference("ORDER", "o-1"))
    call = {
        "restock": lambda: service.restock("dup", [Line("A", 5), Line("N", 1)]),
        "reserve": lambda: service.reserve("dup", [Line("A", 1), Line("B", 1)]),
        "deduct": lambda: service.deduct("dup", reference=Reference("ORDER", "o-1")),
        "release": lambda: service.release("dup", reservation_id=res.id, lines=[Line("A", 1)]),
        "adjust": lambda: service.adjust("dup", "A", delta=-1, reason="count"),
        "extend": lambda: service.extend_reservation("dup", res.id, 900),
    }[operation]

    results = await _gather([call] * 20)

    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert Counter(r.replayed for r in results) == {False: 1, True: 19}
    entries = await ledger(service, "dup")
    expected_entries = {
        "restock": 2,
        "reserve": 2,
        "deduct": 2,
        "release": 1,
        "adjust": 1,
        "extend": 0,
    }
    assert len(entries) == expected_entries[operation]
    expected_a = {
        "restock": (15, 3, 3),
        "reserve": (10, 4, 3),
        "deduct": (7, 0, 3),
        "release": (10, 2, 3),
        "adjust": (9, 3, 3),
        "extend": (10, 3, 2),
    }
    if operation == "extend":
        # Every replay reports the one expiry the single effect set.
        assert len({r.reservation.expires_at for r in results}) == 1
        async with service.db.read() as conn:
            stored = (await conn.execute(select(R.c.expires_at).where(R.c.id == res.id))).scalar()
        assert stored.replace(tzinfo=None) == results[0].reservation.expires_at.replace(tzinfo=None)
    assert await stock(service, "A") == expected_a[operation]
    assert list(await key_rows(service)).count("dup") == 1
    await assert_invariants(service)


async def test_concurrent_duplicates_of_a_failing_request_consume_nothing(service):
    await service.restock("k-0", [Line("A", 1)])
    results = await _gather([lambda: service.reserve("dup", [Line("A", 2)])] * 20)
    assert all(isinstance(r, InsufficientStockError) for r in results), results
    assert "dup" not in await key_rows(service)
    assert (await service.reserve("dup", [Line("A", 1)])).replayed is False
    await assert_invariants(service)


async def test_concurrent_same_key_different_payloads_one_wins(service):
    await service.restock("k-0", [Line("A", 100)])
    calls = [lambda q=q: service.reserve("dup", [Line("A", q)]) for q in range(1, 11)]

    results = await _gather(calls)

    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1 and winners[0].replayed is False
    assert len(losers) == 9
    assert all(isinstance(e, IdempotencyKeyReusedError) for e in losers), losers
    assert await stock(service, "A") == (100, winners[0].reservation.lines[0].quantity, 2)
    await assert_invariants(service)
