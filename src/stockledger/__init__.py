"""stockledger: a GraphQL inventory service with an append-only ledger.

Layers (one import direction, see ARCHITECTURE.md section 1):
``app -> resolvers -> {schema, services} -> {db, locks, observability}``.
"""

__version__ = "0.1.0"
