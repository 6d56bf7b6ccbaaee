"""What a command tells the world (part EVENTS, ARCHITECTURE section 15), as plain values.

A command's :class:`~stockledger.domain.state.Changes` carry its events, in this order: per
balance it moved (key order) a STOCK_CHANGED with the balance after it and the positions of its
ledger entries, then the alert transitions of that balance; a RESERVATION_EXPIRED per
reservation it expired; a TRANSFER_UPDATED per transfer it created or changed. The unit of work
writes them to the outbox in the command's transaction.

The alert rule, section 15: after a write that moves stock, a balance's target state is OUT if
available is 0, else LOW if a reorder point is set and available <= its minimum level, else OK.
When it differs from the stored state, the stored state changes and:

| from | to | events |
|---|---|---|
| OK | LOW | STOCK_LOW |
| OK | OUT | STOCK_LOW (only with a reorder point), STOCK_OUT |
| LOW | OUT | STOCK_OUT |
| LOW or OUT | OK | STOCK_REPLENISHED |
| OUT | LOW | nothing (still low) |
"""

from __future__ import annotations

from dataclasses import dataclass

from stockledger.domain.model import LOW, OK, OUT, Balance, Reservation, Transfer

STOCK_CHANGED = "STOCK_CHANGED"
STOCK_LOW = "STOCK_LOW"
STOCK_OUT = "STOCK_OUT"
STOCK_REPLENISHED = "STOCK_REPLENISHED"
RESERVATION_EXPIRED = "RESERVATION_EXPIRED"
TRANSFER_UPDATED = "TRANSFER_UPDATED"
ALERT_EVENTS = (STOCK_LOW, STOCK_OUT, STOCK_REPLENISHED)
EVENT_TYPES = (
    STOCK_CHANGED,
    STOCK_LOW,
    STOCK_OUT,
    STOCK_REPLENISHED,
    RESERVATION_EXPIRED,
    TRANSFER_UPDATED,
)
"""The event types this release emits (the contract's EventType lists later parts' too)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One event. ``balance``: the balance after the command (stock events); ``entries``:
    positions, in the command's ``Changes.entries``, of the ledger entries it is about (the
    unit of work turns them into ledger ids); ``reservation`` / ``transfer``: the object of a
    RESERVATION_EXPIRED / TRANSFER_UPDATED event, after the command."""

    type: str
    balance: Balance | None = None
    entries: tuple[int, ...] = ()
    reservation: Reservation | None = None
    transfer: Transfer | None = None


def target_alert(balance: Balance) -> str:
    """The alert state ``balance`` should be in (section 15)."""
    if balance.available <= 0:
        return OUT
    return LOW if balance.low_stock else OK


def transition(balance: Balance) -> tuple[str, tuple[str, ...]]:
    """(the new stored state, the events to emit) for ``balance`` after a move, its ``alert``
    still the stored state from before (the table in the module docstring)."""
    stored, target = balance.alert, target_alert(balance)
    if target == stored:
        return stored, ()
    if target == OK:
        return OK, (STOCK_REPLENISHED,)
    if target == LOW:
        return LOW, (STOCK_LOW,) if stored == OK else ()  # OUT -> LOW: still low
    if stored == OK and balance.reorder is not None:
        return OUT, (STOCK_LOW, STOCK_OUT)
    return OUT, (STOCK_OUT,)


def reorder_quantity(balance: Balance) -> int:
    """Units a reorder suggestion orders for ``balance`` (section 15): maximum level -
    (available + incoming) when a maximum is set, else the reorder quantity. ValueError for a
    balance without a reorder point."""
    if balance.reorder is None:
        raise ValueError("no reorder point")
    if balance.reorder.maximum_level is not None:
        return balance.reorder.maximum_level - (balance.available + balance.incoming)
    return balance.reorder.reorder_quantity


def suggested(balance: Balance) -> bool:
    """Whether a reorder suggestion names ``balance``: it has a reorder point and available +
    incoming <= its minimum level (stock already on its way counts; section 15)."""
    return (
        balance.reorder is not None
        and balance.available + balance.incoming <= balance.reorder.minimum_level
    )
