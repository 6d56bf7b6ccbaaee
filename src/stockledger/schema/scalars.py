"""The ``DateTime`` scalar: ISO 8601 with an offset, always UTC on output.

Output: ``2026-11-21T10:00:00+00:00`` (microseconds appear when there are any). Input: an
ISO 8601 string that carries an offset (``Z`` or ``+hh:mm``); a time without one is refused,
since "10:00" in an unknown zone could be any instant.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import strawberry
from strawberry.types.scalar import ScalarDefinition


def serialize_datetime(value: datetime) -> str:
    """An aware datetime as UTC ISO 8601 with ``+00:00``; a naive one is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def parse_datetime(value: Any) -> datetime:
    """An ISO 8601 string with an offset as an aware UTC datetime.

    Raises ValueError (GraphQL reports it as an invalid value) for anything else.
    """
    if not isinstance(value, str):
        raise ValueError("DateTime must be an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"DateTime {value[:64]!r} is not ISO 8601") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(f"DateTime {value[:64]!r} has no UTC offset; add one, e.g. Z or +00:00")
    return parsed.astimezone(UTC)


DateTimeScalar: ScalarDefinition = strawberry.scalar(
    name="DateTime",
    description="ISO 8601 with offset, always UTC on output, e.g. 2026-11-21T10:00:00+00:00",
    serialize=serialize_datetime,
    parse_value=parse_datetime,
)

# For StrawberryConfig(scalar_map=...): every ``datetime`` field and argument uses it.
SCALAR_MAP: dict[object, ScalarDefinition] = {datetime: DateTimeScalar}
