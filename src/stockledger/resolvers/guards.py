"""Document limits checked during validation: depth, aliases, cost and fragment nesting.

One graphql-core validation rule (:func:`query_guard_rule`) measures a document once, before
the specified rules walk it, and refuses it when it is over a limit. Each fragment is measured
once and its measure reused wherever it is spread (memoized), so a document whose fragments
spread each other twice per level costs linear time to measure, where re-walking every spread
(Strawberry's ``QueryDepthLimiter`` and ``MaxAliasesLimiter``) costs 2^levels. No step recurses
in Python: a chain of thousands of fragments is measured with explicit stacks.

The measures (GraphQL spec, "Executable Definitions" and "Fragments",
https://spec.graphql.org/October2021/#sec-Language.Fragments):

- **depth**: the nesting level of the deepest field, root fields at 0; fragments and inline
  fragments add no level; the subtree of an introspection field (``__schema`` ...) is not
  counted (as Strawberry's ``QueryDepthLimiter`` did, whose message is kept).
- **aliases**: aliased fields of all the document's operations, each fragment counted every
  time it is spread (as Strawberry's ``MaxAliasesLimiter`` did, whose message is kept).
- **cost**: every field costs 1; a field whose definition takes a ``first`` argument (a page
  of a connection) costs 1 + ``first`` x the cost of its selection, with ``first`` clamped to
  1..500 (:data:`~stockledger.services.queries.MAX_PAGE_SIZE`), its schema default (50) when
  absent and 500 when it is a variable (validation is cached per document, before variables
  are known, so a variable counts as its largest value). A plain list (a reservation's lines,
  a payload's balances) counts once: its length is bounded by the inputs and the data, not
  by the client. Fragments count every time they are spread, so cost counts the expansion.
- **fragment nesting**: the longest chain of fragments spreading each other.

A document over the fragment nesting bound (:data:`MAX_FRAGMENT_NESTING`), or with a cycle
of more fragments than that bound, would make graphql-core's own rules
(``NoFragmentCyclesRule``, ``OverlappingFieldsCanBeMergedRule``) and its executor's field
collection recurse once per fragment; it is refused before they run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLArgument,
    GraphQLError,
    GraphQLField,
    GraphQLInterfaceType,
    GraphQLNamedType,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    SchemaMetaFieldDef,
    SelectionSetNode,
    TypeMetaFieldDef,
    TypeNameMetaFieldDef,
    ValidationRule,
    VariableNode,
    get_named_type,
)
from graphql.validation.validate import ValidationAbortedError

from stockledger.services.queries import MAX_PAGE_SIZE

# Fragments spreading fragments, at most this many in a chain. Real clients nest fragments as
# their components nest (a handful of levels); graphql-core's own bound is 200 levels of
# selections and spreads together (graphql.language.parser.MAX_NESTING_DEPTH), far above what
# a request needs and close to where its recursive rules exhaust the stack.
MAX_FRAGMENT_NESTING = 32

# Measures saturate here: a hostile document can spread 2^n fields, and a refusal needs only
# to know that the count is far over its limit.
SATURATED = 10**15

ANONYMOUS = "anonymous"  # the name of an unnamed operation in messages (as Strawberry's)


@dataclass(frozen=True, slots=True)
class Measure:
    """The measure of one selection set, with every fragment it spreads expanded.

    ``depth``: level of its deepest field relative to the set (0: fields at the set's own
    level only; -1: no field at all); ``aliases``: aliased fields; ``cost``: see the module
    docstring; ``nesting``: the longest chain of fragments it spreads (0: none). Counts are
    capped at :data:`SATURATED`.
    """

    depth: int = -1
    aliases: int = 0
    cost: int = 0
    nesting: int = 0


EMPTY = Measure()


@dataclass(frozen=True, slots=True)
class DocumentMeasure:
    """The measures of a document: ``operations``, (name, node, measure) of each operation in
    document order (name ``anonymous`` for an unnamed one), ``aliases`` of all operations
    together, ``nesting`` the longest fragment
    chain of any fragment (used or not), and ``cycle``: a fragment on a cycle of spreads, when
    the document has more fragments than :data:`MAX_FRAGMENT_NESTING` (a shorter cycle is left
    to graphql-core's ``NoFragmentCyclesRule`` and its clearer message), else None."""

    operations: list[tuple[str, OperationDefinitionNode, Measure]]
    aliases: int
    nesting: int
    nesting_root: str | None
    cycle: str | None


def _cap(value: int) -> int:
    return value if value < SATURATED else SATURATED


def _show(value: int) -> str:
    return f"more than {SATURATED}" if value >= SATURATED else str(value)


def _spreads(selection_set: SelectionSetNode) -> Iterator[str]:
    """Names of the fragments spread anywhere in ``selection_set`` (not through them)."""
    stack = [selection_set]
    while stack:
        for selection in stack.pop().selections:
            if isinstance(selection, FragmentSpreadNode):
                yield selection.name.value
            elif selection.selection_set is not None:  # type: ignore[attr-defined]
                stack.append(selection.selection_set)  # type: ignore[attr-defined]


def _field_def(parent: GraphQLNamedType | None, name: str) -> GraphQLField | None:
    if name == "__typename":
        return TypeNameMetaFieldDef
    if name == "__schema":
        return SchemaMetaFieldDef
    if name == "__type":
        return TypeMetaFieldDef
    if isinstance(parent, (GraphQLObjectType, GraphQLInterfaceType)):
        return parent.fields.get(name)
    return None


def _page_size(field: FieldNode, definition: GraphQLField | None) -> int:
    """How many times a field's selection counts: its ``first`` (1..500) when its definition
    takes one (the schema default when absent, 500 when a variable or not an Int), else 1."""
    if definition is None:
        return 1
    argument: GraphQLArgument | None = definition.args.get("first")
    if argument is None:
        return 1
    given = next((a.value for a in field.arguments or () if a.name.value == "first"), None)
    value: Any
    if given is None:
        value = argument.default_value
    elif isinstance(given, IntValueNode):
        value = int(given.value)
    elif isinstance(given, VariableNode):
        value = MAX_PAGE_SIZE
    else:  # not an Int: graphql-core refuses it; count the most it could be
        value = MAX_PAGE_SIZE
    if isinstance(value, bool) or not isinstance(value, int):
        return MAX_PAGE_SIZE
    return min(max(value, 1), MAX_PAGE_SIZE)


def measure_selection_set(
    schema: GraphQLSchema,
    selection_set: SelectionSetNode,
    parent: GraphQLNamedType | None,
    fragments: dict[str, Measure],
) -> Measure:
    """The :class:`Measure` of ``selection_set`` on type ``parent`` (None when unknown: every
    field then costs 1 and no ``first`` is found), taking each spread fragment's measure from
    ``fragments`` (a fragment missing there counts as empty: unknown, or on a cycle).

    Iterative: the sets are listed parents first, then measured children first, so a
    selection nested 200 levels deep (the parser's bound) uses no Python recursion.
    """
    order: list[tuple[SelectionSetNode, GraphQLNamedType | None]] = []
    field_defs: dict[int, GraphQLField | None] = {}
    stack: list[tuple[SelectionSetNode, GraphQLNamedType | None]] = [(selection_set, parent)]
    while stack:
        current, current_type = stack.pop()
        order.append((current, current_type))
        for selection in current.selections:
            if isinstance(selection, FieldNode):
                definition = _field_def(current_type, selection.name.value)
                field_defs[id(selection)] = definition
                if selection.selection_set is not None:
                    child_type = None if definition is None else get_named_type(definition.type)
                    stack.append((selection.selection_set, child_type))
            elif isinstance(selection, InlineFragmentNode):
                condition = selection.type_condition
                inline_type = (
                    current_type if condition is None else schema.get_type(condition.name.value)
                )
                stack.append((selection.selection_set, inline_type))

    measured: dict[int, Measure] = {}
    for current, _current_type in reversed(order):
        depth, aliases, cost, nesting = -1, 0, 0, 0
        for selection in current.selections:
            if isinstance(selection, FieldNode):
                if selection.alias is not None:
                    aliases += 1
                if selection.selection_set is None:
                    depth = max(depth, 0)
                    cost += 1
                    continue
                child = measured[id(selection.selection_set)]
                introspection = selection.name.value.startswith("__")
                depth = max(depth, 0 if introspection else child.depth + 1)
                aliases += child.aliases
                page = _page_size(selection, field_defs[id(selection)])
                cost += 1 + page * child.cost
                nesting = max(nesting, child.nesting)
            else:
                if isinstance(selection, FragmentSpreadNode):
                    child = fragments.get(selection.name.value, EMPTY)
                    child_nesting = child.nesting + 1
                else:  # InlineFragmentNode
                    child = measured[id(selection.selection_set)]  # type: ignore[attr-defined]
                    child_nesting = child.nesting
                depth = max(depth, child.depth)
                aliases += child.aliases
                cost += child.cost
                nesting = max(nesting, child_nesting)
        measured[id(current)] = Measure(depth, _cap(aliases), _cap(cost), nesting)
    return measured[id(selection_set)]


def measure_document(schema: GraphQLSchema, document: DocumentNode) -> DocumentMeasure:
    """Measure every operation of ``document`` against ``schema``, each fragment once.

    The fragments are measured in the order of a depth-first walk of their spreads (without
    recursion), each after the fragments it spreads, so every spread finds its fragment's
    measure ready. A spread closing a cycle counts as empty here (the document is invalid;
    see :class:`DocumentMeasure` for who reports it). Unknown fragments count as empty too
    (graphql-core's ``KnownFragmentNamesRule`` reports them).
    """
    definitions: dict[str, FragmentDefinitionNode] = {}
    operations: list[OperationDefinitionNode] = []
    for definition in document.definitions:
        if isinstance(definition, FragmentDefinitionNode):
            definitions.setdefault(definition.name.value, definition)
        elif isinstance(definition, OperationDefinitionNode):
            operations.append(definition)
    spreads = {
        name: list(dict.fromkeys(_spreads(d.selection_set))) for name, d in definitions.items()
    }

    measures: dict[str, Measure] = {}
    cycle: str | None = None
    for root in definitions:
        if root in measures:
            continue
        path: list[tuple[str, Iterator[str]]] = [(root, iter(spreads[root]))]
        on_path = {root}
        while path:
            name, pending = path[-1]
            for spread in pending:
                if spread not in definitions or spread in measures:
                    continue
                if spread in on_path:
                    cycle = cycle or spread
                    continue
                path.append((spread, iter(spreads[spread])))
                on_path.add(spread)
                break
            else:
                path.pop()
                on_path.discard(name)
                fragment = definitions[name]
                measures[name] = measure_selection_set(
                    schema,
                    fragment.selection_set,
                    schema.get_type(fragment.type_condition.name.value),
                    measures,
                )

    measured: list[tuple[str, OperationDefinitionNode, Measure]] = []
    aliases = 0
    for operation in operations:
        root_type = schema.get_root_type(operation.operation)
        measure = measure_selection_set(schema, operation.selection_set, root_type, measures)
        name = operation.name.value if operation.name else ANONYMOUS
        measured.append((name, operation, measure))
        aliases = _cap(aliases + measure.aliases)
    nesting_root = max(measures, key=lambda n: measures[n].nesting + 1, default=None)
    nesting = 0 if nesting_root is None else measures[nesting_root].nesting + 1
    if len(definitions) <= MAX_FRAGMENT_NESTING:
        cycle = None
    return DocumentMeasure(measured, aliases, nesting, nesting_root, cycle)


class QueryRefusedError(ValidationAbortedError):
    """A document over one of the limits: validation stops here (graphql-core 3.3's
    ``validate`` answers the raised abort error itself as the last validation error)."""


def refusals(
    measure: DocumentMeasure, *, max_depth: int, max_aliases: int, max_cost: int
) -> list[GraphQLError]:
    """The errors of a measured document, empty when it is within every limit.

    Fragment nesting (or a long cycle) alone answers one error: nothing else is worth
    reporting about such a document. Otherwise the depth of each operation, the document's
    aliases and each operation's cost, in that order.
    """
    if measure.cycle is not None:
        return [
            GraphQLError(
                f"Cannot spread fragment '{measure.cycle}' within itself: fragments must not "
                "form cycles"
            )
        ]
    if measure.nesting > MAX_FRAGMENT_NESTING:
        return [
            GraphQLError(
                f"fragments spread each other {measure.nesting} deep, from fragment "
                f"'{measure.nesting_root}'; at most {MAX_FRAGMENT_NESTING} allowed"
            )
        ]
    errors = [
        GraphQLError(f"'{name}' exceeds maximum operation depth of {max_depth}", [node])
        for name, node, m in measure.operations
        if m.depth > max_depth
    ]
    if measure.aliases > max_aliases:
        errors.append(
            GraphQLError(f"{_show(measure.aliases)} aliases found. Allowed: {max_aliases}")
        )
    errors.extend(
        GraphQLError(
            f"'{name}' has a query cost of {_show(m.cost)}, more than the maximum of {max_cost}: "
            "each field costs 1, a page's selection counts `first` times (500 when `first` "
            "is a variable), and a fragment counts every time it is spread",
            [node],
        )
        for name, node, m in measure.operations
        if m.cost > max_cost
    )
    return errors


def query_guard_rule(*, max_depth: int, max_aliases: int, max_cost: int) -> type[ValidationRule]:
    """A graphql-core validation rule class refusing documents over these limits (depth,
    aliases, cost: see the module docstring; fragment nesting: :data:`MAX_FRAGMENT_NESTING`).

    On entering the document it measures it (:func:`measure_document`) and, when it is over a
    limit, reports every refusal but the last and raises the last as a
    :class:`QueryRefusedError`, which stops the validation: graphql-core's other rules never
    walk a refused document (some recurse per fragment). Make the class once and reuse it:
    Strawberry's ValidationCache keys its entries on the rule classes.
    """

    class QueryGuardRule(ValidationRule):
        def enter_document(self, node: DocumentNode, *_args: object) -> None:
            errors = refusals(
                measure_document(self.context.schema, node),
                max_depth=max_depth,
                max_aliases=max_aliases,
                max_cost=max_cost,
            )
            if not errors:
                return
            for error in errors[:-1]:
                self.report_error(error)
            last = errors[-1]
            raise QueryRefusedError(last.message, last.nodes)

    QueryGuardRule.__doc__ = (
        f"Depth at most {max_depth}, aliases at most {max_aliases}, cost at most {max_cost}, "
        f"fragment nesting at most {MAX_FRAGMENT_NESTING}."
    )
    return QueryGuardRule


def operation_costs(schema: GraphQLSchema, document: DocumentNode) -> dict[str, int]:
    """The cost of each operation of ``document`` by name (for tests and tuning the limit)."""
    operations = measure_document(schema, document).operations
    return {name: measure.cost for name, _node, measure in operations}
