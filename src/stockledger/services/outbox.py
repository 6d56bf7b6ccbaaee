"""The outbox rows of a batch: each applied command's events (``domain/events.py``) rendered as
the Standard Webhooks body that webhooks and subscriptions carry (ARCHITECTURE section 15):

``{"type": "STOCK_OUT", "timestamp": "<ISO 8601>", "data": {"org": ..., "balance": {...},
"ledgerEntryIds": [...]}}``; a reservation's or transfer's event carries it under ``data`` by
its name. Ids are the ones the API shows (opaque for balances, reservations and transfers;
ledger entry ids as strings). JSON by the standard library, compact and key-ordered so the
same event is the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from stockledger.domain import ids
from stockledger.domain.events import Event
from stockledger.domain.model import Balance, Reservation, Transfer
from stockledger.domain.state import Changes


def balance_data(b: Balance) -> dict[str, Any]:
    """A balance as events show it (the fields of section 15, plus its id, reorder point and
    lowStock, so a subscription's Balance has every field)."""
    return {
        "id": ids.balance_global_id(b.location, b.sku),
        "sku": b.sku,
        "location": b.location,
        "onHand": b.on_hand,
        "reserved": b.reserved,
        "committed": b.committed,
        "available": b.available,
        "incoming": b.incoming,
        "version": b.version,
        "lowStock": b.low_stock,
        "reorderPoint": None
        if b.reorder is None
        else {
            "minimumLevel": b.reorder.minimum_level,
            "reorderQuantity": b.reorder.reorder_quantity,
            "maximumLevel": b.reorder.maximum_level,
        },
    }


def reservation_data(r: Reservation) -> dict[str, Any]:
    """A reservation as a RESERVATION_EXPIRED event shows it: opaque id, status, reference,
    lines with their remaining units."""
    return {
        "id": ids.reservation_global_id(r.id),
        "status": r.status,
        "reference": None
        if r.reference is None
        else {"type": r.reference.type, "id": r.reference.id},
        "lines": [
            {
                "sku": ln.sku,
                "location": ln.location,
                "quantity": ln.quantity,
                "remaining": ln.remaining,
            }
            for ln in r.lines or ()
        ],
    }


def transfer_data(t: Transfer) -> dict[str, Any]:
    """A transfer as a TRANSFER_UPDATED event shows it: opaque id, status, locations, lines
    (units sent, received, remaining, returned)."""
    return {
        "id": ids.transfer_global_id(t.id),
        "status": t.status,
        "fromLocation": t.from_location,
        "toLocation": t.to_location,
        "lines": [
            {
                "sku": ln.sku,
                "quantity": ln.quantity,
                "received": ln.received,
                "remaining": ln.remaining,
                "returned": ln.returned,
            }
            for ln in t.lines
        ],
    }


def payload(org_id: str, event: Event, ledger_ids: Sequence[int], at: datetime) -> str:
    """The Standard Webhooks body of ``event`` of ``org_id`` at ``at`` (UTC), JSON."""
    data: dict[str, Any] = {"org": org_id}
    if event.balance is not None:
        data["balance"] = balance_data(event.balance)
    if event.reservation is not None:
        data["reservation"] = reservation_data(event.reservation)
    if event.transfer is not None:
        data["transfer"] = transfer_data(event.transfer)
    data["ledgerEntryIds"] = [str(i) for i in ledger_ids]
    body = {"type": event.type, "timestamp": at.isoformat(), "data": data}
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def outbox_rows(
    org_id: str, applied: Sequence[Changes], ledger_ids: dict[int, int], at: datetime
) -> list[tuple[str, str]]:
    """(event type, payload) of every event of ``applied`` (each command's committed changes,
    in arrival order: the order their entries were written in), in order. ``ledger_ids``
    maps an entry's index in the batch's entries (the concatenation of ``applied``'s) to its
    id; an entry without one (its id was not read back) is left out of the list."""
    rows: list[tuple[str, str]] = []
    offset = 0
    for changes in applied:
        for event in changes.events:
            named = [ledger_ids[offset + i] for i in event.entries if offset + i in ledger_ids]
            rows.append((event.type, payload(org_id, event, named, at)))
        offset += len(changes.entries)
    return rows
