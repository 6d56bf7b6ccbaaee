"""Input rules of ARCHITECTURE section 11, applied before anything touches the database.

Every function raises :class:`~stockledger.services.errors.ValidationError` naming the input
path at fault (GraphQL field names, e.g. ``lines.0.quantity``) and returns normalized values.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any

from stockledger.services.errors import ValidationError
from stockledger.services.records import Line, Reference

MAX_STRING_LENGTH = 255
MAX_QUANTITY = 1_000_000_000  # per line (section 11)
MAX_LINES = 500  # per input (section 11)
# GraphQL Int is a signed 32-bit integer (GraphQL spec, "Int"); a balance above it could not
# be returned, so a change that would push on_hand past it is refused.
MAX_BALANCE = 2**31 - 1
RESERVED_KEY_PREFIX = "expire:"  # keys of the service's own EXPIRE entries


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
    if key.startswith(RESERVED_KEY_PREFIX):
        raise ValidationError(f"keys starting with {RESERVED_KEY_PREFIX!r} are reserved", field)
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


def check_lines(lines: Any, field: str = "lines") -> list[Line]:
    """1 to 500 lines, each valid; lines for the same (location, sku) summed; sorted by key.

    Returns the merged lines in (location, sku) order, the lock order of ARCHITECTURE section 4.
    """
    if lines is None:
        raise ValidationError("is required", field)
    if len(lines) == 0:
        raise ValidationError("must not be empty", field)
    if len(lines) > MAX_LINES:
        raise ValidationError(f"must have at most {MAX_LINES} lines, got {len(lines)}", field)
    merged: dict[tuple[str, str], int] = {}
    first_index: dict[tuple[str, str], int] = {}
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
    return [Line(sku=sku, location=loc, quantity=q) for (loc, sku), q in sorted(merged.items())]


def check_ttl(value: Any, maximum: int, field: str = "ttlSeconds") -> int:
    """A TTL in seconds from 1 to ``maximum`` (never clamped)."""
    return check_quantity(value, field, maximum=maximum)


def check_reservation_id(value: Any, field: str = "reservationId") -> str:
    """A reservation id as given (a string); an id that is no number is simply not found."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return check_string(value, field)


def parse_reservation_id(value: str) -> int | None:
    """The numeric id behind an ``ID`` string, or None when it cannot name a reservation."""
    if value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    return None


def request_hash(operation: str, payload: dict[str, Any]) -> str:
    """SHA-256 (hex) of the normalized request, the idempotency payload of section 11."""
    text = json.dumps([operation, payload], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def lines_payload(lines: list[Line] | None) -> list[list[Any]] | None:
    """Merged lines as JSON-able ``[location, sku, quantity]`` triples for :func:`request_hash`."""
    if lines is None:
        return None
    return [[line.location, line.sku, line.quantity] for line in lines]


def reference_payload(ref: Reference | None) -> list[str] | None:
    """A reference as a JSON-able pair for :func:`request_hash`."""
    return None if ref is None else [ref.type, ref.id]
