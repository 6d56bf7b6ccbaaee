"""The served schema against the public contract (shared/design/schema.graphql).

(a) The committed ``schema.graphql`` at the repository root is the current export
    (regenerate: ``python -m stockledger.resolvers > schema.graphql``).
(b) The export CONTAINS the contract: every type, field, argument (with its default value),
    input field, enum value, union member and interface of the contract exists with the same
    type, nullability included. Compared as graphql-core schema objects, not as text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from graphql import (
    GraphQLEnumType,
    GraphQLInputObjectType,
    GraphQLInterfaceType,
    GraphQLObjectType,
    GraphQLScalarType,
    GraphQLSchema,
    GraphQLUnionType,
    Undefined,
    build_schema,
    find_breaking_changes,
    find_dangerous_changes,
    value_from_ast_untyped,
)
from graphql.utilities import ast_from_value

try:  # graphql-core >= 3.3: defaults live in ``arg.default`` (value or literal)
    from graphql.utilities import get_default_value_ast
except ImportError:  # pragma: no cover
    get_default_value_ast = None

from stockledger.resolvers import print_sdl

REPO = Path(__file__).resolve().parents[1]
SHARED_CONTRACT = Path(__file__).resolve().parents[2] / "shared" / "design" / "schema.graphql"
VENDORED_CONTRACT = Path(__file__).resolve().parent / "contract" / "schema.graphql"
SHARED_V2 = SHARED_CONTRACT.with_name("schema-v2.graphql")
VENDORED_V2 = VENDORED_CONTRACT.with_name("schema-v2.graphql")
# The parts of schema-v2.graphql this release serves.
BUILT_PARTS = ("BATCH", "ACCESS", "LOCATIONS", "EVENTS")


# The v1 fields that schema-v2.graphql itself changes, with the note that says so. Confirmed
# reservations (part LOCATIONS, continued) make Reservation.expiresAt nullable: "The one change
# to a v1 field: Reservation.expiresAt becomes nullable (null once CONFIRMED)". Loosening an
# output field's nullability is a breaking change for a v1 client, so the v1 contract is
# compared as v2 amends it, and only in this one way (test_v2_amends_only_expires_at).
V2_AMENDMENTS = {
    ("Reservation", "expiresAt: DateTime!"): (
        "expiresAt: DateTime",
        "The one change to a v1 field: Reservation.expiresAt becomes nullable",
    ),
}


def v1_contract_text() -> str:
    """The v1 contract as written: shared/ beside the clone when present, else the vendored
    copy."""
    path = SHARED_CONTRACT if SHARED_CONTRACT.exists() else VENDORED_CONTRACT
    return path.read_text()


def contract_text() -> str:
    """The v1 contract with the amendments of :data:`V2_AMENDMENTS` applied."""
    text = v1_contract_text()
    for (type_name, old), (new, _) in V2_AMENDMENTS.items():
        head, sep, rest = text.partition(f"type {type_name} {{")
        assert sep, f"the contract has no type {type_name}"
        body, close, tail = rest.partition("}")
        assert body.count(old) == 1, f"{type_name} has no single {old!r}"
        text = head + sep + body.replace(old, new) + close + tail
    return text


def v2_part(name: str) -> str:
    """One named part of schema-v2.graphql (from its "part NAME" banner to the next part)."""
    text = (SHARED_V2 if SHARED_V2.exists() else VENDORED_V2).read_text()
    parts = text.split("# ─────────────────────────────")
    found = [p for p in parts if p.lstrip().startswith(f"part {name}")]
    assert found, f"schema-v2.graphql has no part {name}"
    return "\n".join(p.split("\n", 1)[1] for p in found)


def default_of(arg: Any) -> Any:
    """An argument's or input field's default as a plain value (Undefined when none)."""
    if get_default_value_ast is not None:
        node = get_default_value_ast(arg)
    else:  # graphql-core < 3.3 keeps the coerced value only
        value = arg.default_value
        node = None if value is Undefined else ast_from_value(value, arg.type)
    return Undefined if node is None else value_from_ast_untyped(node)


def containment_problems(contract: GraphQLSchema, served: GraphQLSchema) -> list[str]:
    """Every way ``served`` fails to contain ``contract`` (empty when it does)."""
    problems: list[str] = []
    for name, ctype in contract.type_map.items():
        if name.startswith("__"):
            continue
        stype = served.type_map.get(name)
        if stype is None:
            problems.append(f"type {name} is missing")
            continue
        if type(stype) is not type(ctype):
            problems.append(f"type {name} is a {type(stype).__name__}, not {type(ctype).__name__}")
            continue
        if isinstance(ctype, GraphQLScalarType):
            continue
        if isinstance(ctype, GraphQLEnumType):
            assert isinstance(stype, GraphQLEnumType)
            for value in ctype.values:
                if value not in stype.values:
                    problems.append(f"enum value {name}.{value} is missing")
            continue
        if isinstance(ctype, GraphQLUnionType):
            assert isinstance(stype, GraphQLUnionType)
            members = {t.name for t in stype.types}
            for member in ctype.types:
                if member.name not in members:
                    problems.append(f"union {name} lacks member {member.name}")
            continue
        if isinstance(ctype, (GraphQLObjectType, GraphQLInterfaceType)):
            assert isinstance(stype, (GraphQLObjectType, GraphQLInterfaceType))
            interfaces = {i.name for i in stype.interfaces}
            for interface in ctype.interfaces:
                if interface.name not in interfaces:
                    problems.append(f"type {name} does not implement {interface.name}")
        assert isinstance(ctype, (GraphQLObjectType, GraphQLInterfaceType, GraphQLInputObjectType))
        for fname, cfield in ctype.fields.items():
            sfield = stype.fields.get(fname)  # type: ignore[union-attr]
            where = f"{name}.{fname}"
            if sfield is None:
                problems.append(f"field {where} is missing")
                continue
            if str(sfield.type) != str(cfield.type):
                problems.append(f"field {where} is {sfield.type}, the contract says {cfield.type}")
            if isinstance(ctype, GraphQLInputObjectType):
                if default_of(sfield) != default_of(cfield):
                    problems.append(
                        f"input field {where} defaults to {default_of(sfield)!r}, "
                        f"the contract says {default_of(cfield)!r}"
                    )
                continue
            for aname, carg in cfield.args.items():
                sarg = sfield.args.get(aname)
                if sarg is None:
                    problems.append(f"argument {where}({aname}) is missing")
                    continue
                if str(sarg.type) != str(carg.type):
                    problems.append(
                        f"argument {where}({aname}) is {sarg.type}, the contract says {carg.type}"
                    )
                if default_of(sarg) != default_of(carg):
                    problems.append(
                        f"argument {where}({aname}) defaults to {default_of(sarg)!r}, "
                        f"the contract says {default_of(carg)!r}"
                    )
            # An argument the contract lacks must not be required, or contract clients break.
            for aname, sarg in sfield.args.items():
                if aname not in cfield.args and str(sarg.type).endswith("!"):
                    if default_of(sarg) is Undefined:
                        problems.append(f"argument {where}({aname}) is new and required")
    return problems


def test_committed_schema_is_the_current_export() -> None:
    committed = (REPO / "schema.graphql").read_text()
    assert committed == print_sdl(), (
        "schema.graphql is stale: run `python -m stockledger.resolvers > schema.graphql`"
    )


def test_export_contains_the_contract() -> None:
    contract = build_schema(contract_text())
    served = build_schema(print_sdl())
    assert containment_problems(contract, served) == []
    # graphql-core's own view of the same question, as a second opinion.
    assert find_breaking_changes(contract, served) == []
    changed_defaults = [
        c for c in find_dangerous_changes(contract, served) if "default" in c.type.name.lower()
    ]
    assert changed_defaults == []


@pytest.mark.parametrize("part", BUILT_PARTS)
def test_export_contains_the_built_parts_of_the_v2_contract(part: str) -> None:
    contract = build_schema(contract_text() + "\n" + v2_part(part))
    served = build_schema(print_sdl())
    assert containment_problems(contract, served) == []
    assert find_breaking_changes(contract, served) == []


def test_vendored_contract_matches_shared() -> None:
    if not SHARED_CONTRACT.exists():
        pytest.skip(f"{SHARED_CONTRACT} is absent: the vendored copy is the contract")
    assert VENDORED_CONTRACT.read_text() == SHARED_CONTRACT.read_text(), (
        "tests/contract/schema.graphql differs from shared/design/schema.graphql: copy it over"
    )
    assert VENDORED_V2.read_text() == SHARED_V2.read_text(), (
        "tests/contract/schema-v2.graphql differs from shared/design/schema-v2.graphql"
    )


def test_the_comparison_catches_breaking_changes() -> None:
    """The checker itself: each kind of break in a served schema is reported."""
    contract = build_schema(contract_text())
    sdl = print_sdl()
    breaks = {
        "nullability": (
            "  onHand: Int!\n  reserved: Int!\n  available: Int!",
            "  onHand: Int\n  reserved: Int!\n  available: Int!",
            "field Balance.onHand is Int, the contract says Int!",
        ),
        "argument default": (
            'balance(sku: String!, location: String! = "default")',
            'balance(sku: String!, location: String! = "main")',
            "argument Query.balance(location) defaults to 'main', the contract says 'default'",
        ),
        "enum value": ("  LOCK_TIMEOUT\n", "", "enum value ErrorCode.LOCK_TIMEOUT is missing"),
        "union member": (
            "union RestockResult = RestockSuccess | ValidationError | ",
            "union RestockResult = RestockSuccess | ",
            "union RestockResult lacks member ValidationError",
        ),
        "interface": (
            "type LockTimeoutError implements Error {",
            "type LockTimeoutError {",
            "type LockTimeoutError does not implement Error",
        ),
        "input default": (
            '  sku: String!\n  location: String! = "default"\n  quantity: Int!',
            "  sku: String!\n  location: String!\n  quantity: Int!",
            "input field LineInput.location defaults to Undefined, the contract says 'default'",
        ),
    }
    for what, (old, new, expected) in breaks.items():
        assert old in sdl, what
        broken = build_schema(sdl.replace(old, new, 1))
        assert expected in containment_problems(contract, broken), what


def test_v2_amends_only_expires_at() -> None:
    """The v1 contract as written differs from the export only where schema-v2 says it
    does, and schema-v2 says so."""
    v2 = (SHARED_V2 if SHARED_V2.exists() else VENDORED_V2).read_text()
    for _, note in V2_AMENDMENTS.values():
        assert note in v2
    contract = build_schema(v1_contract_text())
    served = build_schema(print_sdl())
    assert containment_problems(contract, served) == [
        "field Reservation.expiresAt is DateTime, the contract says DateTime!"
    ]
