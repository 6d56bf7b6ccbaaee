"""Types of part EVENTS that the subscriptions (and webhooks) show: ``EventType`` and
``StockAlert`` (ARCHITECTURE section 15, ``schema-v2.graphql``).

``EventType`` lists every value of the contract, the later parts' too (this release emits the
six of ``domain/events.py``); each value equals its name, as the outbox's ``type`` has it.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum

import strawberry

from stockledger.schema.types import Balance


@strawberry.enum(
    description="Event types, as delivered to webhooks and recorded in the outbox "
    "(ARCHITECTURE section 15)."
)
class EventType(Enum):
    STOCK_CHANGED = strawberry.enum_value(
        "STOCK_CHANGED", description="Any write changed a balance: the balance after it."
    )
    STOCK_LOW = strawberry.enum_value(
        "STOCK_LOW",
        description="The balance's alert state went OK -> LOW (available <= the reorder "
        "point's minimumLevel).",
    )
    STOCK_OUT = strawberry.enum_value(
        "STOCK_OUT", description="The alert state went to OUT (available reached 0)."
    )
    STOCK_REPLENISHED = strawberry.enum_value(
        "STOCK_REPLENISHED", description="The alert state went from LOW or OUT back to OK."
    )
    RESERVATION_EXPIRED = "RESERVATION_EXPIRED"
    TRANSFER_UPDATED = "TRANSFER_UPDATED"
    DISCREPANCY_OPENED = strawberry.enum_value("DISCREPANCY_OPENED", description="Part INTEGRITY.")
    APPROVAL_REQUESTED = strawberry.enum_value("APPROVAL_REQUESTED", description="Part INTEGRITY.")
    APPROVAL_DECIDED = strawberry.enum_value("APPROVAL_DECIDED", description="Part INTEGRITY.")
    SUPPLIER_ORDER_UPDATED = strawberry.enum_value(
        "SUPPLIER_ORDER_UPDATED", description="Part SUPPLY."
    )


@strawberry.type(description="A STOCK_LOW, STOCK_OUT or STOCK_REPLENISHED transition.")
class StockAlert:
    event_type: EventType
    balance: Balance = strawberry.field(description="The balance after the change.")
    occurred_at: datetime = strawberry.field(
        description="When the change was written: the event's timestamp."
    )
