"""The README's curl examples, run as written against a fresh ``stockledger serve`` on the
embedded default, from the directory it runs in (so ``$(cat data/admin.key)`` reads the
bootstrap key it wrote): every answer is the one the README describes (issue 10: "The README's
curl examples work as written with the bootstrap key")."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from server_process import base_env, running

from stockledger.domain.ids import location_global_id, reservation_global_id, transfer_global_id

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands(section: str) -> list[str]:
    """The lines of the first ``sh`` block under the README heading ``## <section>`` (or
    ``### <section>``)."""
    text = README.read_text()
    body = text[text.index(f"# {section}\n") :]
    block = re.search(r"```sh\n(.*?)```", body, re.S)
    assert block is not None, section
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def _run(commands: list[str], port: int, cwd: Path) -> list[Any]:
    """Each ``curl`` line's answer (JSON), run by bash after the block's ``G=`` line with the
    server's port instead of 8000."""
    outputs = []
    setup = f"G=http://127.0.0.1:{port}/graphql"
    for command in commands:
        if command.startswith("G="):
            assert command == "G=http://127.0.0.1:8000/graphql", command
            continue
        assert command.startswith("curl "), command
        done = subprocess.run(
            ["bash", "-c", f"{setup}\n{command}"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout))
    return outputs


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_examples_work_as_written_with_the_bootstrap_key(tmp_path: Path) -> None:
    with running(tmp_path, base_env(tmp_path, log_level="WARNING")) as server:
        server.wait_ready()
        tried = _run(_commands("Try it with curl"), server.port, tmp_path)
        many = _run(_commands("Many carts in one request"), server.port, tmp_path)
        again = _run(_commands("Many carts in one request"), server.port, tmp_path)
        paid = _run(_commands("Confirm a paid order"), server.port, tmp_path)
        moved = _run(_commands("Locations and transfers"), server.port, tmp_path)
        made = _run(_commands("Managing keys over GraphQL"), server.port, tmp_path)
        made_again = _run(_commands("Managing keys over GraphQL"), server.port, tmp_path)

    for answer in [*tried, *many, *again, *paid, *moved, *made, *made_again]:
        assert "errors" not in answer, answer
    restock, reserve, deduct, short, look = (a["data"] for a in tried)
    assert restock["restock"]["__typename"] == "RestockSuccess"
    assert reserve["reserve"]["__typename"] == "ReserveSuccess"
    # "The third call answers, for example, ...": exactly that, on a fresh server (reservation
    # 1's id is opaque: its global id).
    assert deduct == {
        "deduct": {
            "__typename": "DeductSuccess",
            "reservations": [{"id": reservation_global_id(1), "status": "COMMITTED"}],
            "balances": [{"sku": "TSHIRT-M", "onHand": 8, "reserved": 0}],
        }
    }
    assert short["reserve"]["__typename"] == "InsufficientStockError"
    assert look["balance"] == {"onHand": 8, "reserved": 0, "available": 8, "version": 3}
    # "answers a ReserveSuccess, an InsufficientStockError ... and a ReserveSuccess. Send it
    # again and the two successes answer replayed: true."
    [results] = [a["data"]["reserveMany"]["results"] for a in many]
    assert [r["__typename"] for r in results] == [
        "ReserveSuccess",
        "InsufficientStockError",
        "ReserveSuccess",
    ]
    assert [r.get("replayed") for r in results] == [False, None, False]
    [replayed] = [a["data"]["reserveMany"]["results"] for a in again]
    assert [r["__typename"] for r in replayed] == [r["__typename"] for r in results]
    assert [r.get("replayed") for r in replayed] == [True, None, True]
    assert [r.get("reservation") for r in replayed] == [r.get("reservation") for r in results]

    # The STOREFRONT key the README makes: shown once, then replayed without its secret.
    [created] = [a["data"]["createApiKey"] for a in made]
    assert created["__typename"] == "CreateApiKeySuccess"
    assert sorted(created["apiKey"]["scopes"]) == ["RESERVATIONS_WRITE", "STOCK_READ"]
    assert created["secret"].startswith("sl_") and created["replayed"] is False
    [replayed_key] = [a["data"]["createApiKey"] for a in made_again]
    assert (replayed_key["secret"], replayed_key["replayed"]) == (None, True)
    assert replayed_key["apiKey"] == created["apiKey"]

    # "The second answers the reservation CONFIRMED with expiresAt: null, and the balance with
    # committed: 2 within reserved: 4 (the batch example above holds the other 2)."
    held, confirmed = (a["data"] for a in paid)
    assert held["reserve"]["reservation"]["expiresAt"] is not None
    assert confirmed["confirmReservation"] == {
        "__typename": "ConfirmReservationSuccess",
        "reservations": [{"status": "CONFIRMED", "expiresAt": None}],
        "balances": [
            {"sku": "MUG", "location": "east", "reserved": 4, "committed": 2, "available": 1}
        ],
        "replayed": False,
    }

    # "The transfer answers IN_TRANSIT with the source down to 5 on hand and store-1 at 0 on
    # hand, incoming: 3; stockLevels totals the SKU ... (onHand: 5, incoming: 3) ..."
    created, sent, levels, part, cancelled, closed, refused = (a["data"] for a in moved)
    assert created["createLocation"]["location"] == {
        "id": location_global_id("store-1"),
        "code": "store-1",
        "name": "Main Street",
        "type": "STORE",
        "active": True,
    }
    first = transfer_global_id(1)
    assert sent["transfer"] == {
        "__typename": "TransferSuccess",
        "transfer": {
            "id": first,
            "status": "IN_TRANSIT",
            "lines": [{"sku": "TSHIRT-M", "quantity": 3, "remaining": 3}],
        },
        "balances": [
            {"location": "default", "onHand": 5, "incoming": 0},
            {"location": "store-1", "onHand": 0, "incoming": 3},
        ],
    }
    assert levels["stockLevels"] == {
        "onHand": 5,
        "reserved": 1,
        "available": 4,
        "incoming": 3,
        "locations": [
            {"location": "default", "onHand": 5, "reserved": 1, "incoming": 0},
            {"location": "store-1", "onHand": 0, "reserved": 0, "incoming": 3},
        ],
    }
    assert part["receiveTransfer"]["transfer"] == {
        "status": "PARTIALLY_RECEIVED",
        "lines": [{"received": 2, "remaining": 1}],
    }
    assert part["receiveTransfer"]["ledgerEntries"] == [
        {"eventType": "TRANSFER_IN", "location": "store-1", "onHandDelta": 2, "transferId": first}
    ]
    assert cancelled["cancelTransfer"]["transfer"] == {
        "status": "CANCELLED",
        "lines": [{"received": 2, "returned": 1, "remaining": 0}],
    }
    assert closed["updateLocation"]["location"] == {"active": False}
    assert refused["restock"] == {
        "__typename": "LocationUnavailableError",
        "location": "store-1",
        "exists": True,
    }


def test_the_apollo_possible_types_are_the_schemas() -> None:
    """The README's `possibleTypes` lists (Apollo Client needs every member of each union and
    interface it names) are exactly the exported schema's."""
    from graphql import GraphQLInterfaceType, GraphQLUnionType, build_schema

    text = README.read_text()
    block = re.search(r"const possibleTypes = \{(.*?)\n\};", text, re.S)
    assert block is not None
    listed = {
        name: set(re.findall(r'"(\w+)"', members))
        for name, members in re.findall(r"(\w+): \[(.*?)\]", block.group(1), re.S)
    }
    assert {"Node", "Error", "ReserveResult", "TransferResult"} <= set(listed)
    schema = build_schema((README.parent / "schema.graphql").read_text())
    for name, members in listed.items():
        abstract = schema.type_map[name]
        assert isinstance(abstract, GraphQLUnionType | GraphQLInterfaceType), name
        assert members == {t.name for t in schema.get_possible_types(abstract)}, name
