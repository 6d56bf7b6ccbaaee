"""The input rules of ARCHITECTURE section 11, through the command constructors, no I/O.

Every ``<Command>.validated(...)`` refuses bad input with a ``ValidationError`` whose ``field``
names the input path at fault (``lines.2.quantity``, ``reference.id``, ``ttlSeconds`` ...), and
returns a normalized command: lines merged per (location, sku) and sorted, strings exactly as
given, the TTL in force, and a request hash that is equal for equivalent inputs and different
for different payloads (section 11, "Idempotency payload").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from stockledger.domain.commands import (
    Adjust,
    Deduct,
    DeductDirect,
    Extend,
    Release,
    Reserve,
    Restock,
)
from stockledger.domain.errors import NotFoundError, ValidationError
from stockledger.domain.model import Line, Reference
from stockledger.domain.validation import MAX_BALANCE, MAX_LINES, MAX_QUANTITY, MAX_STRING_LENGTH

LOC = "default"
DEFAULT_TTL = 1800
MAX_TTL = 7 * 24 * 3600  # the default server maximum (section 11)
RID = 7  # a well-formed reservation id (validation never looks it up)
REF = Reference("ORDER", "o-1")


# ---------------------------------------------------------------------------- helpers


def refused(call: Callable[[], Any]) -> ValidationError:
    """Run ``call``, expect a ValidationError, and return it."""
    with pytest.raises(ValidationError) as err:
        call()
    assert err.value.code == "VALIDATION_ERROR"
    assert err.value.message
    return err.value


def field_of(call: Callable[[], Any]) -> str | None:
    """The input path a refused ``call`` names."""
    return refused(call).field


def reserve(lines: Any, **kw: Any) -> Reserve:
    kw.setdefault("default_ttl_seconds", DEFAULT_TTL)
    kw.setdefault("max_ttl_seconds", MAX_TTL)
    return Reserve.validated(kw.pop("key", "k"), lines, **kw)


def extend(reservation_id: Any = RID, ttl: Any = 60, key: Any = "k", max_ttl: int = MAX_TTL):
    return Extend.validated(key, reservation_id, ttl, max_ttl_seconds=max_ttl)


def adjust(**kw: Any) -> Adjust:
    args: dict[str, Any] = {"sku": "A", "location": LOC, "reason": "count", **kw}
    return Adjust.validated(args.pop("key", "k"), **args)


def with_lines(operation: str, lines: Any, key: Any = "k") -> Any:
    """Build the ``operation`` command that takes ``lines`` (release/deduct by id ``RID``)."""
    if operation == "restock":
        return Restock.validated(key, lines)
    if operation == "reserve":
        return reserve(lines, key=key)
    if operation == "deduct-direct":
        return Deduct.validated(key, lines=lines)
    if operation == "deduct":
        return Deduct.validated(key, reservation_id=RID, lines=lines)
    if operation == "release":
        return Release.validated(key, reservation_id=RID, lines=lines)
    raise AssertionError(operation)


LINE_OPERATIONS = ["restock", "reserve", "deduct-direct", "deduct", "release"]
REQUIRED_LINES = ["restock", "reserve", "deduct-direct"]


def every_operation(key: Any) -> list[Callable[[], Any]]:
    """One valid call of each write command with ``key`` as its idempotency key."""
    return [
        lambda: Restock.validated(key, [Line("A", 1)]),
        lambda: adjust(key=key, delta=1),
        lambda: reserve([Line("A", 1)], key=key),
        lambda: Release.validated(key, reservation_id=RID),
        lambda: Release.validated(key, reference=REF),
        lambda: Deduct.validated(key, reservation_id=RID),
        lambda: Deduct.validated(key, reference=REF),
        lambda: Deduct.validated(key, lines=[Line("A", 1)]),
        lambda: extend(key=key),
    ]


# ---------------------------------------------------------------------------- strings

BAD_STRINGS = [
    pytest.param("", id="empty"),
    pytest.param(" ", id="blank"),
    pytest.param("      ", id="blanks"),
    pytest.param("\u00a0\u3000", id="unicode-blanks"),
    pytest.param("a" * 256, id="256-chars"),
    pytest.param("x" * 10_240, id="10kB"),
    pytest.param("é" * 256, id="256-non-ascii"),
    pytest.param("a\x00b", id="NUL"),
    pytest.param("a\nb", id="LF"),
    pytest.param("\tab", id="TAB"),
    pytest.param("ab\r", id="CR"),
    pytest.param("a\x7f", id="DEL"),
    pytest.param("a\x85b", id="NEL-C1"),
    pytest.param("a\x9fb", id="APC-C1"),
    pytest.param("\x1b[31mred", id="ESC"),
    pytest.param("A\ud800", id="lone-high-surrogate"),
    pytest.param("\udc00A", id="lone-low-surrogate"),
    pytest.param(5, id="int"),
    pytest.param(None, id="None"),
    pytest.param(b"A", id="bytes"),
]

GOOD_STRINGS = [
    pytest.param("A", id="one-char"),
    pytest.param("s" * 255, id="255-chars"),
    pytest.param("\U0001f4e6" * 255, id="255-emoji"),
    pytest.param(" A ", id="padded"),
    pytest.param("a b", id="inner-space"),
    pytest.param("cafe\u0301", id="combining"),
    pytest.param("\uff53\uff4b\uff55", id="fullwidth"),
    pytest.param("a\u200bb", id="zero-width-space-Cf"),
]


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
@pytest.mark.parametrize("bad", BAD_STRINGS)
def test_bad_sku_in_a_line_names_the_line(operation, bad):
    lines = [Line("A", 1), Line(bad, 1)]
    assert field_of(lambda: with_lines(operation, lines)) == "lines.1.sku"


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
@pytest.mark.parametrize("bad", BAD_STRINGS)
def test_bad_location_in_a_line_names_the_line(operation, bad):
    lines = [Line("A", 1), Line("B", 1, bad)]
    assert field_of(lambda: with_lines(operation, lines)) == "lines.1.location"


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
@pytest.mark.parametrize("good", GOOD_STRINGS)
def test_good_strings_are_kept_exactly_as_given(operation, good):
    command = with_lines(operation, [Line(good, 1, good)])
    assert [(ln.location, ln.sku) for ln in command.cart.lines] == [(good, good)]


def test_strings_are_neither_trimmed_nor_case_folded():
    command = Restock.validated("k", [Line("a", 1), Line("A", 2), Line("a ", 3), Line(" a", 4)])
    assert sorted((ln.sku, ln.quantity) for ln in command.cart.lines) == [
        (" a", 4),
        ("A", 2),
        ("a", 1),
        ("a ", 3),
    ]


def test_unicode_strings_are_not_normalized():
    command = Restock.validated("k", [Line("caf\u00e9", 1), Line("cafe\u0301", 2)])
    assert sorted(ln.sku for ln in command.cart.lines) == sorted(["caf\u00e9", "cafe\u0301"])


def test_string_length_counts_characters_not_bytes():
    sku = "\U0001f4e6" * MAX_STRING_LENGTH  # 1020 bytes of UTF-8
    assert Restock.validated("k", [Line(sku, 1)]).cart.lines[0].sku == sku
    assert field_of(lambda: Restock.validated("k", [Line(sku + "x", 1)])) == "lines.0.sku"


@pytest.mark.parametrize("bad", [p for p in BAD_STRINGS if p.values != (None,)])
def test_bad_reason_on_restock_is_refused(bad):
    assert field_of(lambda: Restock.validated("k", [Line("A", 1)], reason=bad)) == "reason"


def test_a_restock_reason_is_optional():
    assert Restock.validated("k", [Line("A", 1)]).reason is None
    assert Restock.validated("k", [Line("A", 1)], reason=" why ").reason == " why "


@pytest.mark.parametrize("bad", BAD_STRINGS)
def test_bad_reason_on_adjust_is_refused(bad):
    assert field_of(lambda: adjust(delta=1, reason=bad)) == "reason"


@pytest.mark.parametrize("bad", BAD_STRINGS)
@pytest.mark.parametrize("attr", ["sku", "location"])
def test_bad_sku_or_location_on_adjust_is_refused(bad, attr):
    assert field_of(lambda: adjust(delta=1, **{attr: bad})) == attr


REFERENCE_BUILDERS: dict[str, Callable[[Reference], Any]] = {
    "restock": lambda ref: Restock.validated("k", [Line("A", 1)], reference=ref),
    "adjust": lambda ref: adjust(delta=1, reference=ref),
    "reserve": lambda ref: reserve([Line("A", 1)], reference=ref),
    "release": lambda ref: Release.validated("k", reference=ref),
    "deduct": lambda ref: Deduct.validated("k", reference=ref),
}


@pytest.mark.parametrize("operation", list(REFERENCE_BUILDERS))
@pytest.mark.parametrize("bad", BAD_STRINGS)
def test_bad_reference_type_is_refused(operation, bad):
    build = REFERENCE_BUILDERS[operation]
    assert field_of(lambda: build(Reference(bad, "o-1"))) == "reference.type"


@pytest.mark.parametrize("operation", list(REFERENCE_BUILDERS))
@pytest.mark.parametrize("bad", BAD_STRINGS)
def test_bad_reference_id_is_refused(operation, bad):
    build = REFERENCE_BUILDERS[operation]
    assert field_of(lambda: build(Reference("ORDER", bad))) == "reference.id"


@pytest.mark.parametrize("operation", list(REFERENCE_BUILDERS))
def test_a_good_reference_is_kept_exactly(operation):
    ref = Reference("T" * 255, " id ")
    assert REFERENCE_BUILDERS[operation](ref).reference == ref


def test_strings_of_255_characters_are_accepted_everywhere():
    s = "s" * 255
    restock = Restock.validated(s, [Line(s, 1, s)], reference=Reference(s, s), reason=s)
    assert (restock.idempotency_key, restock.reason, restock.reference) == (s, s, Reference(s, s))
    adj = adjust(key=s, sku=s, location=s, reason=s, delta=1)
    assert (adj.sku, adj.location, adj.reason) == (s, s, s)


# ---------------------------------------------------------------------------- quantities

BAD_QUANTITIES = [0, -1, -1_000_000_000, 1_000_000_001, 10**20, True, False, 1.0, 2.5, "3", None]


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
@pytest.mark.parametrize("quantity", BAD_QUANTITIES, ids=repr)
def test_bad_quantity_names_the_line(operation, quantity):
    lines = [Line("A", 1), Line("B", 1), Line("A", quantity)]
    assert field_of(lambda: with_lines(operation, lines)) == "lines.2.quantity"


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
@pytest.mark.parametrize("quantity", [1, 2, MAX_QUANTITY - 1, MAX_QUANTITY])
def test_quantities_from_one_to_a_billion_are_accepted(operation, quantity):
    command = with_lines(operation, [Line("A", quantity)])
    assert [ln.quantity for ln in command.cart.lines] == [quantity]


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
def test_lines_of_one_balance_adding_up_past_a_billion_are_refused(operation):
    lines = [Line("B", 1), Line("A", 600_000_000), Line("A", 600_000_000)]
    assert field_of(lambda: with_lines(operation, lines)) == "lines.1.quantity"


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
def test_lines_of_one_balance_adding_up_to_exactly_a_billion_are_accepted(operation):
    lines = [Line("A", 400_000_000), Line("B", 1), Line("A", 600_000_000)]
    command = with_lines(operation, lines)
    assert [(ln.sku, ln.quantity) for ln in command.cart.lines] == [("A", MAX_QUANTITY), ("B", 1)]


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
def test_the_bound_is_per_balance_not_per_cart(operation):
    lines = [Line("A", MAX_QUANTITY), Line("B", MAX_QUANTITY), Line("A", MAX_QUANTITY, "wh-2")]
    assert len(with_lines(operation, lines).cart.lines) == 3


# ---------------------------------------------------------------------------- lines


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
def test_empty_lines_are_refused(operation):
    assert field_of(lambda: with_lines(operation, [])) == "lines"


@pytest.mark.parametrize("operation", REQUIRED_LINES)
def test_missing_lines_are_refused_where_required(operation):
    assert field_of(lambda: with_lines(operation, None)) == "lines"


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_omitted_lines_on_release_and_deduct_mean_everything_remaining(operation):
    assert with_lines(operation, None).cart is None


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
@pytest.mark.parametrize("size", [MAX_LINES + 1, 10_000])
def test_more_than_500_lines_are_refused(operation, size):
    lines = [Line(f"SKU-{i:05d}", 1) for i in range(size)]
    assert field_of(lambda: with_lines(operation, lines)) == "lines"


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
def test_exactly_500_lines_are_accepted(operation):
    lines = [Line(f"SKU-{i:03d}", 2) for i in range(MAX_LINES)]
    assert len(with_lines(operation, lines).cart.lines) == MAX_LINES


def test_more_than_500_lines_are_refused_even_when_they_merge_into_fewer():
    lines = [Line("A", 1)] * (MAX_LINES + 1)
    assert field_of(lambda: Restock.validated("k", lines)) == "lines"


@pytest.mark.parametrize("operation", LINE_OPERATIONS)
def test_lines_are_merged_per_balance_and_sorted_by_location_then_sku(operation):
    lines = [Line("B", 1), Line("A", 2, "wh-2"), Line("A", 3), Line("A", 4), Line("C", 5, "a-wh")]
    command = with_lines(operation, lines)
    assert [(ln.location, ln.sku, ln.quantity) for ln in command.cart.lines] == [
        ("a-wh", "C", 5),
        (LOC, "A", 7),
        (LOC, "B", 1),
        ("wh-2", "A", 2),
    ]


def test_a_merged_line_remembers_the_input_path_of_its_first_line():
    cart = Restock.validated("k", [Line("B", 1), Line("A", 2, "wh-2"), Line("A", 3), Line("A", 4)])
    assert cart.cart.path((LOC, "A"), "quantity") == "lines.2.quantity"
    assert cart.cart.path((LOC, "B"), "sku") == "lines.0.sku"
    assert cart.cart.path(("wh-2", "A"), "quantity") == "lines.1.quantity"
    assert cart.cart.keys() == [(LOC, "A"), (LOC, "B"), ("wh-2", "A")]


def test_the_default_location_is_default():
    assert Restock.validated("k", [Line("A", 1)]).cart.lines[0].location == "default"
    assert adjust(delta=1).location == "default"


# ---------------------------------------------------------------------------- TTL

BAD_TTLS = [0, -1, -1800, MAX_TTL + 1, 10**12, True, False, 1.5, "60"]


@pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
def test_bad_reserve_ttl_is_refused(ttl):
    assert field_of(lambda: reserve([Line("A", 1)], ttl_seconds=ttl)) == "ttlSeconds"


@pytest.mark.parametrize("ttl", [*BAD_TTLS, None], ids=repr)
def test_bad_extend_ttl_is_refused(ttl):
    assert field_of(lambda: extend(ttl=ttl)) == "ttlSeconds"


@pytest.mark.parametrize("ttl", [1, 60, DEFAULT_TTL, MAX_TTL])
def test_ttl_from_one_second_to_the_maximum_is_accepted(ttl):
    assert reserve([Line("A", 1)], ttl_seconds=ttl).ttl_seconds == ttl
    assert extend(ttl=ttl).ttl_seconds == ttl


def test_omitted_ttl_is_the_default_in_force():
    assert reserve([Line("A", 1)]).ttl_seconds == DEFAULT_TTL
    assert reserve([Line("A", 1)], default_ttl_seconds=90).ttl_seconds == 90


def test_ttl_above_the_maximum_is_refused_never_clamped():
    err = refused(lambda: reserve([Line("A", 1)], ttl_seconds=601, max_ttl_seconds=600))
    assert err.field == "ttlSeconds"
    assert reserve([Line("A", 1)], ttl_seconds=600, max_ttl_seconds=600).ttl_seconds == 600
    assert field_of(lambda: extend(ttl=601, max_ttl=600)) == "ttlSeconds"
    assert extend(ttl=600, max_ttl=600).ttl_seconds == 600


# ---------------------------------------------------------------------------- idempotency keys

BAD_KEYS = [
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param("k" * 256, id="256-chars"),
    pytest.param("k" * 10_240, id="10kB"),
    pytest.param("key\n", id="control"),
    pytest.param("key\ud800", id="lone-surrogate"),
    pytest.param(None, id="None"),
    pytest.param(42, id="int"),
    pytest.param("expire:", id="expire-prefix"),
    pytest.param("expire:1", id="expire-1"),
    pytest.param("expire:anything", id="expire-any"),
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_idempotency_key_is_refused_by_every_command(key):
    for call in every_operation(key):
        assert field_of(call) == "idempotencyKey"


@pytest.mark.parametrize("key", ["k", "k" * 255, "expire", "EXPIRE:1", "not-expire:1", " expire:1"])
def test_keys_are_accepted_exactly_as_given(key):
    for call in every_operation(key):
        assert call().idempotency_key == key


def test_the_key_is_checked_before_the_rest_of_the_input():
    assert field_of(lambda: Restock.validated("expire:1", [])) == "idempotencyKey"
    assert field_of(lambda: adjust(key="", delta=None)) == "idempotencyKey"


# ---------------------------------------------------------------------------- addressing


@pytest.mark.parametrize("command", [Release, Deduct])
def test_both_reservation_id_and_reference_are_refused(command):
    call = lambda: command.validated("k", reservation_id=RID, reference=REF)  # noqa: E731
    assert field_of(call) == "reservationId"


def test_release_with_neither_reservation_id_nor_reference_is_refused():
    assert field_of(lambda: Release.validated("k")) == "reservationId"
    assert field_of(lambda: Release.validated("k", lines=[Line("A", 1)])) == "reservationId"


def test_deduct_with_neither_reservation_id_nor_reference_is_a_direct_deduct():
    command = Deduct.validated("k", lines=[Line("A", 2), Line("A", 1)])
    assert isinstance(command, DeductDirect)
    assert [(ln.sku, ln.quantity) for ln in command.cart.lines] == [("A", 3)]


@pytest.mark.parametrize("command", [Release, Deduct])
def test_by_id_and_by_reference_commands_keep_what_they_address(command):
    by_id = command.validated("k", reservation_id=RID)
    assert (by_id.reservation_id, by_id.reference) == (RID, None)
    by_ref = command.validated("k", reference=REF, lines=[Line("A", 1)])
    assert (by_ref.reservation_id, by_ref.reference) == (None, REF)


BAD_RESERVATION_IDS = ["", "  ", "1\n", "9" * 256, True, 1.5]


@pytest.mark.parametrize("operation", ["release", "deduct", "extend"])
@pytest.mark.parametrize("rid", BAD_RESERVATION_IDS, ids=repr)
def test_bad_reservation_id_is_refused(operation, rid):
    if operation == "extend":
        call = lambda: extend(reservation_id=rid)  # noqa: E731
    else:
        command = Release if operation == "release" else Deduct
        call = lambda: command.validated("k", reservation_id=rid)  # noqa: E731
    assert field_of(call) == "reservationId"


NON_NUMERIC_IDS = ["not-a-number", "12a", "-1", "1.0", "\u0661\u0662", "1" * 19]


@pytest.mark.parametrize("operation", ["release", "deduct", "extend"])
@pytest.mark.parametrize("rid", NON_NUMERIC_IDS)
def test_a_reservation_id_that_is_no_number_is_not_found(operation, rid):
    with pytest.raises(NotFoundError) as err:
        if operation == "extend":
            extend(reservation_id=rid)
        else:
            command = Release if operation == "release" else Deduct
            command.validated("k", reservation_id=rid)
    assert (err.value.entity, err.value.key, err.value.code) == ("Reservation", rid, "NOT_FOUND")


@pytest.mark.parametrize("operation", ["release", "deduct", "extend"])
@pytest.mark.parametrize("rid", [12, "12"])
def test_a_reservation_id_may_be_a_number_or_its_string(operation, rid):
    if operation == "extend":
        assert extend(reservation_id=rid).reservation_id == 12
    else:
        command = Release if operation == "release" else Deduct
        assert command.validated("k", reservation_id=rid).reservation_id == 12


@pytest.mark.parametrize("command", [Release, Deduct])
def test_the_whole_input_is_validated_before_an_id_is_found_missing(command):
    call = lambda: command.validated("k", reservation_id="abc", lines=[])  # noqa: E731
    assert field_of(call) == "lines"
    assert field_of(lambda: extend(reservation_id="abc", ttl=0)) == "ttlSeconds"


# ---------------------------------------------------------------------------- adjust


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param({"delta": 1, "set_on_hand": 1}, "delta", id="both"),
        pytest.param({}, "delta", id="neither"),
        pytest.param({"delta": 0, "set_on_hand": 0}, "delta", id="both-zero"),
        pytest.param({"delta": MAX_QUANTITY + 1}, "delta", id="delta-too-big"),
        pytest.param({"delta": -MAX_QUANTITY - 1}, "delta", id="delta-too-small"),
        pytest.param({"delta": True}, "delta", id="delta-bool"),
        pytest.param({"delta": 1.5}, "delta", id="delta-float"),
        pytest.param({"delta": "1"}, "delta", id="delta-str"),
        pytest.param({"set_on_hand": -1}, "setOnHand", id="set-negative"),
        pytest.param({"set_on_hand": MAX_BALANCE + 1}, "setOnHand", id="set-past-int32"),
        pytest.param({"set_on_hand": 2**40}, "setOnHand", id="set-huge"),
        pytest.param({"set_on_hand": False}, "setOnHand", id="set-bool"),
        pytest.param({"set_on_hand": 2.0}, "setOnHand", id="set-float"),
        pytest.param({"delta": 1, "expected_version": -1}, "expectedVersion", id="version-neg"),
        pytest.param({"delta": 1, "expected_version": True}, "expectedVersion", id="version-bool"),
        pytest.param({"delta": 1, "expected_version": 1.0}, "expectedVersion", id="version-float"),
        pytest.param({"delta": 1, "expected_version": "1"}, "expectedVersion", id="version-str"),
        pytest.param({"delta": 1, "reason": ""}, "reason", id="reason-empty"),
        pytest.param({"delta": 1, "reason": "   "}, "reason", id="reason-blank"),
        pytest.param({"delta": 1, "reason": "r" * 256}, "reason", id="reason-long"),
        pytest.param({"delta": 1, "reason": "a\nb"}, "reason", id="reason-control"),
        pytest.param({"delta": 1, "reason": None}, "reason", id="reason-missing"),
        pytest.param({"delta": 1, "sku": ""}, "sku", id="sku-empty"),
        pytest.param({"delta": 1, "sku": "x" * 10_240}, "sku", id="sku-10kB"),
        pytest.param({"delta": 1, "location": " "}, "location", id="location-blank"),
        pytest.param(
            {"delta": 1, "reference": Reference("", "x")}, "reference.type", id="ref-type"
        ),
        pytest.param(
            {"delta": 1, "reference": Reference("ORDER", "a\x00")}, "reference.id", id="ref-id"
        ),
    ],
)
def test_bad_adjust_is_refused(kwargs, field):
    assert field_of(lambda: adjust(**kwargs)) == field


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"delta": 0}, id="delta-zero"),
        pytest.param({"delta": MAX_QUANTITY}, id="delta-max"),
        pytest.param({"delta": -MAX_QUANTITY}, id="delta-min"),
        pytest.param({"set_on_hand": 0}, id="set-zero"),
        pytest.param({"set_on_hand": MAX_BALANCE}, id="set-int32-max"),
        pytest.param({"delta": -1, "expected_version": 0}, id="version-zero"),
        pytest.param({"delta": -1, "expected_version": 10**12}, id="version-big"),
    ],
)
def test_adjust_bounds_are_accepted(kwargs):
    command = adjust(**kwargs)
    assert command.delta == kwargs.get("delta")
    assert command.set_on_hand == kwargs.get("set_on_hand")
    assert command.expected_version == kwargs.get("expected_version")


def test_adjust_keeps_its_balance_reason_and_reference():
    command = adjust(sku="A", location="wh-2", delta=-2, reason="damaged", reference=REF)
    assert (command.sku, command.location, command.reason, command.reference) == (
        "A",
        "wh-2",
        "damaged",
        REF,
    )
    assert command.balance_keys() == [("wh-2", "A")]


# ---------------------------------------------------------------------------- error shape


def test_the_error_message_names_the_field():
    err = refused(lambda: Restock.validated("k", [Line("A", 1), Line("A", 0)]))
    assert err.field == "lines.1.quantity"
    assert str(err).startswith("lines.1.quantity: ")


# ---------------------------------------------------------------------------- request hash


def restock_hash(lines: list[Line], **kw: Any) -> str:
    return Restock.validated("k", lines, **kw).request_hash


def test_the_hash_is_a_sha256_hex_digest():
    digest = restock_hash([Line("A", 1)])
    assert len(digest) == 64 and int(digest, 16) >= 0


@pytest.mark.parametrize(
    "same",
    [
        [Line("B", 1), Line("A", 5)],
        [Line("A", 5), Line("B", 1)],
        [Line("A", 1), Line("B", 1), Line("A", 4)],
        [Line("A", 2), Line("B", 1), Line("A", 3)],
    ],
)
def test_restock_hash_is_equal_for_lines_in_another_order_or_split(same):
    assert restock_hash(same) == restock_hash([Line("A", 5), Line("B", 1)])


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"lines": [Line("A", 2)]}, id="quantity"),
        pytest.param({"lines": [Line("A", 1), Line("B", 1)]}, id="more-lines"),
        pytest.param({"lines": [Line("A", 1, "wh-2")]}, id="location"),
        pytest.param({"lines": [Line("a", 1)]}, id="sku-case"),
        pytest.param({"lines": [Line("A ", 1)]}, id="sku-trailing-space"),
        pytest.param({"lines": [Line("A", 1)], "reason": "other"}, id="reason"),
        pytest.param({"lines": [Line("A", 1)], "reason": None}, id="no-reason"),
        pytest.param(
            {"lines": [Line("A", 1)], "reason": "delivery", "reference": Reference("PO", "1")},
            id="reference",
        ),
    ],
)
def test_restock_hash_differs_for_another_payload(other):
    first = restock_hash([Line("A", 1)], reason="delivery")
    assert restock_hash(other.pop("lines"), **other) != first


def test_the_hash_depends_on_the_operation():
    lines = [Line("A", 1)]
    hashes = {
        Restock.validated("k", lines).request_hash,
        reserve(lines).request_hash,
        Deduct.validated("k", lines=lines).request_hash,
        Release.validated("k", reservation_id=RID, lines=lines).request_hash,
        Deduct.validated("k", reservation_id=RID, lines=lines).request_hash,
    }
    assert len(hashes) == 5


def test_reserve_hash_omitted_ttl_equals_the_default_ttl():
    lines = [Line("A", 1)]
    assert reserve(lines).request_hash == reserve(lines, ttl_seconds=DEFAULT_TTL).request_hash
    assert reserve(lines).request_hash != reserve(lines, ttl_seconds=DEFAULT_TTL + 1).request_hash


def test_reserve_hash_of_an_omitted_ttl_follows_the_default_in_force():
    lines = [Line("A", 1)]
    assert reserve(lines, default_ttl_seconds=900).request_hash == (
        reserve(lines, ttl_seconds=900).request_hash
    )
    assert reserve(lines, default_ttl_seconds=900).request_hash != reserve(lines).request_hash


def test_reserve_hash_is_equal_for_merged_lines_and_differs_by_reference():
    a = reserve([Line("B", 1), Line("A", 2), Line("A", 3)], reference=REF)
    b = reserve([Line("A", 5), Line("B", 1)], reference=REF)
    assert a.request_hash == b.request_hash
    assert reserve([Line("A", 5), Line("B", 1)]).request_hash != a.request_hash


@pytest.mark.parametrize("command", [Release, Deduct])
def test_reservation_id_and_reference_are_different_payloads(command):
    lines = [Line("A", 1)]
    by_id = command.validated("k", reservation_id=RID, lines=lines)
    by_ref = command.validated("k", reference=REF, lines=lines)
    assert by_id.request_hash != by_ref.request_hash


@pytest.mark.parametrize("command", [Release, Deduct])
def test_a_reservation_id_as_number_or_string_is_one_payload(command):
    assert (
        command.validated("k", reservation_id=12).request_hash
        == command.validated("k", reservation_id="12").request_hash
    )
    assert extend(reservation_id=12).request_hash == extend(reservation_id="12").request_hash


@pytest.mark.parametrize("command", [Release, Deduct])
def test_consume_hash_differs_for_all_remaining_versus_given_lines(command):
    everything = command.validated("k", reservation_id=RID)
    some = command.validated("k", reservation_id=RID, lines=[Line("A", 1)])
    other_id = command.validated("k", reservation_id=RID + 1)
    assert len({everything.request_hash, some.request_hash, other_id.request_hash}) == 3


@pytest.mark.parametrize("command", [Release, Deduct])
def test_consume_hash_is_equal_for_merged_lines(command):
    a = command.validated("k", reference=REF, lines=[Line("B", 1), Line("A", 1), Line("A", 1)])
    b = command.validated("k", reference=REF, lines=[Line("A", 2), Line("B", 1)])
    assert a.request_hash == b.request_hash


def test_direct_deduct_hash_is_equal_for_merged_lines_and_differs_from_a_deduct_by_id():
    a = Deduct.validated("k", lines=[Line("A", 1), Line("A", 1)])
    b = Deduct.validated("k", lines=[Line("A", 2)])
    assert a.request_hash == b.request_hash
    assert (
        a.request_hash
        != Deduct.validated("k", reservation_id=RID, lines=[Line("A", 2)]).request_hash
    )


def test_extend_hash_differs_by_ttl_and_reservation():
    base = extend(reservation_id=RID, ttl=60).request_hash
    assert extend(reservation_id=RID, ttl=61).request_hash != base
    assert extend(reservation_id=RID + 1, ttl=60).request_hash != base
    assert extend(reservation_id=RID, ttl=60).request_hash == base


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"delta": 2}, id="delta"),
        pytest.param({"set_on_hand": 1}, id="set-instead-of-delta"),
        pytest.param({"delta": 1, "expected_version": 3}, id="expected-version"),
        pytest.param({"delta": 1, "reason": "other"}, id="reason"),
        pytest.param({"delta": 1, "sku": "B"}, id="sku"),
        pytest.param({"delta": 1, "location": "wh-2"}, id="location"),
        pytest.param({"delta": 1, "reference": REF}, id="reference"),
    ],
)
def test_adjust_hash_differs_for_another_payload(other):
    assert adjust(**other).request_hash != adjust(delta=1).request_hash


def test_adjust_hash_is_equal_for_an_equal_payload():
    assert adjust(delta=1).request_hash == adjust(delta=1).request_hash
    assert adjust(set_on_hand=4).request_hash == adjust(set_on_hand=4).request_hash
