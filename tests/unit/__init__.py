"""The fast tier: the domain core (``stockledger.domain``) with plain values, no database, no I/O.

This file makes ``tests/unit`` a package, so its modules (``unit.test_rules``, ...) do not clash
with the v1 modules of the same basename in ``tests/`` (pytest's default "prepend" import mode
imports a test file outside a package under its bare basename).
"""
