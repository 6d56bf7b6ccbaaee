"""The GraphQL side of API keys (part ACCESS; ARCHITECTURE section 13): ``viewer``,
``apiKeys``, ``createApiKey`` and ``revokeApiKey``.

``apiKeys`` and the two mutations need the ADMIN scope (their permission classes, in
``query.py`` and ``mutation.py``); ``viewer`` needs none, since it only describes the caller.
Everything acts for the caller's org (:attr:`GraphQLContext.org`): its keys only, and
another org's key id is NOT_FOUND. Making a key of another org is the one cross-org act, and
only an ADMIN key of org ``system`` may (:func:`~stockledger.domain.access.may_create_key_for`);
anyone else gets a FORBIDDEN field error, and nothing is written.
"""

from __future__ import annotations

from typing import Any

from graphql import GraphQLError

from stockledger.domain import access as a
from stockledger.resolvers import convert
from stockledger.resolvers.context import GraphQLContext
from stockledger.resolvers.convert import opt
from stockledger.resolvers.errors import mutation_result, query_errors
from stockledger.schema import (
    ApiKeyConnection,
    CreateApiKeyInput,
    CreateApiKeyResult,
    CreateApiKeySuccess,
    RevokeApiKeyInput,
    RevokeApiKeyResult,
    RevokeApiKeySuccess,
    Viewer,
)
from stockledger.services.api_keys import Created, Revoked, check_org


def viewer(ctx: GraphQLContext) -> Viewer:
    """The caller: its org, its key and its effective scopes (ADMIN expanded).

    With ``STOCKLEDGER_AUTH=off`` no key authenticated the request, and ``Viewer.apiKey`` is
    non-null in the contract: rather than invent a key that does not exist (an id no list
    shows, a key nobody can revoke), this raises a field error with ``extensions.code:
    "UNAUTHENTICATED"`` (so ``data`` is null, per the GraphQL spec), saying why.
    """
    if ctx.api_key is None:
        raise GraphQLError(
            "this request has no API key (the server runs with STOCKLEDGER_AUTH=off): there "
            "is no key to describe",
            extensions={"code": "UNAUTHENTICATED"},
        )
    return Viewer(
        org=ctx.api_key.org, api_key=convert.api_key(ctx.api_key), scopes=convert.scopes(ctx.scopes)
    )


async def api_keys(info: Any, first: int, after: str | None) -> ApiKeyConnection:
    """The caller's org's keys, oldest first (:meth:`ApiKeys.page`); a bad ``first`` or
    cursor is a top-level ``BAD_USER_INPUT`` error, as on the other connections."""
    ctx: GraphQLContext = info.context
    with query_errors(info):
        page = await ctx.api_keys.page(ctx.org, first, after)
    return convert.api_key_connection(page)


def forbidden(message: str) -> GraphQLError:
    """A field error with ``extensions.code: "FORBIDDEN"``, as a missing scope gets."""
    return GraphQLError(message, extensions={"code": "FORBIDDEN"})


async def create_api_key(info: Any, input: CreateApiKeyInput) -> Any:
    """``createApiKey`` (:meth:`ApiKeys.create_once`). The org is checked first: its shape
    (a ValidationError: a typo, not another org), then whether the caller may make a key of
    it, so a caller that may not learns nothing else (FORBIDDEN; nothing is written)."""
    ctx: GraphQLContext = info.context
    given = opt(input.org)
    org = ctx.org if given is None else given
    role = opt(input.role)
    scopes = opt(input.scopes)

    async def call() -> Created:
        check_org(org)
        if not a.may_create_key_for(ctx.org, ctx.scopes, org):
            raise forbidden(
                f"this key may make keys of its own org ({ctx.org!r}) only; a key of another "
                f"org needs the ADMIN scope of org {a.SYSTEM_ORG!r}"
            )
        return await ctx.api_keys.create_once(
            ctx.org,
            input.idempotency_key,
            org=org,
            name=input.name,
            role=None if role is None else a.Role(role.value),
            scopes=None if scopes is None else [a.Scope(s.value) for s in scopes],
            expires_at=opt(input.expires_at),
        )

    return await mutation_result(info, call(), _created, CreateApiKeyResult)


async def revoke_api_key(info: Any, input: RevokeApiKeyInput) -> Any:
    """``revokeApiKey`` (:meth:`ApiKeys.revoke_once`) within the caller's org."""
    ctx: GraphQLContext = info.context
    call = ctx.api_keys.revoke_once(ctx.org, input.idempotency_key, str(input.id))
    return await mutation_result(info, call, _revoked, RevokeApiKeyResult)


def _created(x: Created) -> CreateApiKeySuccess:
    return CreateApiKeySuccess(api_key=convert.api_key(x.key), secret=x.secret, replayed=x.replayed)


def _revoked(x: Revoked) -> RevokeApiKeySuccess:
    return RevokeApiKeySuccess(api_key=convert.api_key(x.key), replayed=x.replayed)
