"""API keys as plain values: scopes, roles, the secret's format, and when a key may be used.

The rules of ARCHITECTURE section 13 and the contract's ``Scope`` and ``Role`` enums (part
ACCESS of ``schema-v2.graphql``):

- a secret is ``sl_`` followed by 40 base62 characters; the service stores its SHA-256 (a
  high-entropy secret needs no slow hash) and a display prefix, never the secret;
- a role is a preset of scopes, stored as its scopes; ADMIN implies every scope;
- a key may be used while it is neither revoked nor past its expiry;
- a key is made with exactly one of a role and a list of scopes (:func:`granted_scopes`);
- a key for another org than the caller's only by an ADMIN key of org ``system``
  (:func:`may_create_key_for`).

Pure: no I/O. Drawing a secret's randomness is the caller's (``services/api_keys.py``).
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from stockledger.domain.errors import ValidationError

SECRET_PREFIX = "sl_"
SECRET_LENGTH = 40  # base62 characters after the prefix: about 238 bits
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DISPLAY_LENGTH = len(SECRET_PREFIX) + 8  # e.g. "sl_3fA9xK2q": enough to tell keys apart
# The operator's org: only its ADMIN keys (made with the CLI) may make keys for other orgs.
SYSTEM_ORG = "system"
_SECRET = re.compile(rf"{SECRET_PREFIX}[0-9A-Za-z]{{{SECRET_LENGTH}}}")


class Scope(enum.Enum):
    """What a key may do (the contract's ``Scope``)."""

    STOCK_READ = "STOCK_READ"
    RESERVATIONS_WRITE = "RESERVATIONS_WRITE"
    STOCK_WRITE = "STOCK_WRITE"
    LEDGER_READ = "LEDGER_READ"
    APPROVE_SUPERVISOR = "APPROVE_SUPERVISOR"
    APPROVE_CONTROLLER = "APPROVE_CONTROLLER"
    ADMIN = "ADMIN"


class Role(enum.Enum):
    """Presets of scopes (the contract's ``Role``); a key stores the scopes, not the role."""

    STOREFRONT = "STOREFRONT"
    OPERATOR = "OPERATOR"
    AUDITOR = "AUDITOR"
    SUPERVISOR = "SUPERVISOR"
    CONTROLLER = "CONTROLLER"
    ADMIN = "ADMIN"


_STOREFRONT = frozenset({Scope.STOCK_READ, Scope.RESERVATIONS_WRITE})
_OPERATOR = _STOREFRONT | {Scope.STOCK_WRITE, Scope.LEDGER_READ}
ROLE_SCOPES: dict[Role, frozenset[Scope]] = {
    Role.STOREFRONT: _STOREFRONT,
    Role.OPERATOR: _OPERATOR,
    Role.AUDITOR: frozenset({Scope.STOCK_READ, Scope.LEDGER_READ}),
    Role.SUPERVISOR: _OPERATOR | {Scope.APPROVE_SUPERVISOR},
    Role.CONTROLLER: _OPERATOR | {Scope.APPROVE_SUPERVISOR, Scope.APPROVE_CONTROLLER},
    Role.ADMIN: frozenset({Scope.ADMIN}),
}


def effective(granted: frozenset[Scope]) -> frozenset[Scope]:
    """The scopes a key acts with: ``granted``, or every scope when it holds ADMIN
    (``Viewer.scopes`` in the contract)."""
    return frozenset(Scope) if Scope.ADMIN in granted else granted


def granted_scopes(role: Role | None, scopes: Iterable[Scope] | None) -> frozenset[Scope]:
    """The scopes a new key is granted: the preset of ``role``, or ``scopes`` (duplicates
    collapse), given exactly one of the two (``CreateApiKeyInput``: "Exactly one of role and
    scopes"; a role is stored as its scopes, ARCHITECTURE section 13).

    Raises ValidationError: field ``role`` when both or neither are given, field ``scopes``
    when the list is empty.
    """
    if (role is None) == (scopes is None):
        raise ValidationError("give exactly one of role and scopes", "role")
    if role is not None:
        return ROLE_SCOPES[role]
    granted = frozenset(scopes or ())
    if not granted:
        raise ValidationError("give at least one scope", "scopes")
    return granted


def may_create_key_for(caller_org: str, caller_scopes: frozenset[Scope], org: str) -> bool:
    """Whether a caller acting for ``caller_org`` with ``caller_scopes`` may make a key of
    ``org``: an ADMIN key for its own org, and only an ADMIN key of :data:`SYSTEM_ORG` for
    any other (ARCHITECTURE section 13; ``CreateApiKeyInput.org``). A caller that may not
    gets FORBIDDEN. Listing and revoking stay within the caller's own org."""
    if Scope.ADMIN not in caller_scopes:
        return False
    return org == caller_org or caller_org == SYSTEM_ORG


def is_well_formed(secret: str) -> bool:
    """Whether ``secret`` has the shape of one of our secrets (``sl_`` + 40 base62): a
    malformed one is refused without a database lookup."""
    return _SECRET.fullmatch(secret) is not None  # fullmatch: "$" would allow a final "\n"


def secret_hash(secret: str) -> str:
    """The stored form of a secret: its SHA-256, hex (64 characters)."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def display_prefix(secret: str) -> str:
    """The first characters of a secret, stored to recognise the key in a list."""
    return secret[:DISPLAY_LENGTH]


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as stored, without its secret: ``id``, the ``org`` it acts for, ``name``,
    display ``prefix``, granted ``scopes``, and its times (UTC)."""

    id: int
    org: str
    name: str
    prefix: str
    scopes: frozenset[Scope]
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


def unusable_because(key: ApiKey, now: datetime) -> str | None:
    """Why ``key`` may not be used at ``now`` (``"revoked"``, ``"expired"``), or None."""
    if key.revoked_at is not None and key.revoked_at <= now:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return None
