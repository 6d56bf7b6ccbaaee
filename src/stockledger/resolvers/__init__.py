"""Thin resolvers: GraphQL arguments -> one service call -> result or error type.

No SQL and no rules here. ``errors.py`` is the one place domain exceptions become GraphQL
errors; ``root.py`` assembles the served schema with its limits.
"""

from stockledger.resolvers.context import GraphQLContext
from stockledger.resolvers.mutation import Mutation
from stockledger.resolvers.query import Query
from stockledger.resolvers.root import build_schema, print_sdl, schema
from stockledger.resolvers.subscription import Subscription

__all__ = [
    "GraphQLContext",
    "Mutation",
    "Query",
    "Subscription",
    "build_schema",
    "print_sdl",
    "schema",
]
