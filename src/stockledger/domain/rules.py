"""The transaction rules of ARCHITECTURE section 3, one function per row of its table.

| event | condition | effect |
|---|---|---|
| RESTOCK q | q > 0 | on_hand += q (creates the balance on first restock) |
| ADJUST delta / set | result on_hand >= reserved; reason required | on_hand += delta |
| RESERVE q (per line) | available >= q, for every line, else nothing at all | reserved += q |
| RELEASE q | q <= line remaining | reserved -= q |
| EXPIRE | reservation ACTIVE and expires_at <= now | reserved -= remaining, status EXPIRED |
| DEDUCT q, reserved | q <= line remaining | reserved -= q, on_hand -= q |
| DEDUCT q, direct | available >= q | on_hand -= q |
| CONFIRM (section 14) | reservation ACTIVE and not due | status CONFIRMED, no expiry; no entry |
| TRANSFER q (section 14) | available >= q at the source, every line | TRANSFER_OUT: on_hand -= q |
| ... immediate | | and TRANSFER_IN: destination on_hand += q |
| RECEIVE q | transfer open; q <= line remaining | TRANSFER_IN: destination on_hand += q |
| CANCEL | transfer open | TRANSFER_IN of every remaining unit back at the source |

Locations (section 14): a restock, adjust or transfer to an unknown code registers it (a
WAREHOUSE named after the code) unless locations must be registered; then any write naming an
unknown code is LocationUnavailableError. An inactive location takes no restock, no transfer in
(a receipt included) and no reserve; everything else still works there.

Each rule is a pure function of the locked state (:class:`~stockledger.domain.state.Stock`),
the command and the time: it returns the command's
:class:`~stockledger.domain.state.Changes` (exactly one ledger entry per balance and
reservation touched) or a :class:`~stockledger.domain.state.Refusal` with one domain error. It
never changes ``stock``; the caller applies the changes. The answers to what the table leaves
open are section 11's; where a rule takes one from elsewhere, its docstring says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime, timedelta

from stockledger.domain.commands import (
    Adjust,
    CancelTransfer,
    ClearReorderPoint,
    Command,
    Confirm,
    CreateLocation,
    Deduct,
    DeductDirect,
    Expire,
    Extend,
    ReceiveTransfer,
    Release,
    Reserve,
    Restock,
    SetReorderPoint,
    TransferStock,
    UpdateLocation,
)
from stockledger.domain.errors import (
    InsufficientStockError,
    LocationUnavailableError,
    NotFoundError,
    ReservationNotActiveError,
    Shortage,
    TransferNotOpenError,
    ValidationError,
    VersionConflictError,
)
from stockledger.domain.ids import KEY_SEPARATOR as BALANCE_KEY_SEPARATOR
from stockledger.domain.model import (
    ACTIVE,
    CANCELLED,
    COMMITTED,
    CONFIRMED,
    DEFAULT_LOCATION,
    EXPIRED,
    HOLDING_STATUSES,
    IN_TRANSIT,
    PARTIALLY_RECEIVED,
    RECEIVED,
    RELEASED,
    BalanceKey,
    Location,
    Reference,
    Reservation,
    ReservationLine,
    Transfer,
    TransferLine,
    expire_key,
)
from stockledger.domain.state import (
    MAX_RESULT_REF,
    Changes,
    Decision,
    Draft,
    KeyRow,
    Refusal,
    Stock,
)
from stockledger.domain.validation import MAX_BALANCE, Cart


def decide(
    stock: Stock,
    command: Command,
    now: datetime,
    *,
    new_reservation_id: int | None = None,
    new_transfer_id: int | None = None,
) -> Decision:
    """The rule for ``command`` at ``now``. A reserve needs ``new_reservation_id``, the id its
    reservation gets, and a transfer ``new_transfer_id`` (the unit of work hands out ids)."""
    if isinstance(command, TransferStock):
        if new_transfer_id is None:
            raise ValueError("a transfer needs the id of the transfer it creates")
        return transfer(stock, command, now, new_transfer_id)
    if isinstance(command, ReceiveTransfer):
        return receive_transfer(stock, command, now)
    if isinstance(command, CancelTransfer):
        return cancel_transfer(stock, command, now)
    if isinstance(command, SetReorderPoint | ClearReorderPoint):
        return reorder_point(stock, command, now)
    if isinstance(command, CreateLocation):
        return create_location(stock, command, now)
    if isinstance(command, UpdateLocation):
        return update_location(stock, command, now)
    if isinstance(command, Restock):
        return restock(stock, command, now)
    if isinstance(command, Adjust):
        return adjust(stock, command, now)
    if isinstance(command, Reserve):
        if new_reservation_id is None:
            raise ValueError("a reserve needs the id of the reservation it creates")
        return reserve(stock, command, now, new_reservation_id)
    if isinstance(command, Release | Deduct):
        return consume(stock, command, now)
    if isinstance(command, DeductDirect):
        return deduct_direct(stock, command, now)
    if isinstance(command, Extend):
        return extend(stock, command, now)
    if isinstance(command, Confirm):
        return confirm(stock, command, now)
    return expire(stock, command, now)


def key_row(
    command: Restock | Adjust | Reserve | Release | Deduct | DeductDirect | TransferStock,
) -> KeyRow:
    return KeyRow(command.idempotency_key, command.operation, command.request_hash)


def restock(stock: Stock, command: Restock, now: datetime) -> Decision:
    """RESTOCK q: on_hand += q per line, creating the balance on first restock.

    A change that would take on hand past 2**31-1 is a ValidationError: GraphQL's Int is
    32-bit (GraphQL spec, "Int"), so such a balance could not be returned.
    """
    draft = Draft(stock, now, command.idempotency_key)
    for code in _codes(command.cart):
        unavailable = _location_check(draft, code, registers=True, needs_active=True)
        if unavailable is not None:
            return Refusal(unavailable)
    for line in command.cart.lines:
        if draft.balance(line.key).on_hand + line.quantity > MAX_BALANCE:
            return Refusal(
                ValidationError(
                    f"on hand of {line.location}/{line.sku} would exceed {MAX_BALANCE}",
                    command.cart.path(line.key, "quantity"),
                )
            )
        draft.move(
            line.key,
            "RESTOCK",
            line.quantity,
            0,
            reference=command.reference,
            reason=command.reason,
        )
    return draft.changes(key_row=key_row(command))


def adjust(stock: Stock, command: Adjust, now: datetime) -> Decision:
    """ADJUST delta / set: on_hand += delta, provided the result stays >= reserved.

    A balance that does not exist is created (version 0 before). A zero change is still an
    entry (section 11: a count that found nothing wrong is an audit event).
    """
    draft = Draft(stock, now, command.idempotency_key)
    unavailable = _location_check(draft, command.location, registers=True, needs_active=False)
    if unavailable is not None:
        return Refusal(unavailable)
    key = (command.location, command.sku)
    balance = draft.balance(key)
    if command.expected_version is not None and command.expected_version != balance.version:
        return Refusal(VersionConflictError(command.expected_version, balance.version))
    if command.delta is not None:
        delta = command.delta
    else:
        assert command.set_on_hand is not None  # the constructor requires exactly one
        delta = command.set_on_hand - balance.on_hand
    if balance.on_hand + delta < balance.reserved:
        shortage = Shortage(command.sku, command.location, -delta, balance.available)
        return Refusal(InsufficientStockError([shortage]))
    if balance.on_hand + delta > MAX_BALANCE:
        return Refusal(ValidationError(f"on hand would exceed {MAX_BALANCE}", "delta"))
    draft.move(key, "ADJUST", delta, 0, reference=command.reference, reason=command.reason)
    return draft.changes(key_row=key_row(command))


def reserve(stock: Stock, command: Reserve, now: datetime, reservation_id: int) -> Decision:
    """RESERVE q per line: available >= q on every line, else nothing at all.

    A never-stocked balance has 0 available. Due reservations holding a short balance are
    expired first, so expired holds never refuse a cart (see :func:`_short_lines`).
    """
    draft = Draft(stock, now, command.idempotency_key)
    for code in _codes(command.cart):
        unavailable = _location_check(draft, code, registers=False, needs_active=True)
        if unavailable is not None:
            return Refusal(unavailable)
    shortages = _short_lines(stock, draft, command.cart)
    if shortages:
        return Refusal(InsufficientStockError(shortages), _committed(draft))
    reservation = Reservation(
        id=reservation_id,
        status=ACTIVE,
        reference=command.reference,
        expires_at=now + timedelta(seconds=command.ttl_seconds),
        created_at=now,
        updated_at=now,
        lines=tuple(
            ReservationLine(line.sku, line.location, line.quantity, 0, 0)
            for line in command.cart.lines
        ),
    )
    draft.save(reservation)
    for line in command.cart.lines:
        draft.move(
            line.key,
            "RESERVE",
            0,
            line.quantity,
            reservation_id=reservation_id,
            reference=command.reference,
        )
    return draft.changes(answer=(reservation_id,), key_row=key_row(command))


def deduct_direct(stock: Stock, command: DeductDirect, now: datetime) -> Decision:
    """DEDUCT q, direct: available >= q on every line, else nothing; on_hand -= q. Works at
    an inactive location (a closing store can be emptied)."""
    draft = Draft(stock, now, command.idempotency_key)
    for code in _codes(command.cart):
        unavailable = _location_check(draft, code, registers=False, needs_active=False)
        if unavailable is not None:
            return Refusal(unavailable)
    shortages = _short_lines(stock, draft, command.cart)
    if shortages:
        return Refusal(InsufficientStockError(shortages), _committed(draft))
    for line in command.cart.lines:
        draft.move(line.key, "DEDUCT", -line.quantity, 0)
    return draft.changes(key_row=key_row(command))


def consume(stock: Stock, command: Release | Deduct, now: datetime) -> Decision:
    """RELEASE q (reserved -= q) or DEDUCT q, reserved (reserved -= q, on_hand -= q), with
    q <= line remaining, from one ACTIVE or CONFIRMED reservation or from every such
    reservation with a reference, oldest first (section 11, "By reference"; section 14).

    No lines: everything remaining. A reservation left with nothing remaining is COMMITTED
    if any of it was deducted, else RELEASED; one with units left keeps its status.
    """
    draft = Draft(stock, now, command.idempotency_key)
    found = _addressed(
        stock, draft, command.reservation_id, command.reference, now, HOLDING_STATUSES
    )
    if isinstance(found, Refusal):
        return found
    take = _take(found, command.cart)
    if isinstance(take, Refusal):
        return take  # the expiries on the way roll back with it
    deduct = isinstance(command, Deduct)
    touched: list[Reservation] = []
    for reservation in found:
        wanted = take.get(reservation.id)
        if not wanted:
            continue
        lines = []
        for line in reservation.lines or ():
            q = wanted.get(line.key, 0)
            if q and reservation.status == CONFIRMED:
                draft.derive(line.key, committed=-q)
            if q and deduct:
                draft.move(
                    line.key,
                    "DEDUCT",
                    -q,
                    -q,
                    reservation_id=reservation.id,
                    reference=reservation.reference,
                )
                line = dataclasses.replace(line, deducted=line.deducted + q)
            elif q:
                draft.move(
                    line.key,
                    "RELEASE",
                    0,
                    -q,
                    reservation_id=reservation.id,
                    reference=reservation.reference,
                )
                line = dataclasses.replace(line, released=line.released + q)
            lines.append(line)
        status = reservation.status
        if all(line.remaining == 0 for line in lines):
            status = COMMITTED if any(line.deducted > 0 for line in lines) else RELEASED
        after = dataclasses.replace(reservation, status=status, updated_at=now, lines=tuple(lines))
        draft.save(after)
        touched.append(after)
    return draft.changes(answer=[r.id for r in touched], key_row=key_row(command))


def extend(stock: Stock, command: Extend, now: datetime) -> Decision:
    """Set an ACTIVE reservation's expiry to now + ttl (shorter or longer). No ledger entry:
    no quantity changes; the key row remembers which reservation it was."""
    draft = Draft(stock, now, command.idempotency_key)
    found = _addressed(stock, draft, command.reservation_id, None, now, (ACTIVE,))
    if isinstance(found, Refusal):
        return found
    reservation = dataclasses.replace(
        found[0], expires_at=now + timedelta(seconds=command.ttl_seconds), updated_at=now
    )
    draft.save(reservation)
    row = KeyRow(
        command.idempotency_key, command.operation, command.request_hash, str(reservation.id)
    )
    return draft.changes(answer=(reservation.id,), key_row=row)


def confirm(stock: Stock, command: Confirm, now: datetime) -> Decision:
    """CONFIRM (section 14): an ACTIVE reservation, or every ACTIVE one with a reference
    (oldest first), becomes CONFIRMED: it keeps its lines and loses its expiry. No ledger
    entry and no version change, since no quantity changes; the key row remembers which
    reservations it was, and the result lists their balances as they are.

    A due one is expired instead, as a release, deduct or extend does (:func:`_addressed`).
    """
    draft = Draft(stock, now, command.idempotency_key)
    found = _addressed(stock, draft, command.reservation_id, command.reference, now, (ACTIVE,))
    if isinstance(found, Refusal):
        return found
    result_ref = ",".join(str(r.id) for r in found)
    if len(result_ref) > MAX_RESULT_REF:
        return Refusal(
            ValidationError(
                f"confirms more reservations ({len(found)}) than one call may", "reference"
            )
        )
    for reservation in found:
        draft.save(
            dataclasses.replace(reservation, status=CONFIRMED, expires_at=None, updated_at=now)
        )
        for line in reservation.lines or ():
            draft.show(line.key)
            if line.remaining > 0:
                draft.derive(line.key, committed=line.remaining)
    row = KeyRow(command.idempotency_key, command.operation, command.request_hash, result_ref)
    return draft.changes(answer=[r.id for r in found], key_row=row)


def reorder_point(
    stock: Stock, command: SetReorderPoint | ClearReorderPoint, now: datetime
) -> Decision:
    """Set or clear a balance's reorder point (section 15). Setting one on a never-stocked SKU
    creates its empty balance (and registers an unknown location, as a restock does);
    clearing one of a balance that does not exist is a ValidationError. No entry, no version
    change, no event: the stored alert state changes only when stock moves; ``lowStock``
    shows what is low now. The key row names the balance (``location`` U+001F ``sku``)."""
    draft = Draft(stock, now, command.idempotency_key)
    key = (command.location, command.sku)
    if isinstance(command, ClearReorderPoint):
        if draft.stock.balance(key) is None:
            return Refusal(
                ValidationError(f"no balance of {command.sku} at {command.location}", "sku")
            )
        draft.configure(key, None)
    else:
        unavailable = _location_check(draft, command.location, registers=True, needs_active=False)
        if unavailable is not None:
            return Refusal(unavailable)
        draft.configure(key, command.reorder)
    ref = f"{command.location}{BALANCE_KEY_SEPARATOR}{command.sku}"
    return draft.changes(
        key_row=KeyRow(command.idempotency_key, command.operation, command.request_hash, ref)
    )


def create_location(stock: Stock, command: CreateLocation, now: datetime) -> Decision:
    """Register a location: its code must be new in the org (a ValidationError otherwise;
    rename or reactivate with :func:`update_location`). It starts active."""
    draft = Draft(stock, now, command.idempotency_key)
    if draft.location(command.code) is not None:
        return Refusal(ValidationError(f"location {command.code!r} already exists", "code"))
    draft.register(Location(command.code, command.name, command.type, True, now, now))
    return draft.changes(key_row=_location_key_row(command))


def update_location(stock: Stock, command: UpdateLocation, now: datetime) -> Decision:
    """Rename, deactivate or reactivate a location (NotFoundError when it is not registered).
    Deactivating leaves its stock where it is: it can still be released, deducted, adjusted
    or moved out (section 14)."""
    draft = Draft(stock, now, command.idempotency_key)
    found = draft.location(command.code)
    if found is None:
        return Refusal(NotFoundError("Location", command.code))
    draft.register(
        dataclasses.replace(
            found,
            name=found.name if command.name is None else command.name,
            active=found.active if command.active is None else command.active,
            updated_at=now,
        )
    )
    return draft.changes(key_row=_location_key_row(command))


def transfer(stock: Stock, command: TransferStock, now: datetime, transfer_id: int) -> Decision:
    """TRANSFER q per line: available >= q at the source on every line, else nothing
    (reserved units stay where they are; due holds there are expired first, as for a
    reserve). TRANSFER_OUT at the source; immediate: TRANSFER_IN at the destination and the
    transfer is RECEIVED; ``in_transit``: IN_TRANSIT, the destination balance created if
    missing (nothing on hand, no entry) so it shows the units as incoming.

    The destination must take stock (active; an unknown one is registered, unless locations
    must be); the source may be inactive but must be registered where locations must be.
    """
    draft = Draft(stock, now, command.idempotency_key)
    for code, needs_active in ((command.from_location, False), (command.to_location, True)):
        unavailable = _location_check(draft, code, registers=False, needs_active=needs_active)
        if unavailable is not None:
            return Refusal(unavailable)
    shortages = _short_lines(stock, draft, command.cart)
    if shortages:  # what it still commits is the expiries alone: no location registered
        return Refusal(InsufficientStockError(shortages), _committed(draft))
    if draft.location(command.to_location) is None:
        draft.register_unknown(command.to_location)
    lines = []
    for line in command.cart.lines:
        destination = (command.to_location, line.sku)
        if not command.in_transit and (
            draft.balance(destination).on_hand + line.quantity > MAX_BALANCE
        ):
            return Refusal(
                ValidationError(
                    f"on hand of {command.to_location}/{line.sku} would exceed {MAX_BALANCE}",
                    command.cart.path(line.key, "quantity"),
                )
            )
        lines.append(TransferLine(line.sku, line.quantity, 0, 0))
    moved = Transfer(
        id=transfer_id,
        status=IN_TRANSIT,
        from_location=command.from_location,
        to_location=command.to_location,
        lines=tuple(lines),
        reference=command.reference,
        reason=command.reason,
        created_at=now,
        updated_at=now,
    )
    for sent in moved.lines:
        _transfer_move(
            draft, moved, command.from_location, sent.sku, "TRANSFER_OUT", -sent.quantity
        )
    if command.in_transit:
        for sent in moved.lines:
            draft.derive((command.to_location, sent.sku), incoming=sent.quantity)
    else:
        for sent in moved.lines:
            _transfer_move(
                draft, moved, command.to_location, sent.sku, "TRANSFER_IN", sent.quantity
            )
        moved = dataclasses.replace(
            moved,
            status=RECEIVED,
            lines=tuple(dataclasses.replace(ln, received=ln.quantity) for ln in moved.lines),
        )
    draft.save_transfer(moved)
    return draft.changes(answer=(transfer_id,), key_row=key_row(command))


def receive_transfer(stock: Stock, command: ReceiveTransfer, now: datetime) -> Decision:
    """RECEIVE: TRANSFER_IN at the destination of each line's units (no lines: everything
    remaining), at most the line's remaining (a ValidationError naming the line otherwise,
    section 11 "Over-asking"). The transfer must be open (TransferNotOpenError) and the
    destination active (LocationUnavailableError). It is RECEIVED once nothing remains, else
    PARTIALLY_RECEIVED."""
    draft = Draft(stock, now, command.idempotency_key)
    found = _open_transfer(draft, command.transfer_id)
    if isinstance(found, Refusal):
        return found
    unavailable = _location_check(draft, found.to_location, registers=False, needs_active=True)
    if unavailable is not None:
        return Refusal(unavailable)
    if command.lines is None:
        wanted = {ln.sku: ln.remaining for ln in found.lines if ln.remaining > 0}
    else:
        asked = command.lines
        wanted = {ln.sku: ln.quantity for ln in asked.lines}
        by_sku = {ln.sku: ln for ln in found.lines}
        for ask in asked.lines:
            line = by_sku.get(ask.sku)
            if line is None:
                return Refusal(
                    ValidationError(f"the transfer moves no {ask.sku}", asked.path(ask.key, "sku"))
                )
            if ask.quantity > line.remaining:
                return Refusal(
                    ValidationError(
                        f"only {line.remaining} units of {ask.sku} remain in transit, "
                        f"{ask.quantity} asked",
                        asked.path(ask.key, "quantity"),
                    )
                )
    lines = []
    for line in found.lines:
        q = wanted.get(line.sku, 0)
        if q:
            key = (found.to_location, line.sku)
            if draft.balance(key).on_hand + q > MAX_BALANCE:
                return Refusal(
                    ValidationError(
                        f"on hand of {found.to_location}/{line.sku} would exceed {MAX_BALANCE}",
                        "lines",
                    )
                )
            _transfer_move(draft, found, found.to_location, line.sku, "TRANSFER_IN", q)
            draft.derive(key, incoming=-q)
            draft.show((found.from_location, line.sku))  # the result lists both ends
            line = dataclasses.replace(line, received=line.received + q)
        lines.append(line)
    status = RECEIVED if all(ln.remaining == 0 for ln in lines) else PARTIALLY_RECEIVED
    draft.save_transfer(
        dataclasses.replace(found, status=status, lines=tuple(lines), updated_at=now)
    )
    row = KeyRow(command.idempotency_key, command.operation, command.request_hash, str(found.id))
    return draft.changes(answer=(found.id,), key_row=row)


def cancel_transfer(stock: Stock, command: CancelTransfer, now: datetime) -> Decision:
    """CANCEL: every unit still in transit goes back to the source (TRANSFER_IN there, even
    when the source is inactive: section 14), counted as ``returned``; the transfer is
    CANCELLED. It must be open (TransferNotOpenError)."""
    draft = Draft(stock, now, command.idempotency_key)
    found = _open_transfer(draft, command.transfer_id)
    if isinstance(found, Refusal):
        return found
    lines = []
    for line in found.lines:
        if line.remaining > 0:
            key = (found.from_location, line.sku)
            if draft.balance(key).on_hand + line.remaining > MAX_BALANCE:
                return Refusal(
                    ValidationError(
                        f"on hand of {found.from_location}/{line.sku} would exceed {MAX_BALANCE}",
                        "transferId",
                    )
                )
            _transfer_move(
                draft,
                found,
                found.from_location,
                line.sku,
                "TRANSFER_IN",
                line.remaining,
                reason=command.reason,
            )
            draft.derive((found.to_location, line.sku), incoming=-line.remaining)
            line = dataclasses.replace(line, returned=line.returned + line.remaining)
        lines.append(line)
    draft.save_transfer(
        dataclasses.replace(found, status=CANCELLED, lines=tuple(lines), updated_at=now)
    )
    row = KeyRow(command.idempotency_key, command.operation, command.request_hash, str(found.id))
    return draft.changes(answer=(found.id,), key_row=row)


def expire(stock: Stock, command: Expire, now: datetime) -> Changes:
    """EXPIRE: a reservation ACTIVE and due (now >= expires_at) gives its remaining back.

    Anything else (not found, not ACTIVE, not yet due) changes nothing: expiry is idempotent.
    """
    draft = Draft(stock, now, command.idempotency_key)
    reservation = stock.reservation(command.reservation_id)
    if reservation is None or not reservation.is_due(now):
        return draft.changes()
    _expire(draft, reservation)
    return draft.changes(answer=(reservation.id,))


# ---------------------------------------------------------------------------- shared steps


def _codes(cart: Cart) -> list[str]:
    """The locations of a cart's lines, each once, in line order."""
    return list(dict.fromkeys(line.location for line in cart.lines))


def _location_check(
    draft: Draft, code: str, *, registers: bool, needs_active: bool
) -> LocationUnavailableError | None:
    """Whether a write may name location ``code`` (section 14). Unknown: where locations
    must be registered, LocationUnavailableError (``exists`` False; never for ``default``,
    which every org has); else ``registers``
    (restock, adjust, transfer to) registers it, and otherwise the write goes on and finds
    nothing there (a reserve is then short). Inactive: LocationUnavailableError when the
    write ``needs_active`` (restock, transfer in, receipt, reserve)."""
    found = draft.location(code)
    if found is None:
        # Every org has `default` (section 14): one that came after the migration is never
        # refused it, and gets it registered by the first write that registers.
        if draft.stock.locations_required and code != DEFAULT_LOCATION:
            return LocationUnavailableError(code, exists=False)
        if registers:
            draft.register_unknown(code)
        return None
    if needs_active and not found.active:
        return LocationUnavailableError(code, exists=True)
    return None


def _location_key_row(command: CreateLocation | UpdateLocation) -> KeyRow:
    """A location command's key row: it writes no ledger entry, so the row names the code."""
    return KeyRow(command.idempotency_key, command.operation, command.request_hash, command.code)


def _open_transfer(draft: Draft, transfer_id: int) -> Transfer | Refusal:
    """The open transfer a receive or cancel acts on: NotFoundError, or TransferNotOpenError
    when it is RECEIVED or CANCELLED."""
    found = draft.transfer(transfer_id)
    if found is None:
        return Refusal(NotFoundError("Transfer", str(transfer_id)))
    if not found.open:
        return Refusal(TransferNotOpenError(found.id, found.status))
    return found


def _transfer_move(
    draft: Draft,
    moved: Transfer,
    location: str,
    sku: str,
    event_type: str,
    on_hand_delta: int,
    *,
    reason: str | None = None,
) -> None:
    """One TRANSFER_OUT or TRANSFER_IN entry of ``moved`` (it carries the transfer's id and
    reference)."""
    draft.move(
        (location, sku),
        event_type,
        on_hand_delta,
        0,
        reference=moved.reference,
        reason=reason if reason is not None else moved.reason,
        transfer_id=moved.id,
    )


def _expire(draft: Draft, reservation: Reservation) -> None:
    """Move each line's remaining into ``released`` (reserved -= remaining) and set status
    EXPIRED. The entries carry the key ``expire:<id>`` (section 11, "Expiry")."""
    lines = []
    for line in reservation.lines or ():
        if line.remaining > 0:
            draft.move(
                line.key,
                "EXPIRE",
                0,
                -line.remaining,
                reservation_id=reservation.id,
                reference=reservation.reference,
                idempotency_key=expire_key(reservation.id),
            )
            line = dataclasses.replace(line, released=line.released + line.remaining)
        lines.append(line)
    draft.save(
        dataclasses.replace(reservation, status=EXPIRED, updated_at=draft.now, lines=tuple(lines))
    )


def _short_lines(stock: Stock, draft: Draft, cart: Cart) -> list[Shortage]:
    """The lines whose available is below their quantity, after expiring the due
    reservations that hold those balances (a reserve or direct deduct that finds a line short
    first expires them, in the same transaction, so expired holds never refuse a cart)."""

    def available(key: BalanceKey) -> int:
        return draft.balance(key).available

    short = shortages(cart, available)
    if short:
        for reservation in stock.due_holding([(s.location, s.sku) for s in short], draft.now):
            _expire(draft, reservation)
        short = shortages(cart, available)
    return short


def shortages(cart: Cart, available: Callable[[BalanceKey], int]) -> list[Shortage]:
    """The lines of ``cart`` asking more than ``available(key)`` (units of stock), in cart
    order; a Shortage shows a negative available (on hand adjusted below reserved) as 0."""
    out = []
    for line in cart.lines:
        units = available(line.key)
        if units < line.quantity:
            out.append(Shortage(line.sku, line.location, line.quantity, max(units, 0)))
    return out


def _committed(draft: Draft) -> Changes | None:
    """What a refused command still commits: the expiries it made on the way, if any."""
    return draft.changes() if draft.touched else None


def _addressed(
    stock: Stock,
    draft: Draft,
    reservation_id: int | None,
    reference: Reference | None,
    now: datetime,
    statuses: tuple[str, ...],
) -> list[Reservation] | Refusal:
    """The reservations of ``statuses`` a release, deduct, extend or confirm acts on, oldest
    first (release and deduct: ACTIVE or CONFIRMED; extend and confirm: ACTIVE, section 14).

    By id: NotFoundError, ReservationNotActiveError (another status), or, when it is past
    due but not yet swept, it is expired and the call refused with status EXPIRED (that
    expiry commits). By reference: the due ones are expired and the rest acted on; none of
    ``statuses`` is NotFoundError (``TYPE:ID``), and so is none left after expiring, with the
    expiry committed.
    """
    if reservation_id is not None:
        reservation = draft.reservation(reservation_id)
        if reservation is None:
            return Refusal(NotFoundError("Reservation", str(reservation_id)))
        if reservation.status not in statuses:
            return Refusal(ReservationNotActiveError(reservation.id, reservation.status))
        if reservation.is_due(now):
            _expire(draft, reservation)
            return Refusal(ReservationNotActiveError(reservation.id, EXPIRED), draft.changes())
        return [reservation]
    assert reference is not None  # the command constructors require one of the two
    rows = [r for r in stock.by_reference(reference) if r.status in statuses]
    if not rows:
        return Refusal(NotFoundError("Reservation", str(reference)))
    for reservation in rows:
        if reservation.is_due(now):
            _expire(draft, reservation)
    active = [r for r in rows if not r.is_due(now)]
    if not active:
        return Refusal(NotFoundError("Reservation", str(reference)), draft.changes())
    return active


def _take(
    reservations: list[Reservation], cart: Cart | None
) -> dict[int, dict[BalanceKey, int]] | Refusal:
    """Units to take per reservation and balance: everything remaining, or each line's
    quantity from the reservations in order. Asking more than remains, or for a balance they
    do not hold, is a ValidationError naming the line (section 11, "Over-asking")."""
    take: dict[int, dict[BalanceKey, int]] = {}
    if cart is None:
        for reservation in reservations:
            for line in reservation.lines or ():
                if line.remaining > 0:
                    take.setdefault(reservation.id, {})[line.key] = line.remaining
        return take
    for wanted in cart.lines:
        need, held = wanted.quantity, 0
        for reservation in reservations:
            held_line = next((ln for ln in reservation.lines or () if ln.key == wanted.key), None)
            if held_line is None:
                continue
            held += held_line.remaining
            q = min(held_line.remaining, need)
            if q > 0:
                take.setdefault(reservation.id, {})[wanted.key] = q
                need -= q
        if need > 0:
            where = f"{wanted.location}/{wanted.sku}"
            if held == 0:
                return Refusal(
                    ValidationError(
                        f"the reservation holds nothing of {where}", cart.path(wanted.key, "sku")
                    )
                )
            return Refusal(
                ValidationError(
                    f"only {held} units of {where} remain reserved, {wanted.quantity} asked",
                    cart.path(wanted.key, "quantity"),
                )
            )
    return take
