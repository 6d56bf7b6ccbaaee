"""The HTTP edge of ``stockledger serve`` (issue 10, item 6), over real connections to a real
server process: a body over the limit answers 413 that the client receives, also on a reused
keep-alive connection; GET runs queries, and a mutation sent by GET is refused (400)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from graphql_helpers import line, mutation_document
from server_process import Server, base_env, running


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One embedded-default server for the module."""
    tmp_path: Path = tmp_path_factory.mktemp("edge")
    with running(tmp_path, base_env(tmp_path, log_level="WARNING")) as started:
        started.wait_ready()
        yield started


BALANCE = '{ balance(sku: "A", location: "default") { onHand } }'


def test_a_body_over_the_limit_answers_413_on_a_reused_connection(server: Server) -> None:
    """Two requests on one keep-alive connection, then a 3 MiB body: the client must read the
    413, not a reset connection."""

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        statuses = []
        async with httpx.AsyncClient(
            base_url=server.url, limits=limits, timeout=30, headers=server.headers
        ) as http:
            for _ in range(2):
                statuses.append((await http.post("/graphql", json={"query": BALANCE})).status_code)
            big = b'{"query": "' + b"x" * (3 * 1024 * 1024) + b'"}'
            response = await http.post(
                "/graphql", content=big, headers={"content-type": "application/json"}
            )
            statuses.append(response.status_code)
            assert "request body too large" in response.text
            # The client carries on: a new connection serves it.
            statuses.append((await http.post("/graphql", json={"query": BALANCE})).status_code)
        return statuses

    assert asyncio.run(run()) == [200, 200, 413, 200]


def test_a_chunked_body_over_the_limit_answers_413(server: Server) -> None:
    async def chunks() -> object:
        for _ in range(48):
            yield b"x" * 65536  # 3 MiB in all, no Content-Length

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            return await http.post(
                "/graphql", content=chunks(), headers={"content-type": "application/json"}
            )

    response = asyncio.run(run())
    assert response.status_code == 413


def test_get_runs_queries_but_never_a_mutation(server: Server) -> None:
    query = httpx.get(
        f"{server.url}/graphql", params={"query": BALANCE}, headers=server.headers, timeout=10
    )
    assert query.status_code == 200, query.text
    assert query.json() == {"data": {"balance": None}}

    document = mutation_document("restock")
    variables = json.dumps({"input": {"idempotencyKey": "get-1", "lines": [line("A", 5)]}})
    refused = httpx.get(
        f"{server.url}/graphql",
        params={"query": document, "variables": variables},
        headers=server.headers,
        timeout=10,
    )
    # Strawberry's answer (GraphQL over HTTP: a GET may carry queries only).
    assert refused.status_code == 400, refused.text
    assert "mutations are not allowed when using GET" in refused.text
    after = httpx.get(
        f"{server.url}/graphql", params={"query": BALANCE}, headers=server.headers, timeout=10
    )
    assert after.json() == {"data": {"balance": None}}  # nothing was restocked


def test_every_counter_has_its_known_series_at_zero_from_the_start(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A fresh server: an alert or a rate() over a counter sees its series before the first
    event (ARCHITECTURE section 10; issue 10, item 6)."""
    tmp_path = tmp_path_factory.mktemp("fresh")
    with running(tmp_path, base_env(tmp_path, log_level="WARNING")) as fresh:
        fresh.wait_ready()
        text = httpx.get(f"{fresh.url}/metrics", timeout=10).text
    for series in (
        'inventory_deduct_total{status="success"} 0.0',
        'inventory_deduct_total{status="reservation_not_active"} 0.0',
        'inventory_reserve_total{status="insufficient_stock"} 0.0',
        'inventory_reserve_total{status="unavailable"} 0.0',
        'inventory_transaction_retries_total{reason="deadlock"} 0.0',
        'inventory_transaction_retries_total{reason="connection_lost"} 0.0',
        'stock_movements_total{reason="given",result="success",type="adjust"} 0.0',
        'stock_movements_total{reason="none",result="skipped",type="expire"} 0.0',
        "inventory_unexpected_errors_total 0.0",
    ):
        assert series in text, series


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"query": "{ balance(sku: "}, "GRAPHQL_PARSE_FAILED"),
        ({"query": '{ balance(sku: "A") { onHandd } }'}, "GRAPHQL_VALIDATION_FAILED"),
        (
            {"query": "query($n: Int!) { ledger(first: $n) { edges { cursor } } }"},
            "BAD_USER_INPUT",  # a variable missing
        ),
        ({"query": "{ ledger(first: 100000) { edges { cursor } } }"}, "BAD_USER_INPUT"),
    ],
    ids=["parse", "validation", "variables", "argument"],
)
def test_every_top_level_error_carries_a_code(
    server: Server, body: dict[str, object], code: str
) -> None:
    response = httpx.post(f"{server.url}/graphql", json=body, headers=server.headers, timeout=10)
    errors = response.json()["errors"]
    assert [e["extensions"]["code"] for e in errors] == [code], errors


def test_graphiql_loads_every_asset_from_the_server_itself(server: Server) -> None:
    """GraphiQL works on a machine with no internet: the page names no other host, and each
    script and stylesheet it names is served here, byte for byte what its integrity hash
    says (the page's own check)."""
    page = httpx.get(f"{server.url}/graphql", headers={"accept": "text/html"}, timeout=10)
    assert page.status_code == 200
    assert "graphiql" in page.text.lower()
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources, page.text[:500]
    # No host but this one (the favicon is an inline data: URL).
    assert not [s for s in sources if "//" in s and not s.startswith("data:")], sources
    pairs = re.findall(r'(?:src|href)="([^"]+)"\s+integrity="sha384-([^"]+)"', page.text)
    assert len(pairs) == 7, pairs
    for path, digest in pairs:
        asset = httpx.get(f"{server.url}{path}", timeout=10)
        assert asset.status_code == 200, path
        assert base64.b64encode(hashlib.sha384(asset.content).digest()).decode() == digest


@pytest.mark.parametrize("body", [b"42", b'"x"', b"null", b"true"])
def test_a_json_body_that_is_not_an_object_is_a_400(server: Server, body: bytes) -> None:
    response = httpx.post(
        f"{server.url}/graphql",
        content=body,
        headers={"content-type": "application/json", **server.headers},
        timeout=10,
    )
    assert response.status_code == 400, response.text
    assert "must be an object" in response.text
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


def _preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(
        f"{url}/graphql",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
        timeout=10,
    )


def test_cors_is_off_unless_origins_are_listed(
    server: Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    answer = httpx.post(
        f"{server.url}/graphql",
        json={"query": BALANCE},
        headers={"origin": "https://shop.example", **server.headers},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert "access-control-allow-origin" not in answer.headers
    assert (
        "access-control-allow-origin" not in _preflight(server.url, "https://shop.example").headers
    )

    tmp_path = tmp_path_factory.mktemp("cors")
    env = base_env(tmp_path, log_level="WARNING", cors_origins="https://shop.example")
    with running(tmp_path, env) as cors:
        cors.wait_ready()
        allowed = _preflight(cors.url, "https://shop.example")
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://shop.example"
        other = _preflight(cors.url, "https://evil.example")
        assert "access-control-allow-origin" not in other.headers
        answer = httpx.post(
            f"{cors.url}/graphql",
            json={"query": BALANCE},
            headers={"origin": "https://shop.example", **cors.headers},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["access-control-allow-origin"] == "https://shop.example"


def test_a_trickled_body_gets_408_and_connections_past_the_bound_get_503(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp_path = tmp_path_factory.mktemp("slow")
    env = base_env(
        tmp_path, log_level="WARNING", body_read_timeout_seconds="1", max_connections="4"
    )
    with running(tmp_path, env) as slow:
        slow.wait_ready()
        port = slow.port
        head = (
            f"POST /graphql HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            "content-type: application/json\r\ncontent-length: 100\r\n\r\n{"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), 5) as trickle:
            trickle.sendall(head)  # then nothing more: the body never completes
            trickle.settimeout(10)
            started = time.monotonic()
            reply = trickle.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert time.monotonic() - started < 8
        held = [socket.create_connection(("127.0.0.1", port), 5) for _ in range(4)]
        try:
            for s in held:
                s.sendall(b"POST /graphql HTTP/1.1\r\nhost: x\r\n")  # headers never end
            time.sleep(0.3)
            busy = httpx.post(f"{slow.url}/graphql", json={"query": BALANCE}, timeout=10)
            assert busy.status_code == 503, busy.text
        finally:
            for s in held:
                s.close()
        time.sleep(0.3)
        after = httpx.post(
            f"{slow.url}/graphql", json={"query": BALANCE}, headers=slow.headers, timeout=10
        )
        assert after.status_code == 200, after.text
