"""The one place where domain exceptions become GraphQL errors.

* Expected failures of a mutation (``domain.errors.*``) become the matching ``Error`` member of
  the mutation's result union (:func:`mutation_error`).
* Invalid query arguments (``first`` outside 1..500, a malformed cursor, a bad filter string)
  become a top-level GraphQL error whose message says what is wrong (:class:`QueryInputError`).
* Anything else is unexpected: a top-level error masked as "Unexpected error." by the
  MaskErrors extension (:func:`should_mask_error`), with the original logged.
"""

from __future__ import annotations

import logging
import math
import typing
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import strawberry
from graphql import GraphQLError, GraphQLSyntaxError
from sqlalchemy.exc import DBAPIError

from stockledger import schema as s
from stockledger.db.engine import is_connection_lost
from stockledger.domain import errors as e
from stockledger.domain import ids
from stockledger.observability import metrics
from stockledger.services.errors import ServiceUnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

UNEXPECTED_ERROR_MESSAGE = "Unexpected error."

# Codes of the domain errors a request returned as union members, for the request metrics.
# A list set per operation (child tasks of a query share the same list object).
DOMAIN_ERRORS: ContextVar[list[str] | None] = ContextVar("stockledger_domain_errors", default=None)


class QueryInputError(Exception):
    """A query's arguments are invalid; shown to the client as a top-level GraphQL error."""


def _not_found_key(exc: e.NotFoundError) -> str:
    """``NotFoundError.key`` as rendered: a reservation the rules looked up by number shows
    its opaque id (as ``Reservation.id``; the rules know only numbers). A key that is no
    number stays as it is: an id as the client sent it that names nothing, or ``TYPE:ID`` of a
    reference."""
    key = exc.key
    if exc.entity == ids.RESERVATION and (number := ids.number_of(key)) is not None:
        return ids.reservation_global_id(number)
    if exc.entity == ids.TRANSFER and (number := ids.number_of(key)) is not None:
        return ids.transfer_global_id(number)
    return key


def _error_type(exc: e.StockError) -> Any:
    """The schema error object for a domain exception (a member of some result union)."""
    code = s.ErrorCode[exc.code]
    if isinstance(exc, e.InsufficientStockError):
        shortages = [
            s.Shortage(sku=x.sku, location=x.location, requested=x.requested, available=x.available)
            for x in exc.shortages
        ]
        return s.InsufficientStockError(code=code, message=exc.message, shortages=shortages)
    if isinstance(exc, e.NotFoundError):
        return s.NotFoundError(
            code=code, message=exc.message, entity=exc.entity, key=_not_found_key(exc)
        )
    if isinstance(exc, e.ValidationError):
        return s.ValidationError(code=code, message=exc.message, field=exc.field)
    if isinstance(exc, e.IdempotencyKeyReusedError):
        return s.IdempotencyKeyReusedError(
            code=code, message=exc.message, idempotency_key=exc.idempotency_key
        )
    if isinstance(exc, e.ReservationNotActiveError):
        return s.ReservationNotActiveError(
            code=code,
            message=exc.message,
            reservation_id=strawberry.ID(ids.reservation_global_id(exc.reservation_id)),
            status=s.ReservationStatus[exc.status],
        )
    if isinstance(exc, e.VersionConflictError):
        return s.VersionConflictError(
            code=code,
            message=exc.message,
            expected_version=exc.expected_version,
            actual_version=exc.actual_version,
        )
    if isinstance(exc, e.LockTimeoutError):
        return s.LockTimeoutError(code=code, message=exc.message, retry_after_ms=exc.retry_after_ms)
    if isinstance(exc, e.TransferNotOpenError):
        return s.TransferNotOpenError(
            code=code,
            message=exc.message,
            transfer_id=strawberry.ID(ids.transfer_global_id(exc.transfer_id)),
            status=s.TransferStatus[exc.status],
        )
    if isinstance(exc, e.LocationUnavailableError):
        return s.LocationUnavailableError(
            code=code, message=exc.message, location=exc.location, exists=exc.exists
        )
    raise TypeError(f"no GraphQL error type for {type(exc).__name__}")


def union_members(result_type: Any) -> frozenset[str]:
    """The names of the types a result union (``Annotated[A | B, strawberry.union(...)]``) can
    carry: the schema's unions decide which domain errors each mutation answers."""
    members = typing.get_args(typing.get_args(result_type)[0])
    return frozenset(member.__name__ for member in members)


async def mutation_result(
    info: Any, call: Awaitable[T], success: Callable[[T], R], result_type: Any
) -> Any:
    """Await one service call: its result through ``success``, or its domain failure as the
    member of ``result_type`` of that name. A failure the union cannot carry propagates (an
    unexpected, masked error); a database that is away is a top-level ``UNAVAILABLE``."""
    try:
        result = await call
    except e.StockError as exc:
        if type(exc).__name__ not in union_members(result_type):
            raise
        seen = DOMAIN_ERRORS.get()
        if seen is not None:
            seen.append(exc.code)
        return _error_type(exc)
    except ServiceUnavailableError as exc:
        raise unavailable(info, exc.retry_after_ms, exc.message) from exc
    return success(result)


async def mutation_results(
    info: Any, call: Awaitable[Sequence[Any]], success: Callable[[Any], R], result_type: Any
) -> list[Any]:
    """Await one batch call (part BATCH): each item's result through ``success``, or its
    domain failure as its union member, in input order. A request over the bounds is a
    top-level ``BAD_USER_INPUT`` (nothing was done); a database that is away for an item makes
    the whole call a top-level ``UNAVAILABLE`` (a retry with the same keys replays the items
    that did commit)."""
    try:
        results = await call
    except e.ValidationError as exc:
        raise GraphQLError(exc.message, extensions={"code": "BAD_USER_INPUT"}) from exc
    except ServiceUnavailableError as exc:
        raise unavailable(info, exc.retry_after_ms, exc.message) from exc
    members = union_members(result_type)
    out = []
    seen = DOMAIN_ERRORS.get()
    for item in results:
        if not isinstance(item, e.StockError):
            out.append(success(item))
            continue
        if type(item).__name__ not in members:
            raise item
        if seen is not None:
            seen.append(item.code)
        out.append(_error_type(item))
    return out


def unavailable(info: Any, retry_after_ms: int, message: str) -> GraphQLError:
    """The top-level error for a database that is away: ``extensions.code: "UNAVAILABLE"``
    with ``retryAfterMs``, and HTTP 503 with ``Retry-After`` (seconds; RFC 9110, 10.2.3)."""
    response = getattr(info.context, "response", None)
    if response is not None:
        response.status_code = 503
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after_ms / 1000)))
    return GraphQLError(
        message, extensions={"code": ServiceUnavailableError.code, "retryAfterMs": retry_after_ms}
    )


@contextmanager
def query_errors(info: Any) -> Iterator[None]:
    """Around a read: the read side's ValidationError (bad ``first``, cursor, filter) becomes
    a :class:`QueryInputError` saying which argument is wrong, and a database that is away a
    top-level ``UNAVAILABLE`` (:func:`unavailable`)."""
    try:
        yield
    except e.ValidationError as exc:
        raise QueryInputError(exc.message) from exc
    except DBAPIError as exc:
        if not is_connection_lost(exc):
            raise
        raise unavailable(info, 1000, "the database is unavailable; retry the query") from exc


def top_level_code(error: GraphQLError) -> str:
    """The ``extensions.code`` of a top-level error, by Apollo Server's names, which clients
    already switch on (apollographql.com/docs/apollo-server/data/errors): a code the error
    carries (``UNAVAILABLE``, ``BAD_USER_INPUT`` ...) as it is; else
    ``GRAPHQL_PARSE_FAILED`` for a document that does not parse (or is over the token limit),
    ``BAD_USER_INPUT`` for variables or arguments that are not valid,
    ``INTERNAL_SERVER_ERROR`` for an unexpected (masked) error or any other error of execution,
    and ``GRAPHQL_VALIDATION_FAILED`` for a document the schema's rules refuse."""
    given = (error.extensions or {}).get("code")
    if isinstance(given, str):
        return given
    original = error.original_error
    if isinstance(error, GraphQLSyntaxError) or isinstance(original, GraphQLSyntaxError):
        return "GRAPHQL_PARSE_FAILED"
    if isinstance(original, QueryInputError) or error.message.startswith("Variable '$"):
        return "BAD_USER_INPUT"  # graphql-core's coercion of variables: "Variable '$x' got ..."
    if error.path is not None or error.message == UNEXPECTED_ERROR_MESSAGE:
        return "INTERNAL_SERVER_ERROR"
    return "GRAPHQL_VALIDATION_FAILED"


def should_mask_error(error: GraphQLError) -> bool:
    """True for errors the client must not see the details of (the MaskErrors predicate).

    Not masked: syntax, validation and limit errors (no original exception), invalid variable
    or argument values (raised while coercing input, before any resolver ran: no path), and
    :class:`QueryInputError`. Masked: any other exception a resolver raised.
    """
    original = error.original_error
    if original is None or isinstance(original, (QueryInputError, GraphQLError)):
        return False
    return error.path is not None


def log_errors(errors: list[GraphQLError]) -> None:
    """Log each error of a request: unexpected ones with their traceback (and counted in
    ``inventory_unexpected_errors_total``), others briefly."""
    for error in errors:
        if should_mask_error(error):
            metrics.UNEXPECTED_ERRORS_TOTAL.inc()
            original = error.original_error
            log.error(
                "unexpected error in %s: %r",
                ".".join(str(p) for p in error.path or ()),
                original,
                exc_info=(type(original), original, original.__traceback__)
                if original is not None
                else None,
            )
        else:
            log.info("graphql request refused: %s", error.message)
