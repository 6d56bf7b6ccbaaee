"""Part ACCESS of ``schema-v2.graphql``: scopes, roles, API keys and the viewer.

Shapes only; ``resolvers/keys.py`` fills them from :mod:`stockledger.domain.access` values
(each enum value here equals its name and the domain enum's value).
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated

import strawberry

from stockledger.schema.errors import IdempotencyKeyReusedError, NotFoundError, ValidationError
from stockledger.schema.types import PageInfo


@strawberry.enum(
    description="What an API key may do. Roles are presets of scopes (ARCHITECTURE section 13)."
)
class Scope(Enum):
    STOCK_READ = strawberry.enum_value(
        "STOCK_READ",
        description="Every read of stock, locations, transfers, reservations, lowStock, "
        "reorderSuggestions, lots, node; subscriptions.",
    )
    RESERVATIONS_WRITE = strawberry.enum_value(
        "RESERVATIONS_WRITE",
        description="reserve, release, extendReservation, confirmReservation, deduct.",
    )
    STOCK_WRITE = strawberry.enum_value(
        "STOCK_WRITE",
        description="restock, adjust, transfer/receive/cancel, cycle counts, reorder points, "
        "write-offs, supplier orders.",
    )
    LEDGER_READ = strawberry.enum_value(
        "LEDGER_READ", description="ledger, discrepancies, approvals, verifyLedger."
    )
    APPROVE_SUPERVISOR = strawberry.enum_value(
        "APPROVE_SUPERVISOR", description="Decide approval requests that need a supervisor."
    )
    APPROVE_CONTROLLER = strawberry.enum_value(
        "APPROVE_CONTROLLER",
        description="Decide approval requests that need a controller (or a supervisor).",
    )
    ADMIN = strawberry.enum_value(
        "ADMIN",
        description="API keys, createLocation/updateLocation, webhooks and deliveries, "
        "suppliers, policies, reconcile; implies every scope.",
    )


@strawberry.enum(description="Presets of scopes; a key stores the scopes, not the role.")
class Role(Enum):
    STOREFRONT = strawberry.enum_value("STOREFRONT", description="STOCK_READ, RESERVATIONS_WRITE.")
    OPERATOR = strawberry.enum_value(
        "OPERATOR", description="STOREFRONT + STOCK_WRITE + LEDGER_READ."
    )
    AUDITOR = strawberry.enum_value("AUDITOR", description="STOCK_READ + LEDGER_READ.")
    SUPERVISOR = strawberry.enum_value("SUPERVISOR", description="OPERATOR + APPROVE_SUPERVISOR.")
    CONTROLLER = strawberry.enum_value(
        "CONTROLLER", description="OPERATOR + APPROVE_SUPERVISOR + APPROVE_CONTROLLER."
    )
    ADMIN = strawberry.enum_value("ADMIN", description="ADMIN.")


@strawberry.type(
    description="An API key as the service shows it: never its secret, which is shown once, "
    "at creation."
)
class ApiKey:
    id: strawberry.ID
    name: str
    prefix: str = strawberry.field(
        description="The first characters of the secret (e.g. sl_3fA9xK2q), to recognise it "
        "in a list."
    )
    org: str
    scopes: list[Scope] = strawberry.field(
        description="The granted scopes (a role is stored as its scopes)."
    )
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None = strawberry.field(description="Written at most once a minute.")
    revoked_at: datetime | None


@strawberry.type(description="Who is calling: the key the request authenticated with.")
class Viewer:
    org: str
    api_key: ApiKey
    scopes: list[Scope] = strawberry.field(
        description="The effective scopes: the key's, with ADMIN expanded to every scope."
    )


@strawberry.type
class ApiKeyEdge:
    cursor: str
    node: ApiKey


@strawberry.type
class ApiKeyConnection:
    edges: list[ApiKeyEdge]
    page_info: PageInfo


@strawberry.input
class CreateApiKeyInput:
    idempotency_key: str
    name: str
    role: Role | None = strawberry.field(
        default=strawberry.UNSET, description="Exactly one of role and scopes."
    )
    scopes: list[Scope] | None = strawberry.UNSET
    org: str | None = strawberry.field(
        default=strawberry.UNSET,
        description="Defaults to the caller's org; another org needs the ADMIN scope of org "
        "'system' (the operator's key).",
    )
    expires_at: datetime | None = strawberry.field(
        default=strawberry.UNSET, description="In the future; omitted or null: never expires."
    )


@strawberry.type
class CreateApiKeySuccess:
    api_key: ApiKey
    secret: str | None = strawberry.field(
        description="The secret, shown only in this response (never on a replay: then null)."
    )
    replayed: bool


@strawberry.input
class RevokeApiKeyInput:
    idempotency_key: str
    id: strawberry.ID


@strawberry.type
class RevokeApiKeySuccess:
    api_key: ApiKey
    replayed: bool


CreateApiKeyResult = Annotated[
    CreateApiKeySuccess | ValidationError | IdempotencyKeyReusedError,
    strawberry.union("CreateApiKeyResult"),
]
RevokeApiKeyResult = Annotated[
    RevokeApiKeySuccess | NotFoundError | ValidationError | IdempotencyKeyReusedError,
    strawberry.union("RevokeApiKeyResult"),
]
