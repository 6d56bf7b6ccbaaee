"""API keys as plain values (domain/access.py): the contract's roles, ADMIN's reach, the
secret's format and stored forms, when a key may be used, what a new key is granted, and who
may make a key of which org (ARCHITECTURE section 13)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from stockledger.domain.access import (
    ROLE_SCOPES,
    SYSTEM_ORG,
    ApiKey,
    Role,
    Scope,
    display_prefix,
    effective,
    granted_scopes,
    is_well_formed,
    may_create_key_for,
    secret_hash,
    unusable_because,
)
from stockledger.domain.errors import ValidationError

S = Scope
# The contract's Role enum (schema-v2.graphql, part ACCESS), written out here, not derived.
CONTRACT_ROLES = {
    "STOREFRONT": {S.STOCK_READ, S.RESERVATIONS_WRITE},
    "OPERATOR": {S.STOCK_READ, S.RESERVATIONS_WRITE, S.STOCK_WRITE, S.LEDGER_READ},
    "AUDITOR": {S.STOCK_READ, S.LEDGER_READ},
    "SUPERVISOR": {
        S.STOCK_READ,
        S.RESERVATIONS_WRITE,
        S.STOCK_WRITE,
        S.LEDGER_READ,
        S.APPROVE_SUPERVISOR,
    },
    "CONTROLLER": {
        S.STOCK_READ,
        S.RESERVATIONS_WRITE,
        S.STOCK_WRITE,
        S.LEDGER_READ,
        S.APPROVE_SUPERVISOR,
        S.APPROVE_CONTROLLER,
    },
    "ADMIN": {S.ADMIN},
}
GOOD = "sl_" + "aZ09" * 10
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("role", list(CONTRACT_ROLES))
def test_each_role_is_the_contracts_preset(role: str) -> None:
    assert ROLE_SCOPES[Role(role)] == CONTRACT_ROLES[role]


def test_the_roles_are_exactly_the_contracts() -> None:
    assert {r.value for r in Role} == set(CONTRACT_ROLES)
    assert {s.value for s in Scope} == {
        "STOCK_READ",
        "RESERVATIONS_WRITE",
        "STOCK_WRITE",
        "LEDGER_READ",
        "APPROVE_SUPERVISOR",
        "APPROVE_CONTROLLER",
        "ADMIN",
    }


def test_admin_implies_every_scope_and_nothing_else_does() -> None:
    assert effective(frozenset({S.ADMIN})) == frozenset(Scope)
    operator = frozenset(CONTRACT_ROLES["CONTROLLER"])
    assert effective(operator) == operator
    assert S.ADMIN not in effective(operator)


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "sl_",
        GOOD[:-1],  # 39
        GOOD + "a",  # 41
        "SL_" + GOOD[3:],
        "sk_" + GOOD[3:],
        GOOD[:-1] + "-",
        GOOD[:-1] + "é",
        " " + GOOD,
        GOOD + "\n",
    ],
)
def test_malformed_secrets_are_refused_by_shape(secret: str) -> None:
    assert not is_well_formed(secret)


def test_a_secret_is_stored_as_its_sha256_and_shown_by_its_prefix() -> None:
    assert is_well_formed(GOOD)
    assert secret_hash(GOOD) == hashlib.sha256(GOOD.encode()).hexdigest()
    assert len(secret_hash(GOOD)) == 64
    assert display_prefix(GOOD) == GOOD[:11] and display_prefix(GOOD).startswith("sl_")


def _key(**times: datetime | None) -> ApiKey:
    return ApiKey(1, "acme", "k", "sl_aZ09aZ09", frozenset({S.STOCK_READ}), NOW, **times)


def test_a_key_is_usable_until_revoked_or_expired() -> None:
    assert unusable_because(_key(), NOW) is None
    later = NOW + timedelta(days=1)
    assert unusable_because(_key(expires_at=later), NOW) is None
    assert unusable_because(_key(expires_at=later), later) == "expired"
    assert unusable_because(_key(revoked_at=NOW), NOW) == "revoked"
    assert unusable_because(_key(revoked_at=later), NOW) is None


def test_a_new_key_gets_exactly_one_of_a_role_and_scopes() -> None:
    assert granted_scopes(Role.AUDITOR, None) == CONTRACT_ROLES["AUDITOR"]
    assert granted_scopes(None, [S.LEDGER_READ, S.LEDGER_READ]) == {S.LEDGER_READ}
    for role, scopes, field in (
        (Role.ADMIN, [S.ADMIN], "role"),  # both
        (Role.ADMIN, [], "role"),  # both, the list empty
        (None, None, "role"),  # neither
        (None, [], "scopes"),  # a list with no scope
    ):
        with pytest.raises(ValidationError) as refused:
            granted_scopes(role, scopes)
        assert refused.value.field == field, (role, scopes)


ADMIN = frozenset({S.ADMIN})
ALL_BUT_ADMIN = frozenset(Scope) - ADMIN


@pytest.mark.parametrize(
    ("caller_org", "scopes", "org", "allowed"),
    [
        ("acme", ADMIN, "acme", True),  # its own org
        ("acme", effective(ADMIN), "acme", True),  # the effective set works the same
        ("acme", ADMIN, "globex", False),  # another org: only system's ADMIN
        ("acme", ADMIN, SYSTEM_ORG, False),  # nor may it make an operator key
        (SYSTEM_ORG, ADMIN, "globex", True),
        (SYSTEM_ORG, ADMIN, SYSTEM_ORG, True),
        (SYSTEM_ORG, ALL_BUT_ADMIN, "globex", False),  # system, but no ADMIN
        ("acme", ALL_BUT_ADMIN, "acme", False),  # no ADMIN at all
        ("System", ADMIN, "globex", False),  # org names are exact
    ],
)
def test_only_an_admin_of_org_system_makes_keys_of_other_orgs(
    caller_org: str, scopes: frozenset[Scope], org: str, allowed: bool
) -> None:
    assert may_create_key_for(caller_org, scopes, org) is allowed
