"""In-memory stand-ins for the database, so the write path (service, batcher, unit of work and
domain) runs in the unit tier with no database (the FakeUnitOfWork of cosmicpython's
``tests/unit/test_handlers.py``, STYLE.md).

:class:`MemoryDatabase` holds the tables of one process's view as plain dicts;
:class:`MemoryStore` and :class:`MemoryLookups` implement ``services/ports.py`` over it.
One writer, one event loop: there is nothing to lock, so no row is ever busy. A transaction
stages its writes and applies them on commit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from stockledger.config import Settings
from stockledger.db.store import Locked, StoredKey, WriteSet
from stockledger.domain.errors import IdempotencyKeyReusedError
from stockledger.domain.ids import balance_key_of
from stockledger.domain.model import (
    ACTIVE,
    Balance,
    BalanceKey,
    LedgerEntry,
    Location,
    Reference,
    Reservation,
    Transfer,
)
from stockledger.services import InventoryService
from stockledger.services.lookups import (
    LOCATION_OPERATIONS,
    REORDER_OPERATIONS,
    TRANSFER_OPERATIONS,
    replayed_reservation_ids,
    replayed_result,
    replayed_transfer_id,
    transfer_result_keys,
)
from stockledger.services.records import (
    LocationResult,
    ReorderPointResult,
    TransferResult,
    WriteResult,
)
from stockledger.services.writes import Clock

# Written out here rather than imported: these fakes check the code that defines them.
HOLDING = (ACTIVE, "CONFIRMED")


@dataclass
class MemoryDatabase:
    """The tables of one org: what a database would hold after each commit."""

    balances: dict[BalanceKey, Balance] = field(default_factory=dict)
    reservations: dict[int, Reservation] = field(default_factory=dict)
    ledger: list[LedgerEntry] = field(default_factory=list)
    keys: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)
    locations: dict[str, Location] = field(default_factory=dict)
    transfers: dict[int, Transfer] = field(default_factory=dict)
    next_ids: dict[str, int] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)
    next_reservation_id: int = 1
    next_ledger_id: int = 1
    commits: int = 0


class MemoryTransaction:
    """One batch transaction over a :class:`MemoryDatabase` (see ``services/ports.py``)."""

    def __init__(self, db: MemoryDatabase) -> None:
        self.db = db
        self.staged: WriteSet | None = None
        self.staged_events: list[tuple[str, str]] = []
        self.ids: list[int] = []
        self.committed = False

    async def find_keys(self, keys: Sequence[str]) -> dict[str, StoredKey]:
        return {k: StoredKey(*self.db.keys[k]) for k in keys if k in self.db.keys}

    async def active_reservation_ids(self, references: Sequence[Reference]) -> list[int]:
        wanted = set(references)
        return sorted(
            r.id
            for r in self.db.reservations.values()
            if r.reference in wanted and r.status in HOLDING
        )

    async def lock_reservations(
        self, ids: Sequence[int], *, wait: bool
    ) -> Locked[int, Reservation]:
        return Locked({i: self.db.reservations[i] for i in ids if i in self.db.reservations})

    async def lock_balances(
        self, keys: Sequence[BalanceKey], *, wait: bool
    ) -> Locked[BalanceKey, Balance]:
        return Locked({k: self.db.balances[k] for k in keys if k in self.db.balances})

    async def lock_transfers(self, ids: Sequence[int], *, wait: bool) -> Locked[int, Transfer]:
        return Locked({i: self.db.transfers[i] for i in ids if i in self.db.transfers})

    async def lock_locations(self, codes: Sequence[str], *, update: bool) -> dict[str, Location]:
        return {c: self.db.locations[c] for c in codes if c in self.db.locations}

    async def due_holding(self, keys: Sequence[BalanceKey], now: datetime, limit: int) -> list[int]:
        wanted = set(keys)
        due = [
            r
            for r in self.db.reservations.values()
            if r.status == ACTIVE
            and r.expires_at is not None
            and r.expires_at <= now
            and any(ln.remaining > 0 and ln.key in wanted for ln in r.lines or ())
        ]
        return [r.id for r in sorted(due, key=lambda r: (r.expires_at or now, r.id))][:limit]

    async def write(self, ws: WriteSet) -> dict[int, int]:
        for b in ws.new_balances:
            assert b.key not in self.db.balances, f"balance {b.key} exists"
        for k in ws.keys:
            assert k.idempotency_key not in self.db.keys, f"key {k.idempotency_key} exists"
        for loc in ws.new_locations:
            assert loc.code not in self.db.locations, f"location {loc.code} exists"
        for t in ws.new_transfers:
            assert t.id not in self.db.transfers, f"transfer {t.id} exists"
        self.staged = ws
        first = self.db.next_ledger_id
        self.db.next_ledger_id += len(ws.entries)  # ids are never reused, as AUTO_INCREMENT
        self.ids = list(range(first, first + len(ws.entries)))
        return {
            i: self.ids[i]
            for i, e in enumerate(ws.entries)
            if ws.all_ids or e.idempotency_key in ws.keys_needing_ids
        }

    async def insert_events(self, rows: Sequence[tuple[str, str]], now: datetime) -> None:
        self.staged_events += rows

    async def commit(self) -> None:
        self.db.events += self.staged_events
        ws = self.staged
        if ws is not None:
            for b in [*ws.new_balances, *ws.balances]:
                self.db.balances[b.key] = b
            for r in [*ws.new_reservations, *ws.reservations]:
                self.db.reservations[r.id] = r
            for loc in [*ws.new_locations, *ws.locations]:
                self.db.locations[loc.code] = loc
            for t in [*ws.new_transfers, *ws.transfers]:
                self.db.transfers[t.id] = t
            for e, ledger_id in zip(ws.entries, self.ids, strict=True):
                self.db.ledger.append(replace(e, id=ledger_id))
            for k in ws.keys:
                self.db.keys[k.idempotency_key] = (k.operation, k.request_hash, k.result_ref)
        self.db.commits += 1
        self.committed = True


class MemoryStore:
    """One writer's store over a :class:`MemoryDatabase`, whose tables are org ``org_id``'s
    (a transaction of another org is a mistake of the caller)."""

    def __init__(self, db: MemoryDatabase, org_id: str = "memory") -> None:
        self.db = db
        self.org_id = org_id

    @asynccontextmanager
    async def transaction(self, org_id: str) -> AsyncIterator[MemoryTransaction]:
        assert org_id == self.org_id, f"a transaction of org {org_id!r} on {self.org_id!r}'s tables"
        yield MemoryTransaction(self.db)  # leaving without commit() writes nothing

    async def allocate_ids(self, name: str, count: int) -> range:
        if name == "reservation":
            start = self.db.next_reservation_id
            self.db.next_reservation_id += count
        else:
            start = self.db.next_ids.get(name, 1)
            self.db.next_ids[name] = start + count
        return range(start, start + count)

    async def committed(self, org_id: str, ws: WriteSet) -> bool:
        return all(r.id in self.db.reservations for r in ws.new_reservations) and all(
            k.idempotency_key in self.db.keys for k in ws.keys
        )

    async def discard(self) -> None:
        return None

    async def close(self) -> None:
        return None


class MemoryLookups:
    """The write path's reads over a :class:`MemoryDatabase` (see ``services/ports.py``)."""

    def __init__(self, db: MemoryDatabase) -> None:
        self.db = db

    async def replay(self, operation: str, key: str, request_hash: str) -> WriteResult | None:
        row = self.db.keys.get(key)
        if row is None:
            return None
        if (row[0], row[1]) != (operation, request_hash):
            raise IdempotencyKeyReusedError(key, row[0])
        # As services/lookups.py does over the database: the key row names a location or a
        # balance; a transfer call's entries name its transfer.
        if operation in LOCATION_OPERATIONS:
            return LocationResult(self.db.locations[row[2] or ""], True)
        if operation in REORDER_OPERATIONS:
            named = balance_key_of(row[2] or "")
            assert named is not None
            return ReorderPointResult(self.db.balances[named], True)
        entries = [e for e in self.db.ledger if e.idempotency_key == key]
        if operation in TRANSFER_OPERATIONS:
            moved = self.db.transfers[replayed_transfer_id(entries)]
            keys = transfer_result_keys(moved, entries)
            shown = [self.db.balances[k] for k in keys if k in self.db.balances]
            return TransferResult(moved, shown, entries, True)
        ids = replayed_reservation_ids(entries, row[2])
        reservations = [self.db.reservations[i] for i in ids if i in self.db.reservations]
        keys = sorted({e.key for e in entries})
        if operation == "confirm":
            keys = sorted({ln.key for r in reservations for ln in r.lines or ()})
        balances = [self.db.balances[k] for k in keys if k in self.db.balances]
        return replayed_result(operation, entries, balances, reservations)

    async def balances_and_key(
        self, keys: Sequence[BalanceKey], idempotency_key: str
    ) -> tuple[dict[BalanceKey, Balance], bool]:
        found = {k: self.db.balances[k] for k in keys if k in self.db.balances}
        return found, idempotency_key in self.db.keys

    async def reservation_keys(
        self, ids: Sequence[int], references: Sequence[Reference]
    ) -> dict[int | Reference, list[BalanceKey]]:
        return {}  # one writer, no Redis locks: nothing to route or claim

    async def transfer_keys(self, ids: Sequence[int]) -> dict[int, list[BalanceKey]]:
        return {}  # as reservation_keys

    async def any_due_holding(self, keys: Sequence[BalanceKey], now: datetime) -> bool:
        wanted = set(keys)
        return any(
            r.status == ACTIVE
            and r.expires_at is not None
            and r.expires_at <= now
            and any(ln.remaining > 0 and ln.key in wanted for ln in r.lines or ())
            for r in self.db.reservations.values()
        )

    async def due_reservation_ids(self, now: datetime, limit: int) -> list[int]:
        due = [
            r
            for r in self.db.reservations.values()
            if r.status == ACTIVE and r.expires_at is not None and r.expires_at <= now
        ]
        return [r.id for r in sorted(due, key=lambda r: (r.expires_at or now, r.id))][:limit]


def memory_service(
    settings: Settings, clock: Clock, db: MemoryDatabase | None = None
) -> tuple[InventoryService, MemoryDatabase]:
    """An :class:`InventoryService` over a new (or the given) in-memory database."""
    mem = db or MemoryDatabase()
    service = InventoryService(
        None,
        settings,
        clock=clock,
        org_id="memory",
        stores=lambda: MemoryStore(mem),
        lookups=MemoryLookups(mem),
        writers=1,
    )
    return service, mem


def violations(db: MemoryDatabase) -> list[str]:
    """The invariants of ARCHITECTURE section 2 over the in-memory tables (sentences)."""
    out = []
    sums: dict[BalanceKey, list[int]] = {}
    for e in db.ledger:
        total = sums.setdefault(e.key, [0, 0])
        total[0] += e.on_hand_delta
        total[1] += e.reserved_delta
    held: dict[BalanceKey, int] = {}
    for r in db.reservations.values():
        if (r.status == "CONFIRMED" and r.expires_at is not None) or (
            r.status in (ACTIVE, "EXPIRED") and r.expires_at is None
        ):
            out.append(f"reservation {r.id} is {r.status} with expiry {r.expires_at}")
        for ln in r.lines or ():
            left = ln.quantity - ln.deducted - ln.released
            if r.status in HOLDING:
                held[ln.key] = held.get(ln.key, 0) + left
            elif left:
                out.append(f"reservation {r.id} is {r.status} but still holds units")
    for key, b in sorted(db.balances.items()):
        if not 0 <= b.reserved <= b.on_hand:
            out.append(f"{key}: reserved {b.reserved} outside 0..on_hand {b.on_hand}")
        if sums.get(key, [0, 0]) != [b.on_hand, b.reserved]:
            out.append(f"{key}: ledger sums to {sums.get(key)}, balance {b.on_hand}, {b.reserved}")
        if held.get(key, 0) != b.reserved:
            out.append(
                f"{key}: holding reservations hold {held.get(key, 0)}, reserved {b.reserved}"
            )
    for key in set(sums) - set(db.balances):
        out.append(f"{key}: ledger entries without a balance")
    seen: set[tuple[str, BalanceKey, int | None]] = set()
    for e in db.ledger:
        one = (e.idempotency_key, e.key, e.reservation_id)
        if one in seen:
            out.append(f"key {e.idempotency_key!r}: more than one entry for {e.key}")
        seen.add(one)
    return out


def with_derived(
    balances: tuple[Balance, ...],
    reservations: tuple[Reservation, ...] = (),
    transfers: tuple[Transfer, ...] = (),
    created: datetime = datetime(2030, 1, 1, tzinfo=UTC),
) -> list[Balance]:
    """The balances with the derived figures a real store keeps (section 14), counted from the
    fixture's reservations and transfers: committed = what CONFIRMED ones hold, incoming = what
    open transfers to it still carry (a missing destination balance is created empty, at
    ``created``). For the rule tests' fixtures."""
    by_key = {b.key: b for b in balances}
    committed: dict[tuple[str, str], int] = {}
    incoming: dict[tuple[str, str], int] = {}
    for r in reservations:
        if r.status == "CONFIRMED":
            for ln in r.lines or ():
                committed[ln.key] = committed.get(ln.key, 0) + ln.remaining
    for t in transfers:
        if t.status in ("IN_TRANSIT", "PARTIALLY_RECEIVED"):
            for tl in t.lines:
                key = (t.to_location, tl.sku)
                incoming[key] = incoming.get(key, 0) + tl.remaining
    for key in set(committed) | set(incoming):
        found = by_key.get(key) or Balance(key[1], key[0], 0, 0, 0, created)
        by_key[key] = dataclasses.replace(
            found, committed=committed.get(key, 0), incoming=incoming.get(key, 0)
        )
    return list(by_key.values())
