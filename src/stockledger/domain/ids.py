"""Opaque global ids: Relay's object identification (schema-v2, part LOCATIONS, ``Node``).

A global id is the unpadded base64url (RFC 4648, section 5) of the UTF-8 text
``<Type>:<key>``, the Relay convention: e.g. ``global_id("Reservation", "7")`` is
``UmVzZXJ2YXRpb246Nw``. The type name says which kind of object the key names, so the same key
of two types gives two different ids. Clients must treat ids as opaque strings.

Keys per type:

* ``Reservation``, ``Transfer``: the decimal number, e.g. ``"7"`` (no sign, no leading zeros).
* ``Balance``: the location, U+001F (unit separator), then the SKU. Valid locations and SKUs
  contain no control characters (``validation.check_string``), so the separator is never part
  of either.
* ``Location``: the location code as given.

Parsing never raises: anything that is not exactly an id this module could have made is None,
so that every object has one spelling of its id.
"""

from __future__ import annotations

import base64
import binascii

BALANCE = "Balance"
RESERVATION = "Reservation"
LOCATION = "Location"
TRANSFER = "Transfer"

TYPE_SEPARATOR = ":"
KEY_SEPARATOR = "\x1f"  # between a Balance key's location and SKU (a control character: Cc)

# Number keys are database ids: at most 18 decimal digits, so they fit a signed 64-bit integer.
MAX_NUMBER_DIGITS = 18
# The longest id this module makes is a Balance's: 255 + 255 characters of at most 4 UTF-8
# bytes each, plus the type and separators, about 2,050 bytes or 2,740 base64 characters.
# Longer texts are not decoded at all.
MAX_GLOBAL_ID_LENGTH = 4096


def global_id(type_name: str, key: str) -> str:
    """The opaque id of the object of type ``type_name`` (a schema type name such as
    ``"Balance"``) with ``key`` (see the module docstring): unpadded base64url of
    ``<type_name>:<key>`` in UTF-8.

    Raises ValueError when ``type_name`` is empty or contains ``:``, when ``key`` is empty, or
    when either is no valid Unicode text (a lone surrogate).
    """
    if not type_name or TYPE_SEPARATOR in type_name:
        raise ValueError(f"not a type name for a global id: {type_name!r}")
    if not key:
        raise ValueError("a global id needs a non-empty key")
    try:
        raw = f"{type_name}{TYPE_SEPARATOR}{key}".encode()
    except UnicodeEncodeError as exc:
        raise ValueError("a global id must be valid Unicode text") from exc
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def parse_global_id(text: object) -> tuple[str, str] | None:
    """``(type_name, key)`` of an id made by :func:`global_id`, or None for anything else:
    not a string, longer than :data:`MAX_GLOBAL_ID_LENGTH`, not canonical unpadded base64url
    (padding, ``+``/``/``, whitespace or stray trailing bits included), not UTF-8, or without a
    non-empty type and key. Never raises; the type name is not checked against known types."""
    if not isinstance(text, str) or not text or len(text) > MAX_GLOBAL_ID_LENGTH:
        return None
    if not text.isascii():
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    # urlsafe_b64decode skips characters outside the alphabet and ignores stray bits; only
    # the id's one canonical spelling is accepted.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != text:
        return None
    try:
        decoded = raw.decode()
    except UnicodeDecodeError:
        return None
    type_name, separator, key = decoded.partition(TYPE_SEPARATOR)
    if not separator or not type_name or not key:
        return None
    return type_name, key


def number_key(n: int) -> str:
    """The key of a numbered object (a reservation's or transfer's database id, >= 1).

    Raises ValueError for a number that is not a positive integer of at most 18 digits.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"not an object number: {n!r}")
    key = str(n)
    if len(key) > MAX_NUMBER_DIGITS:
        raise ValueError(f"not an object number: {n!r}")
    return key


def number_of(key: str) -> int | None:
    """The number of a key made by :func:`number_key`, or None (not canonical decimal digits,
    zero, or more than 18 digits). Never raises."""
    if not (key.isascii() and key.isdigit()) or len(key) > MAX_NUMBER_DIGITS:
        return None
    if key.startswith("0"):  # "0" names nothing; "07" is not the canonical spelling of 7
        return None
    return int(key)


def typed_number_of(type_name: str, text: object) -> int | None:
    """The number behind a global id of ``type_name`` whose key is a number (Reservation,
    Transfer), or None for any other text (malformed, another type, a bad number)."""
    parsed = parse_global_id(text)
    if parsed is None or parsed[0] != type_name:
        return None
    return number_of(parsed[1])


def reservation_global_id(n: int) -> str:
    """The global id of reservation number ``n``. Raises ValueError as :func:`number_key`."""
    return global_id(RESERVATION, number_key(n))


def transfer_global_id(n: int) -> str:
    """The global id of transfer number ``n``. Raises ValueError as :func:`number_key`."""
    return global_id(TRANSFER, number_key(n))


def location_global_id(code: str) -> str:
    """The global id of the location ``code``. Raises ValueError as :func:`global_id`."""
    return global_id(LOCATION, code)


def balance_key(location: str, sku: str) -> str:
    """The key of the balance of ``sku`` at ``location``: ``location + U+001F + sku``.

    Raises ValueError when either is empty or contains the separator (no valid string does).
    """
    if not location or not sku or KEY_SEPARATOR in location or KEY_SEPARATOR in sku:
        raise ValueError("a balance key needs a location and a SKU without U+001F")
    return f"{location}{KEY_SEPARATOR}{sku}"


def balance_global_id(location: str, sku: str) -> str:
    """The global id of the balance of ``sku`` at ``location``. Raises ValueError as
    :func:`balance_key` and :func:`global_id`."""
    return global_id(BALANCE, balance_key(location, sku))


def balance_key_of(key: str) -> tuple[str, str] | None:
    """``(location, sku)`` of a key made by :func:`balance_key` (the key part of a Balance
    global id), or None when it is not exactly two non-empty parts. Never raises; the parts are
    not checked against the string rules (the caller validates them)."""
    location, separator, sku = key.partition(KEY_SEPARATOR)
    if not separator or not location or not sku or KEY_SEPARATOR in sku:
        return None
    return location, sku
