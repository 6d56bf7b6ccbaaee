"""Input rules of ARCHITECTURE section 11, applied before anything touches the database.

Every function raises :class:`~stockledger.domain.errors.ValidationError` naming the input
path at fault (GraphQL field names, e.g. ``lines.0.quantity``) and returns normalized values.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stockledger.domain.errors import ValidationError
from stockledger.domain.ids import RESERVATION, typed_number_of
from stockledger.domain.model import EXPIRE_KEY_PREFIX, BalanceKey, Line, Reference

MAX_STRING_LENGTH = 255
MAX_QUANTITY = 1_000_000_000  # per line (section 11)
MAX_LINES = 500  # per input (section 11)
MAX_BATCH_ITEMS = 500  # items of one reserveMany / deductMany / releaseMany (part BATCH)
MAX_BATCH_LINES = 5000  # lines of all its items together
# GraphQL Int is a signed 32-bit integer (GraphQL spec, "Int"); a balance above it could not
# be returned, so a change that would push on_hand past it is refused.
MAX_BALANCE = 2**31 - 1


def check_string(value: Any, field: str) -> str:
    """1 to 255 characters, not blank, no control characters (Unicode Cc) and no lone
    surrogates (Cs). Returned unchanged."""
    if not isinstance(value, str):
        raise ValidationError("must be a string", field)
    if not value:
        raise ValidationError("must not be empty", field)
    if len(value) > MAX_STRING_LENGTH:
        raise ValidationError(f"must be at most {MAX_STRING_LENGTH} characters", field)
    if not value.strip():
        raise ValidationError("must not be blank", field)
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise ValidationError("must not contain control characters", field)
    # Lone surrogates (Cs) cannot be encoded as UTF-8, so no database could store them.
    if any(unicodedata.category(ch) == "Cs" for ch in value):
        raise ValidationError("must not contain lone surrogates (not valid Unicode text)", field)
    return value


def check_key(value: Any, field: str = "idempotencyKey") -> str:
    """An idempotency key: a string per :func:`check_string`, not starting with ``expire:``."""
    key = check_string(value, field)
    if key.startswith(EXPIRE_KEY_PREFIX):
        raise ValidationError(f"keys starting with {EXPIRE_KEY_PREFIX!r} are reserved", field)
    return key


def check_quantity(value: Any, field: str, *, maximum: int = MAX_QUANTITY) -> int:
    """A positive integer number of units, at most ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("must be an integer", field)
    if value <= 0:
        raise ValidationError("must be positive", field)
    if value > maximum:
        raise ValidationError(f"must be at most {maximum}", field)
    return value


def check_reference(value: Reference | None, field: str = "reference") -> Reference | None:
    """A reference whose type and id are valid strings, or None."""
    if value is None:
        return None
    return Reference(
        check_string(value.type, f"{field}.type"), check_string(value.id, f"{field}.id")
    )


@dataclass(frozen=True, slots=True)
class Cart:
    """Validated lines: summed per (location, sku) and sorted by key (the lock order).

    ``first_index`` maps each key to the index of its first line in the input, so an error
    about a merged line can name the input path the client sent (``lines.<i>.<field>``).
    """

    lines: tuple[Line, ...]
    first_index: Mapping[BalanceKey, int]
    field: str = "lines"

    def path(self, key: BalanceKey, attr: str) -> str:
        """The input path of ``attr`` on the first line of ``key``, e.g. ``lines.2.quantity``."""
        return f"{self.field}.{self.first_index[key]}.{attr}"

    def keys(self) -> list[BalanceKey]:
        return [line.key for line in self.lines]


def check_lines(lines: Any, field: str = "lines") -> Cart:
    """1 to 500 lines, each valid; lines for the same (location, sku) summed; sorted by key.

    Raises ValidationError naming the line at fault (or ``lines`` itself when missing, empty
    or too long).
    """
    if lines is None:
        raise ValidationError("is required", field)
    if len(lines) == 0:
        raise ValidationError("must not be empty", field)
    if len(lines) > MAX_LINES:
        raise ValidationError(f"must have at most {MAX_LINES} lines, got {len(lines)}", field)
    merged: dict[BalanceKey, int] = {}
    first_index: dict[BalanceKey, int] = {}
    for i, line in enumerate(lines):
        sku = check_string(line.sku, f"{field}.{i}.sku")
        location = check_string(line.location, f"{field}.{i}.location")
        qty = check_quantity(line.quantity, f"{field}.{i}.quantity")
        key = (location, sku)
        first_index.setdefault(key, i)
        merged[key] = merged.get(key, 0) + qty
        if merged[key] > MAX_QUANTITY:
            raise ValidationError(
                f"lines for {location}/{sku} add up to more than {MAX_QUANTITY}",
                f"{field}.{first_index[key]}.quantity",
            )
    return Cart(
        tuple(Line(sku=sku, location=loc, quantity=q) for (loc, sku), q in sorted(merged.items())),
        first_index,
        field,
    )


def check_batch(items: int, lines: int, field: str) -> None:
    """A batch call's size: at most 500 items and 5,000 lines in all (schema-v2, part BATCH).
    Raises ValidationError naming ``field`` (the list) before any item is looked at."""
    if items > MAX_BATCH_ITEMS:
        raise ValidationError(f"must have at most {MAX_BATCH_ITEMS} items, got {items}", field)
    if lines > MAX_BATCH_LINES:
        raise ValidationError(
            f"must have at most {MAX_BATCH_LINES} lines in all, got {lines}", field
        )


def check_ttl(value: Any, maximum: int, field: str = "ttlSeconds") -> int:
    """A TTL in seconds from 1 to ``maximum`` (never clamped)."""
    return check_quantity(value, field, maximum=maximum)


def check_reservation_id(value: Any, field: str = "reservationId") -> str:
    """A reservation id as given (a string, per :func:`check_string`); an id that names no
    reservation (see :func:`parse_reservation_id`) is simply not found later."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return check_string(value, field)


def parse_reservation_id(value: str) -> int | None:
    """The reservation number behind an ``ID`` string, or None when it cannot name one.

    Accepted: the opaque global id of a Reservation (``domain/ids.py``), and the v1 numeric id
    (ASCII digits, at most 18; deprecated, accepted until v3). Anything else, another type's
    global id included, is None (the callers answer NotFoundError or nothing found).
    """
    if value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    return typed_number_of(RESERVATION, value)


def canonical_reservation_id(value: str) -> str:
    """The spelling of a checked reservation id that the idempotency hash covers: the number's
    decimal digits whether the client sent the global id or the v1 numeric id (so a retry
    that switches spelling replays), else the text as given (it names no reservation)."""
    number = parse_reservation_id(value)
    return value if number is None else str(number)


def request_hash(operation: str, payload: dict[str, Any]) -> str:
    """SHA-256 (hex) of the normalized request, the idempotency payload of section 11."""
    text = json.dumps([operation, payload], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def lines_payload(cart: Cart | None) -> list[list[Any]] | None:
    """Merged lines as JSON-able ``[location, sku, quantity]`` triples for :func:`request_hash`."""
    if cart is None:
        return None
    return [[line.location, line.sku, line.quantity] for line in cart.lines]


def reference_payload(ref: Reference | None) -> list[str] | None:
    """A reference as a JSON-able pair for :func:`request_hash`."""
    return None if ref is None else [ref.type, ref.id]
