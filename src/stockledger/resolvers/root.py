"""The Strawberry schema: root types, the DateTime scalar, and the extensions that guard it.

:func:`build_schema` is what the app serves (limits from :class:`Settings`); :data:`schema`
(no extensions) is what ``strawberry export-schema stockledger.resolvers.root:schema`` prints
into the committed ``schema.graphql``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import strawberry
from graphql import (
    FieldNode,
    GraphQLError,
    NoSchemaIntrospectionCustomRule,
    OperationDefinitionNode,
)
from strawberry.extensions import (
    AddValidationRules,
    MaskErrors,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    SchemaExtension,
    ValidationCache,
)
from strawberry.schema.config import StrawberryConfig
from strawberry.types import ExecutionContext

from stockledger.config import Settings
from stockledger.observability import metrics
from stockledger.resolvers.errors import (
    DOMAIN_ERRORS,
    UNEXPECTED_ERROR_MESSAGE,
    log_errors,
    should_mask_error,
)
from stockledger.resolvers.mutation import Mutation
from stockledger.resolvers.query import Query
from stockledger.schema import SCALAR_MAP

# Distinct documents kept parsed and validated (each cache is an LRU, bounded on purpose).
PARSE_CACHE_SIZE = 1024
VALIDATION_CACHE_SIZE = 1024


class StockledgerSchema(strawberry.Schema):
    """A Strawberry schema that logs unexpected errors with their traceback (before MaskErrors
    hides them from the client) and refused requests briefly."""

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        log_errors(errors)


@dataclass(frozen=True, slots=True)
class GraphQLOperation:
    """What the access log says of a request's operation: the client's ``name`` (or None),
    ``type`` (query / mutation), the root ``field`` (:func:`root_field`) and the metrics'
    ``outcome``."""

    name: str | None
    type: str
    field: str
    outcome: str


class RequestMetrics(SchemaExtension):
    """Times each operation into
    ``inventory_graphql_request_seconds{operation_type,field,outcome}``.

    Outcome: ``ok``, ``domain_error`` (a union error member was returned) or ``error``
    (top-level errors: refused or unexpected). ``field``: the operation's root field
    (:func:`root_field`). One operation-level hook, no per-field work. Leaves a
    :class:`GraphQLOperation` in ``request.state.graphql`` for the access log.
    """

    def on_operation(self) -> Iterator[None]:
        token = DOMAIN_ERRORS.set([])
        start = time.perf_counter()
        try:
            yield
        finally:
            seen = DOMAIN_ERRORS.get()
            DOMAIN_ERRORS.reset(token)
            ctx = self.execution_context
            result = ctx.result
            if result is None or getattr(result, "errors", None):
                outcome = "error"
            else:
                outcome = "domain_error" if seen else "ok"
            try:
                op_type = ctx.operation_type.value
            except Exception:  # unparsable document: no operation type
                op_type = "unknown"
            field = root_field(ctx)
            metrics.GRAPHQL_REQUEST_SECONDS.labels(
                operation_type=op_type, field=field, outcome=outcome
            ).observe(time.perf_counter() - start)
            # For the HTTP layer's access line (the request's ASGI state outlives this).
            request = getattr(ctx.context, "request", None)
            if request is not None:
                request.state.graphql = GraphQLOperation(
                    ctx.operation_name, op_type, field, outcome
                )


# The root fields a label may name: the schema's own, so the label's values stay few.
_ROOT_FIELDS: frozenset[str] = frozenset()


def root_field(ctx: ExecutionContext) -> str:
    """The operation's name for the metrics: its one root field (``reserve``, ``reserveMany``,
    ``balance`` ...), ``multiple`` when it selects several, ``introspection`` for ``__schema``
    and the like, else ``unknown``. Never the client's operation name, which is unbounded."""
    document = ctx.graphql_document
    if document is None:
        return "unknown"
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if ctx.operation_name is not None:
        operations = [o for o in operations if o.name and o.name.value == ctx.operation_name]
    if len(operations) != 1:
        return "unknown"
    fields = {
        s.name.value for s in operations[0].selection_set.selections if isinstance(s, FieldNode)
    }
    if len(fields) > 1:
        return "multiple"
    name = next(iter(fields), "")
    if name.startswith("__"):
        return "introspection"
    return name if name in _ROOT_FIELDS else "unknown"


def _config() -> StrawberryConfig:
    return StrawberryConfig(scalar_map=SCALAR_MAP)


def build_schema(settings: Settings) -> strawberry.Schema:
    """The served schema: Query, Mutation, and these extensions (each built per request):

    ParserCache and ValidationCache (speed); QueryDepthLimiter, MaxAliasesLimiter,
    MaxTokensLimiter (``settings.max_query_depth``, ``max_aliases``, ``max_tokens``);
    DisableIntrospection's rule when ``settings.introspection_enabled`` is False; MaskErrors
    (unexpected errors read "Unexpected error."). No per-field extensions.
    """
    # The limiters' validation rules are classes made once here, not per request: the
    # ValidationCache keys on them, so new classes every request would never hit the cache.
    rules = [
        *QueryDepthLimiter(max_depth=settings.max_query_depth).validation_rules,
        *MaxAliasesLimiter(max_alias_count=settings.max_aliases).validation_rules,
    ]
    if not settings.introspection_enabled:
        rules.append(NoSchemaIntrospectionCustomRule)  # what DisableIntrospection adds
    max_tokens = settings.max_tokens
    extensions: list[Callable[[], SchemaExtension]] = [
        RequestMetrics,
        lambda: MaxTokensLimiter(max_token_count=max_tokens),
        lambda: ParserCache(maxsize=PARSE_CACHE_SIZE),
        lambda: AddValidationRules(rules),
        lambda: ValidationCache(maxsize=VALIDATION_CACHE_SIZE),
        lambda: MaskErrors(
            should_mask_error=should_mask_error, error_message=UNEXPECTED_ERROR_MESSAGE
        ),
    ]
    return StockledgerSchema(
        query=Query, mutation=Mutation, config=_config(), extensions=extensions
    )


def print_sdl() -> str:
    """The SDL of the schema as committed in ``schema.graphql`` (ends with a newline)."""
    return str(schema.as_str()).rstrip("\n") + "\n"


schema: Any = strawberry.Schema(query=Query, mutation=Mutation, config=_config())
_ROOT_FIELDS = frozenset(
    name
    for root in (schema._schema.query_type, schema._schema.mutation_type)
    for name in root.fields
)
