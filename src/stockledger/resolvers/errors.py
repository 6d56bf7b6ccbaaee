"""The one place where domain exceptions become GraphQL errors.

* Expected failures of a mutation (``services.errors.*``) become the matching ``Error`` member of
  the mutation's result union (:func:`mutation_error`).
* Invalid query arguments (``first`` outside 1..500, a malformed cursor, a bad filter string)
  become a top-level GraphQL error whose message says what is wrong (:class:`QueryInputError`).
* Anything else is unexpected: a top-level error masked as "Unexpected error." by the
  MaskErrors extension (:func:`should_mask_error`), with the original logged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import strawberry
from graphql import GraphQLError

from stockledger import schema as s
from stockledger.services import errors as e

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

UNEXPECTED_ERROR_MESSAGE = "Unexpected error."

# Codes of the domain errors a request returned as union members, for the request metrics.
# A list set per operation (child tasks of a query share the same list object).
DOMAIN_ERRORS: ContextVar[list[str] | None] = ContextVar("stockledger_domain_errors", default=None)


class QueryInputError(Exception):
    """A query's arguments are invalid; shown to the client as a top-level GraphQL error."""


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
        return s.NotFoundError(code=code, message=exc.message, entity=exc.entity, key=exc.key)
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
            reservation_id=strawberry.ID(str(exc.reservation_id)),
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
    raise TypeError(f"no GraphQL error type for {type(exc).__name__}")


# The domain failures each mutation's result union can carry (schema.graphql, *Result unions).
RESTOCK_ERRORS = (e.ValidationError, e.IdempotencyKeyReusedError, e.LockTimeoutError)
ADJUST_ERRORS = (
    e.InsufficientStockError,
    e.NotFoundError,
    e.ValidationError,
    e.VersionConflictError,
    e.IdempotencyKeyReusedError,
    e.LockTimeoutError,
)
RESERVE_ERRORS = (
    e.InsufficientStockError,
    e.NotFoundError,
    e.ValidationError,
    e.IdempotencyKeyReusedError,
    e.LockTimeoutError,
)
RELEASE_ERRORS = (
    e.NotFoundError,
    e.ReservationNotActiveError,
    e.ValidationError,
    e.IdempotencyKeyReusedError,
    e.LockTimeoutError,
)
DEDUCT_ERRORS = (
    e.InsufficientStockError,
    e.NotFoundError,
    e.ReservationNotActiveError,
    e.ValidationError,
    e.IdempotencyKeyReusedError,
    e.LockTimeoutError,
)
EXTEND_ERRORS = RELEASE_ERRORS


async def mutation_result(
    call: Awaitable[T],
    success: Callable[[T], R],
    allowed: tuple[type[e.StockError], ...],
) -> Any:
    """Await one service call: its result through ``success``, or its domain failure as the
    union member. A failure the union cannot carry propagates (an unexpected, masked error)."""
    try:
        result = await call
    except allowed as exc:
        seen = DOMAIN_ERRORS.get()
        if seen is not None:
            seen.append(exc.code)
        return _error_type(exc)
    return success(result)


@contextmanager
def query_input_errors() -> Iterator[None]:
    """Turn the read side's ValidationError (bad ``first``, cursor, filter) into a
    :class:`QueryInputError` saying which argument is wrong."""
    try:
        yield
    except e.ValidationError as exc:
        raise QueryInputError(exc.message) from exc


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
    """Log each error of a request: unexpected ones with their traceback, others briefly."""
    for error in errors:
        if should_mask_error(error):
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
