"""The domain core: the stock model, the write commands and the rules of ARCHITECTURE
sections 3 and 11, as plain synchronous Python (standard library only).

No I/O here: no database, no Redis, no GraphQL. ``tests/unit`` tests it with plain values, and
an import-linter contract (``pyproject.toml``) keeps it from importing the rest of the project.

- ``model``: balances, reservations, ledger entries (``available`` and ``remaining`` live here);
- ``errors``: the contract's error types;
- ``validation``: the input rules of section 11;
- ``commands``: one validated command per write;
- ``state``: the locked state a batch works on, and what a command changes;
- ``rules``: one function per rule of section 3.
"""
