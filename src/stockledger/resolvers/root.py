"""The Strawberry schema: root types, the DateTime scalar, and the extensions that guard it.

:func:`build_schema` is what the app serves (limits from :class:`Settings`); :data:`schema`
(no extensions) is what ``strawberry export-schema stockledger.resolvers.root:schema`` prints
into the committed ``schema.graphql``.

Hostile requests are refused before they cost anything: the document's depth, aliases, cost
and fragment nesting by one validation rule (:mod:`stockledger.resolvers.guards`), oversized
lists in the variables before GraphQL coerces them (:class:`VariablesGuard`), and with
introspection off the errors name no schema element the client did not write (suggestions are
stripped, :func:`strip_suggestions`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import strawberry
from graphql import (
    ExecutionResult,
    FieldNode,
    GraphQLError,
    NoSchemaIntrospectionCustomRule,
    OperationDefinitionNode,
)
from strawberry.extensions import (
    AddValidationRules,
    MaskErrors,
    MaxTokensLimiter,
    ParserCache,
    SchemaExtension,
    ValidationCache,
)
from strawberry.schema.config import StrawberryConfig
from strawberry.types import ExecutionContext

from stockledger.config import Settings
from stockledger.domain.validation import MAX_BATCH_ITEMS, MAX_BATCH_LINES, MAX_LINES
from stockledger.observability import metrics
from stockledger.resolvers.errors import (
    DOMAIN_ERRORS,
    UNEXPECTED_ERROR_MESSAGE,
    log_errors,
    should_mask_error,
)
from stockledger.resolvers.guards import query_guard_rule
from stockledger.resolvers.mutation import Mutation
from stockledger.resolvers.query import Query
from stockledger.resolvers.subscription import Subscription
from stockledger.schema import SCALAR_MAP

# Distinct documents kept parsed and validated (each cache is an LRU, bounded on purpose).
PARSE_CACHE_SIZE = 1024
VALIDATION_CACHE_SIZE = 1024


# graphql-core's suggestions, " Did you mean 'onHand'?" (graphql.pyutils.did_you_mean, also
# "the enum value ..." and "to use an inline fragment on ..."): names never hold a "?".
_SUGGESTION = re.compile(r" Did you mean [^?]*\?")


def strip_suggestions(message: str) -> str:
    """``message`` without graphql-core's "Did you mean ...?" suggestions, which name schema
    elements (fields, arguments, types, enum values, input fields) the client did not write.

    graphql-core 3.3 can leave them out itself (``hide_suggestions`` of ``validate`` and
    ``execute``), but Strawberry 0.341 passes it to neither (its ValidationCache calls
    ``validate`` without it), and its own ``disable_field_suggestions`` covers field names
    only; so the errors are rewritten once, on the way out.
    """
    return _SUGGESTION.sub("", message)


class StockledgerSchema(strawberry.Schema):
    """A Strawberry schema that logs unexpected errors with their traceback (before MaskErrors
    hides them from the client) and refused requests briefly.

    ``hide_suggestions``: strip "Did you mean ...?" from every error's message
    (:func:`strip_suggestions`) before it is logged and answered: parse, validation, variable
    coercion and execution errors all pass here (Strawberry calls :meth:`process_errors` on
    each, as it does for its own ``disable_field_suggestions``).
    """

    def __init__(self, *args: Any, hide_suggestions: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hide_suggestions = hide_suggestions

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        if self.hide_suggestions:
            for error in errors:
                error.message = strip_suggestions(error.message)
        log_errors(errors)


# Bounds on the raw variables, checked before GraphQL coerces them (coercion costs about 70 us
# of event-loop time per line). Above the inputs' own bounds (500 lines or items per list;
# 500 carts and 5,000 lines in all for a batch call), so a request just over those still gets
# the precise error naming its field; far enough below the 1 MiB body limit's 30,000 lines.
MAX_VARIABLE_LIST = 2 * MAX_LINES
MAX_VARIABLE_VALUES = MAX_BATCH_ITEMS + MAX_BATCH_LINES + MAX_LINES
# Lists and objects walked at most (a batch call at its bounds has about 6,500), so that the
# walk itself stays a few milliseconds whatever the body holds.
MAX_VARIABLE_CONTAINERS = 2 * MAX_VARIABLE_VALUES


def oversized_variables(variables: object) -> str | None:
    """Why the raw ``variables`` (decoded JSON) are too large to coerce, or None.

    Too large: a list longer than :data:`MAX_VARIABLE_LIST` (1,000) or an object with more
    keys than that (no input type has more than a handful of fields), more than
    :data:`MAX_VARIABLE_VALUES` (6,000) list elements in all, at any depth, or more than
    :data:`MAX_VARIABLE_CONTAINERS` (12,000) lists and objects in all. Walks the JSON's lists
    and objects with a stack (no recursion; scalars are only counted), each once, and stops
    at the first bound crossed; the message names the value (``$input.lines``).
    """
    total = containers = 0
    # (a list or object, its path: (key or index, parent path) ... ending in None)
    stack: list[tuple[Any, Any]] = [(variables, None)]
    while stack:
        value, path = stack.pop()
        containers += 1
        if containers > MAX_VARIABLE_CONTAINERS:
            return (
                f"variables: more than {MAX_VARIABLE_CONTAINERS} lists and objects in all; a "
                f"request may have at most {MAX_VARIABLE_CONTAINERS}"
            )
        if isinstance(value, list):
            total += len(value)
            if len(value) > MAX_VARIABLE_LIST:
                return (
                    f"variables: {_json_path(path)} has {len(value)} values; a list may have at "
                    f"most {MAX_VARIABLE_LIST} (an input takes at most {MAX_LINES} lines or items)"
                )
            if total > MAX_VARIABLE_VALUES:
                return (
                    f"variables: more than {MAX_VARIABLE_VALUES} list values in all; a request "
                    f"may have at most {MAX_VARIABLE_VALUES} (a batch call takes at most "
                    f"{MAX_BATCH_ITEMS} items and {MAX_BATCH_LINES} lines in all)"
                )
            children: Iterable[tuple[Any, Any]] = enumerate(value)
        elif isinstance(value, dict):
            if len(value) > MAX_VARIABLE_LIST:
                return (
                    f"variables: {_json_path(path)} has {len(value)} fields; an object may have "
                    f"at most {MAX_VARIABLE_LIST}"
                )
            children = value.items()
        else:
            continue
        stack.extend(
            ((child, (key, path)) for key, child in children if isinstance(child, (list, dict)))
        )
    return None


def _json_path(path: Any) -> str:
    """``("lines", ("input", None))`` -> ``$input.lines``; ``None`` -> ``the variables``."""
    keys = []
    while path is not None:
        key, path = path
        keys.append(str(key))
    return "$" + ".".join(reversed(keys)) if keys else "the variables"


class VariablesGuard(SchemaExtension):
    """Refuses oversized lists in the variables (:func:`oversized_variables`) before GraphQL
    coerces them: the operation then answers one top-level ``BAD_USER_INPUT`` error and data
    null, and nothing runs.

    Runs when execution starts (after parsing and validation, which never look at variable
    values, and before graphql-core's ``execute`` coerces them): it sets the execution
    context's result, and Strawberry then skips ``execute``.
    """

    def on_execute(self) -> Iterator[None]:
        ctx = self.execution_context
        reason = oversized_variables(ctx.variables) if ctx.variables else None
        if reason is not None:
            # The same code as resolvers.errors.mutation_results gives a batch over its bounds.
            error = GraphQLError(reason, extensions={"code": "BAD_USER_INPUT"})
            ctx.result = ExecutionResult(data=None, errors=[error])
        yield


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
            # A subscription's operation lasts as long as the client stays: no request
            # latency (inventory_subscriptions_active counts them instead).
            if op_type != "subscription":
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

    ParserCache and ValidationCache (speed); MaxTokensLimiter (``settings.max_tokens``); the
    query guard rule (:func:`~stockledger.resolvers.guards.query_guard_rule`:
    ``settings.max_query_depth``, ``max_aliases``, ``max_query_cost`` and fragment nesting),
    which replaces Strawberry's QueryDepthLimiter and MaxAliasesLimiter (they re-walk every
    fragment spread: exponential time for fragments spreading each other twice); the
    :class:`VariablesGuard`; DisableIntrospection's rule when ``settings.introspection_enabled``
    is False, and then no "Did you mean ...?" suggestions either (:class:`StockledgerSchema`);
    MaskErrors (unexpected errors read "Unexpected error."). No per-field extensions.
    """
    # The validation rules are classes made once here, not per request: the ValidationCache
    # keys on them, so new classes every request would never hit the cache.
    rules: list[Any] = [
        query_guard_rule(
            max_depth=settings.max_query_depth,
            max_aliases=settings.max_aliases,
            max_cost=settings.max_query_cost,
        )
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
        VariablesGuard,
        lambda: MaskErrors(
            should_mask_error=should_mask_error, error_message=UNEXPECTED_ERROR_MESSAGE
        ),
    ]
    return StockledgerSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        config=_config(),
        extensions=extensions,
        hide_suggestions=not settings.introspection_enabled,
    )


def print_sdl() -> str:
    """The SDL of the schema as committed in ``schema.graphql`` (ends with a newline)."""
    return str(schema.as_str()).rstrip("\n") + "\n"


schema: Any = strawberry.Schema(
    query=Query, mutation=Mutation, subscription=Subscription, config=_config()
)
_ROOT_FIELDS = frozenset(
    name
    for root in (
        schema._schema.query_type,
        schema._schema.mutation_type,
        schema._schema.subscription_type,
    )
    for name in root.fields
)
