"""The write commands, each built from a client's input by a ``validated`` constructor.

A constructor applies the input rules of ARCHITECTURE section 11 (``domain/validation.py``)
and computes the idempotency payload hash (section 11, "Idempotency payload"): it raises
:class:`~stockledger.domain.errors.ValidationError` (or NotFoundError for a reservation id that
is no number) before anything touches a store, so an invalid request never touches a key. A
built command is what the rules (``domain/rules.py``) decide on.

Quantities are units of stock, TTLs seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from stockledger.domain.errors import NotFoundError, ValidationError
from stockledger.domain.ids import TRANSFER, typed_number_of
from stockledger.domain.model import (
    LOCATION_TYPES,
    BalanceKey,
    Line,
    Reference,
    ReorderPoint,
    expire_key,
)
from stockledger.domain.validation import (
    MAX_BALANCE,
    MAX_QUANTITY,
    Cart,
    canonical_reservation_id,
    check_key,
    check_lines,
    check_quantity,
    check_reference,
    check_reservation_id,
    check_string,
    check_ttl,
    lines_payload,
    parse_reservation_id,
    reference_payload,
    request_hash,
)


def _integer(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("must be an integer", field)
    return value


def _reservation_number(text: str) -> int:
    """The number behind a checked id string; NotFoundError when it is no number (such an id
    can name no reservation). Called after the whole input is validated."""
    number = parse_reservation_id(text)
    if number is None:
        raise NotFoundError("Reservation", text)
    return number


@dataclass(frozen=True, slots=True)
class Restock:
    """RESTOCK: ``on_hand += quantity`` per line, creating balances on first restock."""

    operation: ClassVar[str] = "restock"
    idempotency_key: str
    cart: Cart
    reference: Reference | None
    reason: str | None
    request_hash: str

    @classmethod
    def validated(
        cls,
        idempotency_key: Any,
        lines: Any,
        *,
        reference: Reference | None = None,
        reason: Any = None,
    ) -> Restock:
        key = check_key(idempotency_key)
        cart = check_lines(lines)
        reference = check_reference(reference)
        if reason is not None:
            reason = check_string(reason, "reason")
        payload = {
            "lines": lines_payload(cart),
            "reference": reference_payload(reference),
            "reason": reason,
        }
        return cls(key, cart, reference, reason, request_hash(cls.operation, payload))

    def balance_keys(self) -> list[BalanceKey]:
        return self.cart.keys()


@dataclass(frozen=True, slots=True)
class Adjust:
    """ADJUST: ``on_hand += delta`` or ``on_hand = set_on_hand`` (exactly one), with a reason.

    ``expected_version`` (optional) makes it a compare-and-set on the balance's version.
    """

    operation: ClassVar[str] = "adjust"
    idempotency_key: str
    sku: str
    location: str
    delta: int | None
    set_on_hand: int | None
    expected_version: int | None
    reason: str
    reference: Reference | None
    request_hash: str

    @classmethod
    def validated(
        cls,
        idempotency_key: Any,
        sku: Any,
        location: Any = "default",
        *,
        delta: Any = None,
        set_on_hand: Any = None,
        expected_version: Any = None,
        reason: Any,
        reference: Reference | None = None,
    ) -> Adjust:
        key = check_key(idempotency_key)
        sku = check_string(sku, "sku")
        location = check_string(location, "location")
        reason = check_string(reason, "reason")
        reference = check_reference(reference)
        if (delta is None) == (set_on_hand is None):
            raise ValidationError("give exactly one of delta and setOnHand", "delta")
        if delta is not None and abs(_integer(delta, "delta")) > MAX_QUANTITY:
            raise ValidationError(f"must be between -{MAX_QUANTITY} and {MAX_QUANTITY}", "delta")
        if set_on_hand is not None and not 0 <= _integer(set_on_hand, "setOnHand") <= MAX_BALANCE:
            raise ValidationError(f"must be between 0 and {MAX_BALANCE}", "setOnHand")
        if expected_version is not None and (
            isinstance(expected_version, bool)
            or not isinstance(expected_version, int)
            or expected_version < 0
        ):
            raise ValidationError("must be a non-negative integer", "expectedVersion")
        payload = {
            "sku": sku,
            "location": location,
            "delta": delta,
            "setOnHand": set_on_hand,
            "expectedVersion": expected_version,
            "reason": reason,
            "reference": reference_payload(reference),
        }
        return cls(
            key,
            sku,
            location,
            delta,
            set_on_hand,
            expected_version,
            reason,
            reference,
            request_hash(cls.operation, payload),
        )

    def balance_keys(self) -> list[BalanceKey]:
        return [(self.location, self.sku)]


@dataclass(frozen=True, slots=True)
class Reserve:
    """RESERVE a cart for ``ttl_seconds``: ``reserved += quantity`` on every line, or nothing."""

    operation: ClassVar[str] = "reserve"
    idempotency_key: str
    cart: Cart
    reference: Reference | None
    ttl_seconds: int
    request_hash: str

    @classmethod
    def validated(
        cls,
        idempotency_key: Any,
        lines: Any,
        *,
        reference: Reference | None = None,
        ttl_seconds: Any = None,
        default_ttl_seconds: int,
        max_ttl_seconds: int,
    ) -> Reserve:
        """``ttl_seconds`` None means the server default (which the payload hash records)."""
        key = check_key(idempotency_key)
        cart = check_lines(lines)
        reference = check_reference(reference)
        ttl = default_ttl_seconds if ttl_seconds is None else ttl_seconds
        ttl = check_ttl(ttl, max_ttl_seconds)
        payload = {
            "lines": lines_payload(cart),
            "reference": reference_payload(reference),
            "ttl": ttl,
        }
        return cls(key, cart, reference, ttl, request_hash(cls.operation, payload))

    def balance_keys(self) -> list[BalanceKey]:
        return self.cart.keys()


@dataclass(frozen=True, slots=True)
class Release:
    """RELEASE units held by a reservation (by id) or by every ACTIVE or CONFIRMED reservation
    with a reference, oldest first. ``cart`` None: everything remaining."""

    operation: ClassVar[str] = "release"
    idempotency_key: str
    reservation_id: int | None
    reference: Reference | None
    cart: Cart | None
    request_hash: str

    @classmethod
    def validated(
        cls,
        idempotency_key: Any,
        *,
        reservation_id: Any = None,
        reference: Reference | None = None,
        lines: Any = None,
    ) -> Release:
        key, rid, reference, cart, rhash = _consume_input(
            cls.operation, idempotency_key, reservation_id, reference, lines
        )
        return cls(key, rid, reference, cart, rhash)


@dataclass(frozen=True, slots=True)
class Deduct:
    """DEDUCT units held by a reservation (by id) or by reference: they leave on hand.
    ``cart`` None: everything remaining."""

    operation: ClassVar[str] = "deduct"
    idempotency_key: str
    reservation_id: int | None
    reference: Reference | None
    cart: Cart | None
    request_hash: str

    @classmethod
    def validated(
        cls,
        idempotency_key: Any,
        *,
        reservation_id: Any = None,
        reference: Reference | None = None,
        lines: Any = None,
    ) -> Deduct | DeductDirect:
        """With neither ``reservation_id`` nor ``reference``: a :class:`DeductDirect`."""
        if reservation_id is None and reference is None:
            return DeductDirect.validated(idempotency_key, lines)
        key, rid, reference, cart, rhash = _consume_input(
            cls.operation, idempotency_key, reservation_id, reference, lines
        )
        return cls(key, rid, reference, cart, rhash)


def _consume_input(
    operation: str,
    idempotency_key: Any,
    reservation_id: Any,
    reference: Reference | None,
    lines: Any,
) -> tuple[str, int | None, Reference | None, Cart | None, str]:
    key = check_key(idempotency_key)
    if (reservation_id is None) == (reference is None):
        raise ValidationError("give exactly one of reservationId and reference", "reservationId")
    rid_text = None if reservation_id is None else check_reservation_id(reservation_id)
    reference = check_reference(reference)
    cart = None if lines is None else check_lines(lines)
    payload = {
        "reservationId": None if rid_text is None else canonical_reservation_id(rid_text),
        "reference": reference_payload(reference),
        "lines": lines_payload(cart),
    }
    rhash = request_hash(operation, payload)
    rid = None if rid_text is None else _reservation_number(rid_text)
    return key, rid, reference, cart, rhash


@dataclass(frozen=True, slots=True)
class DeductDirect:
    """DEDUCT straight from available stock: ``on_hand -= quantity`` on every line, or none."""

    operation: ClassVar[str] = "deduct"
    idempotency_key: str
    cart: Cart
    request_hash: str

    @classmethod
    def validated(cls, idempotency_key: Any, lines: Any) -> DeductDirect:
        key = check_key(idempotency_key)
        cart = check_lines(lines)
        payload = {"reservationId": None, "reference": None, "lines": lines_payload(cart)}
        return cls(key, cart, request_hash(cls.operation, payload))

    def balance_keys(self) -> list[BalanceKey]:
        return self.cart.keys()


@dataclass(frozen=True, slots=True)
class Extend:
    """Move an ACTIVE reservation's expiry to now + ``ttl_seconds``."""

    operation: ClassVar[str] = "extend"
    idempotency_key: str
    reservation_id: int
    ttl_seconds: int
    request_hash: str
    reference: ClassVar[None] = None

    @classmethod
    def validated(
        cls, idempotency_key: Any, reservation_id: Any, ttl_seconds: Any, *, max_ttl_seconds: int
    ) -> Extend:
        key = check_key(idempotency_key)
        text = check_reservation_id(reservation_id)
        ttl = check_ttl(ttl_seconds, max_ttl_seconds)
        payload = {"reservationId": canonical_reservation_id(text), "ttl": ttl}
        rhash = request_hash(cls.operation, payload)
        return cls(key, _reservation_number(text), ttl, rhash)


@dataclass(frozen=True, slots=True)
class Confirm:
    """CONFIRM an ACTIVE reservation (by id) or every ACTIVE one with a reference: it keeps its
    lines and loses its expiry (part LOCATIONS, ARCHITECTURE section 14). No quantity changes."""

    operation: ClassVar[str] = "confirm"
    idempotency_key: str
    reservation_id: int | None
    reference: Reference | None
    request_hash: str

    @classmethod
    def validated(
        cls, idempotency_key: Any, *, reservation_id: Any = None, reference: Reference | None = None
    ) -> Confirm:
        key = check_key(idempotency_key)
        if (reservation_id is None) == (reference is None):
            raise ValidationError(
                "give exactly one of reservationId and reference", "reservationId"
            )
        rid_text = None if reservation_id is None else check_reservation_id(reservation_id)
        reference = check_reference(reference)
        rid_hashed = None if rid_text is None else canonical_reservation_id(rid_text)
        payload = {"reservationId": rid_hashed, "reference": reference_payload(reference)}
        rhash = request_hash(cls.operation, payload)
        rid = None if rid_text is None else _reservation_number(rid_text)
        return cls(key, rid, reference, rhash)


@dataclass(frozen=True, slots=True)
class Expire:
    """EXPIRE one reservation if it is ACTIVE and due; the sweeper's command.

    It writes no idempotency key row: its ledger entries carry ``expire:<id>``, and expiring
    twice finds it no longer ACTIVE.
    """

    operation: ClassVar[str] = "expire"
    reservation_id: int
    reference: ClassVar[None] = None
    request_hash: ClassVar[str] = ""

    @property
    def idempotency_key(self) -> str:
        return expire_key(self.reservation_id)


@dataclass(frozen=True, slots=True)
class CreateLocation:
    """Register location ``code`` (unique per org) with a name and a type (part LOCATIONS)."""

    operation: ClassVar[str] = "createLocation"
    idempotency_key: str
    code: str
    name: str
    type: str
    request_hash: str
    reference: ClassVar[None] = None

    @classmethod
    def validated(cls, idempotency_key: Any, code: Any, name: Any, type: Any) -> CreateLocation:
        key = check_key(idempotency_key)
        code = check_string(code, "code")
        name = check_string(name, "name")
        if type not in LOCATION_TYPES:
            raise ValidationError(f"must be one of {', '.join(LOCATION_TYPES)}", "type")
        payload = {"code": code, "name": name, "type": type}
        return cls(key, code, name, type, request_hash(cls.operation, payload))


@dataclass(frozen=True, slots=True)
class UpdateLocation:
    """Rename, deactivate or reactivate location ``code`` (at least one of the two)."""

    operation: ClassVar[str] = "updateLocation"
    idempotency_key: str
    code: str
    name: str | None
    active: bool | None
    request_hash: str
    reference: ClassVar[None] = None

    @classmethod
    def validated(
        cls, idempotency_key: Any, code: Any, *, name: Any = None, active: Any = None
    ) -> UpdateLocation:
        key = check_key(idempotency_key)
        code = check_string(code, "code")
        if name is None and active is None:
            raise ValidationError("give name or active (or both)", "name")
        if name is not None:
            name = check_string(name, "name")
        if active is not None and not isinstance(active, bool):
            raise ValidationError("must be a boolean", "active")
        payload = {"code": code, "name": name, "active": active}
        return cls(key, code, name, active, request_hash(cls.operation, payload))


RECEIPT_LOCATION = "destination"
"""Where a receipt's lines are checked: the transfer's destination, unknown before it is
loaded (only error messages show it)."""


def check_transfer_lines(lines: Any, location: str) -> Cart:
    """A transfer's or receipt's lines (objects with ``sku`` and ``quantity``, no location) as
    a :class:`Cart` at ``location``, by :func:`check_lines`' rules: 1 to 500 lines, each valid,
    lines of one SKU summed, errors naming the client's line (``lines.<i>.<field>``).

    Raises ValidationError.
    """
    if lines is None:
        return check_lines(None)
    return check_lines([Line(line.sku, line.quantity, location) for line in lines])


def sku_quantities(cart: Cart) -> list[list[Any]]:
    """[sku, units] per SKU of a transfer's or receipt's cart, in SKU order: its payload."""
    return [[line.sku, line.quantity] for line in cart.lines]


@dataclass(frozen=True, slots=True)
class TransferStock:
    """TRANSFER on-hand units from one location to another (section 14): TRANSFER_OUT at the
    source and, unless ``in_transit``, TRANSFER_IN at the destination in the same transaction.
    ``cart`` holds the source's lines (the availability rule is the source's)."""

    operation: ClassVar[str] = "transfer"
    idempotency_key: str
    from_location: str
    to_location: str
    cart: Cart
    in_transit: bool
    reference: Reference | None
    reason: str | None
    request_hash: str

    @classmethod
    def validated(
        cls,
        idempotency_key: Any,
        from_location: Any,
        to_location: Any,
        lines: Any,
        *,
        in_transit: Any = False,
        reference: Reference | None = None,
        reason: Any = None,
    ) -> TransferStock:
        key = check_key(idempotency_key)
        source = check_string(from_location, "fromLocation")
        destination = check_string(to_location, "toLocation")
        if source == destination:
            raise ValidationError("must differ from fromLocation", "toLocation")
        cart = check_transfer_lines(lines, source)  # the availability rule is the source's
        if not isinstance(in_transit, bool):
            raise ValidationError("must be a boolean", "inTransit")
        reference = check_reference(reference)
        if reason is not None:
            reason = check_string(reason, "reason")
        payload = {
            "from": source,
            "to": destination,
            "lines": sku_quantities(cart),
            "inTransit": in_transit,
            "reference": reference_payload(reference),
            "reason": reason,
        }
        rhash = request_hash(cls.operation, payload)
        return cls(key, source, destination, cart, in_transit, reference, reason, rhash)

    def balance_keys(self) -> list[BalanceKey]:
        """Source and destination balances of every SKU, sorted (the lock order)."""
        return sorted(
            {
                (loc, ln.sku)
                for ln in self.cart.lines
                for loc in (self.from_location, self.to_location)
            }
        )


@dataclass(frozen=True, slots=True)
class ReceiveTransfer:
    """RECEIVE in-transit units at the destination: TRANSFER_IN there. ``lines`` (a cart at
    :data:`RECEIPT_LOCATION`) None: every unit remaining."""

    operation: ClassVar[str] = "receiveTransfer"
    idempotency_key: str
    transfer_id: int
    lines: Cart | None
    request_hash: str
    reference: ClassVar[None] = None

    @classmethod
    def validated(
        cls, idempotency_key: Any, transfer_id: Any, lines: Any = None
    ) -> ReceiveTransfer:
        key = check_key(idempotency_key)
        text = check_string(transfer_id, "transferId")
        cart = None if lines is None else check_transfer_lines(lines, RECEIPT_LOCATION)
        number = _transfer_number(text)
        payload = {"transferId": number, "lines": None if cart is None else sku_quantities(cart)}
        return cls(key, number, cart, request_hash(cls.operation, payload))


@dataclass(frozen=True, slots=True)
class CancelTransfer:
    """CANCEL a transfer: every unit still in transit goes back to the source (TRANSFER_IN
    there), with a reason."""

    operation: ClassVar[str] = "cancelTransfer"
    idempotency_key: str
    transfer_id: int
    reason: str
    request_hash: str
    reference: ClassVar[None] = None

    @classmethod
    def validated(cls, idempotency_key: Any, transfer_id: Any, reason: Any) -> CancelTransfer:
        key = check_key(idempotency_key)
        text = check_string(transfer_id, "transferId")
        reason = check_string(reason, "reason")
        number = _transfer_number(text)
        payload = {"transferId": number, "reason": reason}
        return cls(key, number, reason, request_hash(cls.operation, payload))


@dataclass(frozen=True, slots=True)
class SetReorderPoint:
    """Set the reorder point of one balance (part EVENTS, ARCHITECTURE section 15): low when
    available <= ``reorder.minimum_level``. Creates a missing balance, empty; posts no entry."""

    operation: ClassVar[str] = "setReorderPoint"
    idempotency_key: str
    sku: str
    location: str
    reorder: ReorderPoint
    request_hash: str
    reference: ClassVar[None] = None

    @classmethod
    def validated(
        cls,
        idempotency_key: Any,
        sku: Any,
        location: Any = "default",
        *,
        minimum_level: Any,
        reorder_quantity: Any,
        maximum_level: Any = None,
    ) -> SetReorderPoint:
        """Section 15's bounds: minimumLevel >= 0, reorderQuantity >= 1, maximumLevel >=
        minimumLevel when set; each at most 2**31-1 (GraphQL Int)."""
        key = check_key(idempotency_key)
        sku = check_string(sku, "sku")
        location = check_string(location, "location")
        minimum = _integer(minimum_level, "minimumLevel")
        if not 0 <= minimum <= MAX_BALANCE:
            raise ValidationError(f"must be between 0 and {MAX_BALANCE}", "minimumLevel")
        quantity = check_quantity(reorder_quantity, "reorderQuantity", maximum=MAX_BALANCE)
        maximum = None
        if maximum_level is not None:
            maximum = _integer(maximum_level, "maximumLevel")
            if not minimum <= maximum <= MAX_BALANCE:
                raise ValidationError(
                    f"must be between minimumLevel ({minimum}) and {MAX_BALANCE}", "maximumLevel"
                )
        payload = {
            "sku": sku,
            "location": location,
            "minimumLevel": minimum,
            "reorderQuantity": quantity,
            "maximumLevel": maximum,
        }
        reorder = ReorderPoint(minimum, quantity, maximum)
        return cls(key, sku, location, reorder, request_hash(cls.operation, payload))

    def balance_keys(self) -> list[BalanceKey]:
        return [(self.location, self.sku)]


@dataclass(frozen=True, slots=True)
class ClearReorderPoint:
    """Remove the reorder point of one balance (nothing to remove: unchanged)."""

    operation: ClassVar[str] = "clearReorderPoint"
    idempotency_key: str
    sku: str
    location: str
    request_hash: str
    reference: ClassVar[None] = None

    @classmethod
    def validated(
        cls, idempotency_key: Any, sku: Any, location: Any = "default"
    ) -> ClearReorderPoint:
        key = check_key(idempotency_key)
        sku = check_string(sku, "sku")
        location = check_string(location, "location")
        rhash = request_hash(cls.operation, {"sku": sku, "location": location})
        return cls(key, sku, location, rhash)

    def balance_keys(self) -> list[BalanceKey]:
        return [(self.location, self.sku)]


def _transfer_number(text: str) -> int:
    """The number behind a transfer's opaque id (``domain/ids.py``); NotFoundError when it
    names no transfer. Called after the whole input is validated."""
    number = typed_number_of(TRANSFER, text)
    if number is None:
        raise NotFoundError("Transfer", text)
    return number


Command = (
    Restock
    | Adjust
    | Reserve
    | Release
    | Deduct
    | DeductDirect
    | Extend
    | Confirm
    | Expire
    | CreateLocation
    | UpdateLocation
    | TransferStock
    | ReceiveTransfer
    | CancelTransfer
    | SetReorderPoint
    | ClearReorderPoint
)
"""Every write command."""

ReorderCommand = SetReorderPoint | ClearReorderPoint

TransferCommand = TransferStock | ReceiveTransfer | CancelTransfer
LocationCommand = CreateLocation | UpdateLocation


def known_balance_keys(command: Command) -> list[BalanceKey]:
    """The balances a command names in its input (reservation- and transfer-addressed ones
    name none: their balances are the reservation's or the transfer's)."""
    if isinstance(
        command, Restock | Adjust | Reserve | DeductDirect | TransferStock | ReorderCommand
    ):
        return command.balance_keys()
    return []


def named_locations(command: Command) -> list[str]:
    """The location codes a command names in its input (the unit of work loads them)."""
    if isinstance(command, TransferStock):
        return [command.from_location, command.to_location]
    if isinstance(command, CreateLocation | UpdateLocation):
        return [command.code]
    return sorted({loc for loc, _sku in known_balance_keys(command)})


def addressed_reservation(command: Command) -> int | None:
    """The reservation id a command addresses, if any."""
    if isinstance(command, Release | Deduct | Extend | Confirm | Expire):
        return command.reservation_id
    return None


def addressed_transfer(command: Command) -> int | None:
    """The transfer id a receive or cancel addresses, if any."""
    if isinstance(command, ReceiveTransfer | CancelTransfer):
        return command.transfer_id
    return None


def addressed_reference(command: Command) -> Reference | None:
    """The reference whose holding (ACTIVE or CONFIRMED) reservations a release, deduct or
    confirm addresses, if any (a confirm acts on the ACTIVE ones alone)."""
    if isinstance(command, Release | Deduct | Confirm):
        return command.reference
    return None
