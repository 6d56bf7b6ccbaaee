"""The reconciliation query: checks the invariants of ARCHITECTURE section 2 for one org.

1. 0 <= reserved <= on_hand for every balance.
2. on_hand = sum(on_hand_delta) and reserved = sum(reserved_delta) over the balance's ledger.
3. reserved = sum(remaining) over the balance's ACTIVE and CONFIRMED reservation lines, and
   a reservation of any other status holds nothing.
4. A CONFIRMED reservation has no expiry (expires_at NULL); an ACTIVE or EXPIRED one has one
   (a COMMITTED or RELEASED one has one unless it was confirmed first).
5. A key's effects appear at most once: every client key's ledger entries come from one call,
   i.e. share one ``created_at``, and each balance appears at most once per (key, reservation).
6. Conservation (section 14), per SKU over all locations: sum(on hand) + units in transit =
   the sum of the on-hand deltas of every entry that is no transfer (restocks - deducts +
   adjusts): a transfer moves units, it never makes or loses one.
7. Each transfer line agrees with its entries: its TRANSFER_OUT entries at the source sum to
   -quantity, its TRANSFER_IN entries at the destination to +received and at the source to
   +returned.
8. The derived figures kept on each balance match their definitions: committed = sum(remaining)
   of its CONFIRMED reservation lines, incoming = sum(remaining) of the open transfer lines to
   it.
"""

from __future__ import annotations

from sqlalchemy import func, select

from stockledger.db.engine import Database
from stockledger.db.models import inventory_balance as B
from stockledger.db.models import inventory_ledger as L
from stockledger.db.models import reservation as R
from stockledger.db.models import reservation_line as RL
from stockledger.db.models import transfer as TR
from stockledger.db.models import transfer_line as TL
from stockledger.domain.model import (
    ACTIVE,
    CONFIRMED,
    EXPIRED,
    HOLDING_STATUSES,
    OPEN_TRANSFER_STATUSES,
)

TRANSFER_TYPES = ("TRANSFER_OUT", "TRANSFER_IN")


async def find_violations(db: Database, org_id: str) -> list[str]:
    """Every invariant violation in ``org_id`` as a readable sentence; empty when all hold."""
    out: list[str] = []
    async with db.read() as conn:
        balances = {
            (r.location, r.sku): r
            for r in await conn.execute(select(B).where(B.c.org_id == org_id))
        }
        sums = {
            (r.location, r.sku): (int(r.oh), int(r.rs))
            for r in await conn.execute(
                select(
                    L.c.location,
                    L.c.sku,
                    func.sum(L.c.on_hand_delta).label("oh"),
                    func.sum(L.c.reserved_delta).label("rs"),
                )
                .where(L.c.org_id == org_id)
                .group_by(L.c.location, L.c.sku)
            )
        }
        held = {
            (r.location, r.sku): int(r.held)
            for r in await conn.execute(
                select(
                    RL.c.location,
                    RL.c.sku,
                    func.sum(RL.c.quantity - RL.c.deducted - RL.c.released).label("held"),
                )
                .join(R, R.c.id == RL.c.reservation_id)
                .where(R.c.org_id == org_id, R.c.status.in_(HOLDING_STATUSES))
                .group_by(RL.c.location, RL.c.sku)
            )
        }
        repeated = list(
            await conn.execute(
                select(L.c.idempotency_key, L.c.location, L.c.sku, L.c.reservation_id)
                .where(L.c.org_id == org_id, ~L.c.idempotency_key.like("expire:%"))
                .group_by(L.c.idempotency_key, L.c.location, L.c.sku, L.c.reservation_id)
                .having(func.count() > 1)
            )
        )
        spread = list(
            await conn.execute(
                select(L.c.idempotency_key)
                .where(L.c.org_id == org_id)
                .group_by(L.c.idempotency_key)
                .having(func.count(func.distinct(L.c.created_at)) > 1)
            )
        )
        inactive_held = list(
            await conn.execute(
                select(R.c.id, R.c.status)
                .join(RL, R.c.id == RL.c.reservation_id)
                .where(R.c.org_id == org_id, R.c.status.not_in(HOLDING_STATUSES))
                .group_by(R.c.id, R.c.status)
                .having(func.sum(RL.c.quantity - RL.c.deducted - RL.c.released) != 0)
            )
        )
        misdated = list(
            await conn.execute(
                select(R.c.id, R.c.status, R.c.expires_at).where(
                    R.c.org_id == org_id,
                    ((R.c.status == CONFIRMED) & R.c.expires_at.is_not(None))
                    | (R.c.status.in_((ACTIVE, EXPIRED)) & R.c.expires_at.is_(None)),
                )
            )
        )
        made = {
            r.sku: int(r.units)
            for r in await conn.execute(
                select(L.c.sku, func.sum(L.c.on_hand_delta).label("units"))
                .where(L.c.org_id == org_id, L.c.event_type.not_in(TRANSFER_TYPES))
                .group_by(L.c.sku)
            )
        }
        in_transit = {
            r.sku: int(r.units)
            for r in await conn.execute(
                select(
                    TL.c.sku, func.sum(TL.c.quantity - TL.c.received - TL.c.returned).label("units")
                )
                .join(TR, (TR.c.id == TL.c.transfer_id) & (TR.c.org_id == TL.c.org_id))
                .where(TR.c.org_id == org_id, TR.c.status.in_(OPEN_TRANSFER_STATUSES))
                .group_by(TL.c.sku)
            )
        }
        committed = {
            (r.location, r.sku): int(r.units)
            for r in await conn.execute(
                select(
                    RL.c.location,
                    RL.c.sku,
                    func.sum(RL.c.quantity - RL.c.deducted - RL.c.released).label("units"),
                )
                .join(R, R.c.id == RL.c.reservation_id)
                .where(R.c.org_id == org_id, R.c.status == CONFIRMED)
                .group_by(RL.c.location, RL.c.sku)
            )
        }
        incoming = {
            (r.to_location, r.sku): int(r.units)
            for r in await conn.execute(
                select(
                    TR.c.to_location,
                    TL.c.sku,
                    func.sum(TL.c.quantity - TL.c.received - TL.c.returned).label("units"),
                )
                .join(TR, (TR.c.id == TL.c.transfer_id) & (TR.c.org_id == TL.c.org_id))
                .where(TR.c.org_id == org_id, TR.c.status.in_(OPEN_TRANSFER_STATUSES))
                .group_by(TR.c.to_location, TL.c.sku)
            )
        }
        transfer_lines = list(
            await conn.execute(
                select(
                    TR.c.id,
                    TR.c.status,
                    TR.c.from_location,
                    TR.c.to_location,
                    TL.c.sku,
                    TL.c.quantity,
                    TL.c.received,
                    TL.c.returned,
                )
                .join(TL, (TL.c.transfer_id == TR.c.id) & (TL.c.org_id == TR.c.org_id))
                .where(TR.c.org_id == org_id)
            )
        )
        moved = {
            (int(r.transfer_id), r.event_type, r.location, r.sku): int(r.units)
            for r in await conn.execute(
                select(
                    L.c.transfer_id,
                    L.c.event_type,
                    L.c.location,
                    L.c.sku,
                    func.sum(L.c.on_hand_delta).label("units"),
                )
                .where(L.c.org_id == org_id, L.c.transfer_id.is_not(None))
                .group_by(L.c.transfer_id, L.c.event_type, L.c.location, L.c.sku)
            )
        }
    on_hand_by_sku: dict[str, int] = {}
    for (_location, sku), row in balances.items():
        on_hand_by_sku[sku] = on_hand_by_sku.get(sku, 0) + int(row.on_hand)
    for sku in sorted(set(on_hand_by_sku) | set(made) | set(in_transit)):
        here, away = on_hand_by_sku.get(sku, 0), in_transit.get(sku, 0)
        if here + away != made.get(sku, 0):
            out.append(
                f"{sku}: on hand {here} + in transit {away} is not the {made.get(sku, 0)} units "
                "restocks, deducts and adjusts account for"
            )
    for t in transfer_lines:
        expected = {
            ("TRANSFER_OUT", t.from_location): -int(t.quantity),
            ("TRANSFER_IN", t.to_location): int(t.received),
            ("TRANSFER_IN", t.from_location): int(t.returned),
        }
        for (event, location), units in expected.items():
            posted = moved.get((int(t.id), event, location, t.sku), 0)
            if posted != units:
                out.append(
                    f"transfer {t.id} ({t.status}) {t.sku}: {event} at {location} sums to "
                    f"{posted}, its line says {units}"
                )
    for key in (set(committed) | set(incoming)) - set(balances):
        out.append(f"{key[0]}/{key[1]}: committed or incoming units without a balance")
    for key, row in sorted(balances.items()):
        name = f"{key[0]}/{key[1]}"
        derived = (committed.get(key, 0), incoming.get(key, 0))
        if (row.committed, row.incoming) != derived:
            out.append(
                f"{name}: committed {row.committed}, incoming {row.incoming} kept; their "
                f"definitions give {derived[0]}, {derived[1]}"
            )
        if not 0 <= row.reserved <= row.on_hand:
            out.append(f"{name}: reserved {row.reserved} outside 0..on_hand {row.on_hand}")
        oh, rs = sums.get(key, (0, 0))
        if (oh, rs) != (row.on_hand, row.reserved):
            out.append(
                f"{name}: ledger sums to on_hand {oh}, reserved {rs}; "
                f"balance has {row.on_hand}, {row.reserved}"
            )
        if held.get(key, 0) != row.reserved:
            out.append(
                f"{name}: ACTIVE and CONFIRMED reservations hold {held.get(key, 0)}, "
                f"reserved is {row.reserved}"
            )
    for key in set(sums) - set(balances):
        out.append(f"{key[0]}/{key[1]}: ledger entries without a balance")
    for key in set(held) - set(balances):
        out.append(f"{key[0]}/{key[1]}: reservation lines without a balance")
    for r in repeated:
        out.append(f"key {r.idempotency_key!r}: more than one entry for {r.location}/{r.sku}")
    for s in spread:
        out.append(f"key {s.idempotency_key!r}: entries written by more than one call")
    for res in inactive_held:
        out.append(f"reservation {res.id} is {res.status} but still holds units")
    for bad in misdated:
        out.append(f"reservation {bad.id} is {bad.status} with expiry {bad.expires_at}")
    return out
