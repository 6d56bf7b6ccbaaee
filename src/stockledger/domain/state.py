"""The locked state a batch of commands works on, and what a command decides to change.

:class:`Stock` holds the balances and reservations a unit of work loaded (and locked), and takes
each applied command's :class:`Changes` so that the next command of the batch sees them
(commands of one batch are serializable in arrival order, ARCHITECTURE section 12).
:class:`Draft` is one command's working copy: the rules read through it and record moves in it;
a command that fails simply drops its draft, so it leaves no trace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from stockledger.domain.errors import IdempotencyKeyReusedError, StockError
from stockledger.domain.events import (
    RESERVATION_EXPIRED,
    STOCK_CHANGED,
    TRANSFER_UPDATED,
    Event,
    transition,
)
from stockledger.domain.model import (
    ACTIVE,
    EXPIRED,
    WAREHOUSE,
    Balance,
    BalanceKey,
    LedgerEntry,
    Location,
    Reference,
    ReorderPoint,
    Reservation,
    Transfer,
)

MAX_RESULT_REF = 1024
"""Width of the key row's ``result_ref`` column (migration 0005)."""


@dataclass(frozen=True, slots=True)
class KeyRow:
    """The idempotency key row a successful command writes (ARCHITECTURE section 5).

    ``result_ref`` holds what the ledger cannot tell about the result (the reservation an
    extend acted on, or the comma-separated ids a confirm acted on: they write no ledger
    entry); at most :data:`MAX_RESULT_REF` characters (the column's width).
    """

    idempotency_key: str
    operation: str
    request_hash: str
    result_ref: str | None = None


def key_reused(
    key: str, stored: tuple[str, str], asked: tuple[str, str]
) -> IdempotencyKeyReusedError | None:
    """Whether a call may replay the done call its idempotency ``key`` names: None when it
    asks for the same (operation, request hash) as ``stored``, else the error it answers
    (ARCHITECTURE section 5: a key used for another request is refused, never re-applied)."""
    return None if stored == asked else IdempotencyKeyReusedError(key, stored[0])


@dataclass(frozen=True, slots=True)
class Changes:
    """What one command changes, all of it written in the batch's transaction.

    ``balances``: the after-state of every balance it touched, in key order. ``reservations``,
    ``transfers``, ``locations``: the after-state of every one it created or changed.
    ``answer``: the ids of the reservations (or, for a transfer command, the transfer) its
    result lists, in the result's order. ``key_row``: None for the service's own expiry, and
    for what a refused command still commits. ``events``: what it tells the world
    (``domain/events.py``), in order.
    """

    entries: tuple[LedgerEntry, ...] = ()
    balances: tuple[Balance, ...] = ()
    reservations: tuple[Reservation, ...] = ()
    answer: tuple[int, ...] = ()
    key_row: KeyRow | None = None
    transfers: tuple[Transfer, ...] = ()
    locations: tuple[Location, ...] = ()
    events: tuple[Event, ...] = ()

    def expired(self) -> list[int]:
        """Ids of the reservations these changes expire (EXPIRE entries)."""
        return list(
            dict.fromkeys(
                e.reservation_id
                for e in self.entries
                if e.event_type == "EXPIRE" and e.reservation_id is not None
            )
        )


@dataclass(frozen=True, slots=True)
class Refusal:
    """A command that failed with ``error``. ``committed`` is what it still commits: the
    past-due reservations it expired on the way (ARCHITECTURE section 11, "Expiry")."""

    error: StockError
    committed: Changes | None = None


Decision = Changes | Refusal
"""What a rule returns: the command's changes, or its refusal."""


class Stock:
    """Balances by (location, sku), reservations and transfers by id, and locations by code,
    as loaded under lock.

    A balance absent here was never stocked; a reservation or transfer absent here does not
    exist in this org, and a location absent here is not registered (or was not loaded: the
    unit of work loads everything its commands address). ``locations_required``: writes may
    name registered locations only (``STOCKLEDGER_REQUIRE_REGISTERED_LOCATIONS``, section 14).
    """

    def __init__(
        self,
        balances: Iterable[Balance] = (),
        reservations: Iterable[Reservation] = (),
        *,
        locations: Iterable[Location] = (),
        transfers: Iterable[Transfer] = (),
        locations_required: bool = False,
    ) -> None:
        self.balances: dict[BalanceKey, Balance] = {b.key: b for b in balances}
        self.reservations: dict[int, Reservation] = {}
        self._by_reference: dict[Reference, set[int]] = {}
        for r in reservations:
            self._put(r)
        self.locations: dict[str, Location] = {loc.code: loc for loc in locations}
        self.transfers: dict[int, Transfer] = {t.id: t for t in transfers}
        self.locations_required = locations_required

    def balance(self, key: BalanceKey) -> Balance | None:
        return self.balances.get(key)

    def reservation(self, reservation_id: int) -> Reservation | None:
        return self.reservations.get(reservation_id)

    def by_reference(self, reference: Reference) -> list[Reservation]:
        """The holding (ACTIVE or CONFIRMED) reservations with ``reference``, oldest first
        (created_at, then id)."""
        found = (self.reservations[i] for i in self._by_reference.get(reference, ()))
        return sorted((r for r in found if r.holding), key=lambda r: (r.created_at, r.id))

    def due_holding(self, keys: Iterable[BalanceKey], now: datetime) -> list[Reservation]:
        """ACTIVE reservations due at ``now`` that still hold units of one of ``keys``,
        soonest expiry first."""
        wanted = set(keys)
        due = [
            r
            for r in self.reservations.values()
            if r.is_due(now) and any(k in wanted for k in r.holds())
        ]
        return sorted(due, key=lambda r: (r.expires_at or now, r.id))

    def add(
        self, reservations: Iterable[Reservation] = (), balances: Iterable[Balance] = ()
    ) -> None:
        """Load more rows (the unit of work does, e.g. due holds found for a short balance)."""
        for r in reservations:
            self._put(r)
        for b in balances:
            self.balances[b.key] = b

    def apply(self, changes: Changes) -> None:
        """Take a command's changes, so later commands of the batch see them."""
        for b in changes.balances:
            self.balances[b.key] = b
        for r in changes.reservations:
            self._put(r)
        for t in changes.transfers:
            self.transfers[t.id] = t
        for loc in changes.locations:
            self.locations[loc.code] = loc

    def _put(self, reservation: Reservation) -> None:
        self.reservations[reservation.id] = reservation
        if reservation.reference is not None:
            self._by_reference.setdefault(reservation.reference, set()).add(reservation.id)


class Draft:
    """One command's working copy over a :class:`Stock`: reads see the command's own moves.

    ``key`` is the idempotency key its ledger entries carry unless a move names another;
    ``now`` stamps every entry and every balance it touches.
    """

    def __init__(self, stock: Stock, now: datetime, key: str) -> None:
        self.stock = stock
        self.now = now
        self.key = key
        self._balances: dict[BalanceKey, Balance] = {}
        self._reservations: dict[int, Reservation] = {}
        self._transfers: dict[int, Transfer] = {}
        self._locations: dict[str, Location] = {}
        self._entries: list[LedgerEntry] = []

    def balance(self, key: BalanceKey) -> Balance:
        """The balance as this command sees it; a never-stocked one is all zeros."""
        found = self._balances.get(key) or self.stock.balance(key)
        if found is None:
            return Balance(key[1], key[0], 0, 0, 0, self.now)
        return found

    def reservation(self, reservation_id: int) -> Reservation | None:
        return self._reservations.get(reservation_id) or self.stock.reservation(reservation_id)

    def transfer(self, transfer_id: int) -> Transfer | None:
        return self._transfers.get(transfer_id) or self.stock.transfers.get(transfer_id)

    def location(self, code: str) -> Location | None:
        """The registered location ``code`` as this command sees it, or None."""
        return self._locations.get(code) or self.stock.locations.get(code)

    def register(self, location: Location) -> None:
        """Record a created or changed location (its after-state)."""
        self._locations[location.code] = location

    def register_unknown(self, code: str) -> Location:
        """Register ``code`` as a WAREHOUSE named after it (section 14: a restock, adjust or
        transfer to an unknown code creates it)."""
        location = Location(code, code, WAREHOUSE, True, self.now, self.now)
        self.register(location)
        return location

    def save_transfer(self, transfer: Transfer) -> None:
        """Record a created or changed transfer (its after-state)."""
        self._transfers[transfer.id] = transfer

    @property
    def touched(self) -> bool:
        return bool(self._entries or self._reservations)

    def move(
        self,
        key: BalanceKey,
        event_type: str,
        on_hand_delta: int,
        reserved_delta: int,
        *,
        reservation_id: int | None = None,
        reference: Reference | None = None,
        reason: str | None = None,
        idempotency_key: str | None = None,
        transfer_id: int | None = None,
    ) -> None:
        """Apply deltas (units) to one balance and record its ledger entry.

        The version goes up by one: it counts the balance's ledger entries (schema.graphql,
        ``Balance.version``).
        """
        before = self.balance(key)
        after = dataclasses.replace(
            before,
            on_hand=before.on_hand + on_hand_delta,
            reserved=before.reserved + reserved_delta,
            version=before.version + 1,
            updated_at=self.now,
        )
        self._balances[key] = after
        self._entries.append(
            LedgerEntry(
                id=None,
                event_type=event_type,
                sku=key[1],
                location=key[0],
                on_hand_delta=on_hand_delta,
                reserved_delta=reserved_delta,
                on_hand_after=after.on_hand,
                reserved_after=after.reserved,
                reservation_id=reservation_id,
                reference=reference,
                reason=reason,
                idempotency_key=idempotency_key or self.key,
                created_at=self.now,
                transfer_id=transfer_id,
            )
        )

    def save(self, reservation: Reservation) -> None:
        """Record a created or changed reservation (its after-state)."""
        self._reservations[reservation.id] = reservation

    def derive(self, key: BalanceKey, *, committed: int = 0, incoming: int = 0) -> None:
        """Change a balance's derived figures by these deltas (units): no entry, no version
        change (section 14). A missing balance is created empty first."""
        before = self.balance(key)
        self._balances[key] = dataclasses.replace(
            before,
            committed=before.committed + committed,
            incoming=before.incoming + incoming,
            updated_at=self.now,
        )

    def configure(self, key: BalanceKey, reorder: ReorderPoint | None) -> None:
        """Set (or, with None, clear) a balance's reorder point: no entry, no version change;
        a missing balance is created empty."""
        self._balances[key] = dataclasses.replace(
            self.balance(key), reorder=reorder, updated_at=self.now
        )

    def show(self, key: BalanceKey) -> None:
        """List a balance among the changes unchanged (no entry, no version change): the
        result of a confirm shows the balances of what it confirmed."""
        found = self._balances.get(key) or self.stock.balance(key)
        if found is not None:
            self._balances[key] = found

    def changes(self, *, answer: Iterable[int] = (), key_row: KeyRow | None = None) -> Changes:
        """What this command changes, with its events (``domain/events.py``): each balance it
        moved takes its new alert state here, once, from where the command left it."""
        positions: dict[BalanceKey, list[int]] = {}
        for i, entry in enumerate(self._entries):
            positions.setdefault(entry.key, []).append(i)
        balances: list[Balance] = []
        found: list[Event] = []
        for key in sorted(self._balances):
            balance = self._balances[key]
            if key in positions:
                state, alerts = transition(balance)
                balance = dataclasses.replace(balance, alert=state)
                about = tuple(positions[key])
                found.append(Event(STOCK_CHANGED, balance, about))
                found += [Event(kind, balance, about) for kind in alerts]
            balances.append(balance)
        for reservation in self._reservations.values():
            before = self.stock.reservation(reservation.id)
            if reservation.status == EXPIRED and before is not None and before.status == ACTIVE:
                about = tuple(
                    i
                    for i, e in enumerate(self._entries)
                    if e.event_type == "EXPIRE" and e.reservation_id == reservation.id
                )
                found.append(Event(RESERVATION_EXPIRED, reservation=reservation, entries=about))
        for transfer in self._transfers.values():
            about = tuple(i for i, e in enumerate(self._entries) if e.transfer_id == transfer.id)
            found.append(Event(TRANSFER_UPDATED, transfer=transfer, entries=about))
        return Changes(
            entries=tuple(self._entries),
            balances=tuple(balances),
            reservations=tuple(self._reservations.values()),
            answer=tuple(answer),
            key_row=key_row,
            transfers=tuple(self._transfers.values()),
            locations=tuple(self._locations.values()),
            events=tuple(found),
        )
