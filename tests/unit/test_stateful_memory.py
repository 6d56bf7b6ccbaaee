"""The randomized run of ``tests/test_stateful.py`` with the database replaced by the in-memory
store of ``fakes.py``: the same model (the oracle, independent of ``domain/``), the same rules
(transfers, receipts, cancels and locations included) and invariants (conservation included),
through the service, batcher and unit of work, at thousands of steps a run."""

from __future__ import annotations

import os
from typing import Any

import hypothesis
from hypothesis import HealthCheck
from hypothesis.stateful import run_state_machine_as_test
from test_stateful import StockMachine

from stockledger.services import InventoryService
from unit.fakes import MemoryDatabase, memory_service, violations


class MemoryMachine(StockMachine):
    mem: MemoryDatabase

    def open(self) -> InventoryService:
        service, self.mem = memory_service(self.settings, self.clock)
        return service

    async def violations(self) -> list[str]:
        return violations(self.mem)

    async def snapshot(self) -> tuple[dict[Any, Any], ...]:
        mem = self.mem
        balances = {k: (b.on_hand, b.reserved, b.version) for k, b in mem.balances.items()}
        entries: dict[Any, int] = {}
        for e in mem.ledger:
            entries[e.key] = entries.get(e.key, 0) + 1
        reservations = {
            r.id: (r.status, r.reference, r.expires_at, r.created_at)
            for r in mem.reservations.values()
        }
        lines = {
            (r.id, ln.location, ln.sku): (ln.quantity, ln.deducted, ln.released)
            for r in mem.reservations.values()
            for ln in r.lines or ()
        }
        incoming = {k: b.incoming for k, b in mem.balances.items() if b.incoming}
        locations = {c: (loc.name, loc.type, loc.active) for c, loc in mem.locations.items()}
        transfers = {
            t.id: (t.status, t.from_location, t.to_location, t.reference, t.reason)
            for t in mem.transfers.values()
        }
        transfer_lines = {
            (t.id, tl.sku): (tl.quantity, tl.received, tl.returned)
            for t in mem.transfers.values()
            for tl in t.lines
        }
        return (
            balances,
            entries,
            reservations,
            lines,
            incoming,
            locations,
            transfers,
            transfer_lines,
        )


# STOCKLEDGER_STATEFUL_MEMORY_EXAMPLES raises it; 100 runs of 60 steps is 6,000 steps.
SETTINGS = hypothesis.settings(
    max_examples=int(os.environ.get("STOCKLEDGER_STATEFUL_MEMORY_EXAMPLES", "100")),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_stateful_memory() -> None:
    run_state_machine_as_test(MemoryMachine, settings=SETTINGS)
