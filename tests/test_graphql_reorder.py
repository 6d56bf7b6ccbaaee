"""Reorder points over GraphQL (issue 12 item 1, ARCHITECTURE section 15) on both backends:
setReorderPoint / clearReorderPoint, Balance.reorderPoint and lowStock, the lowStock query
(seed 004's checkLowStock) and reorderSuggestions, which count stock already on its way."""

from __future__ import annotations

from typing import Any

from graphql_helpers import GraphQLClient, line
from graphql_helpers import gql_fixture as gql_fixture  # noqa: F401 (the gql fixture)

SET = """mutation($i: SetReorderPointInput!) { setReorderPoint(input: $i) { __typename
  ... on ReorderPointSuccess { replayed balance { sku location onHand version lowStock
    reorderPoint { sku location minimumLevel reorderQuantity maximumLevel } } }
  ... on ValidationError { field } ... on Error { code message } } }"""
CLEAR = """mutation($i: ClearReorderPointInput!) { clearReorderPoint(input: $i) { __typename
  ... on ReorderPointSuccess { balance { sku reorderPoint { minimumLevel } lowStock } }
  ... on ValidationError { field } } }"""
LOW = """query($l: String) { lowStock(location: $l, first: 50) {
  edges { node { sku location available lowStock } } pageInfo { hasNextPage } } }"""
SUGGEST = """query($l: String!) { reorderSuggestions(location: $l) {
  quantity balance { sku location available incoming } } }"""


async def set_point(gql: GraphQLClient, key: str, **point: Any) -> dict[str, Any]:
    result: dict[str, Any] = (await gql.data(SET, {"i": {"idempotencyKey": key, **point}}))[
        "setReorderPoint"
    ]
    return result


async def test_a_reorder_point_shows_on_the_balance_and_in_low_stock(gql: GraphQLClient) -> None:
    await gql.restock("s", line("A", 10, "wh"), line("B", 2, "wh"), line("C", 9, "store"))
    made = await set_point(gql, "rp-a", sku="A", location="wh", minimumLevel=3, reorderQuantity=20)
    assert made == {
        "__typename": "ReorderPointSuccess",
        "replayed": False,
        "balance": {
            "sku": "A",
            "location": "wh",
            "onHand": 10,
            "version": 1,  # no entry: the version stays
            "lowStock": False,
            "reorderPoint": {
                "sku": "A",
                "location": "wh",
                "minimumLevel": 3,
                "reorderQuantity": 20,
                "maximumLevel": None,
            },
        },
    }
    again = await set_point(gql, "rp-a", sku="A", location="wh", minimumLevel=3, reorderQuantity=20)
    assert again["replayed"] is True and again["balance"] == made["balance"]
    await set_point(gql, "rp-b", sku="B", location="wh", minimumLevel=5, reorderQuantity=10)
    await set_point(gql, "rp-c", sku="C", location="store", minimumLevel=9, reorderQuantity=1)
    await gql.reserve("r", line("A", 7, "wh"))
    low = (await gql.data(LOW, {}))["lowStock"]["edges"]
    assert [(e["node"]["location"], e["node"]["sku"], e["node"]["available"]) for e in low] == [
        ("store", "C", 9),
        ("wh", "A", 3),
        ("wh", "B", 2),
    ]
    assert all(e["node"]["lowStock"] for e in low)
    at_wh = (await gql.data(LOW, {"l": "wh"}))["lowStock"]["edges"]
    assert [e["node"]["sku"] for e in at_wh] == ["A", "B"]
    cleared = (
        await gql.data(CLEAR, {"i": {"idempotencyKey": "cl", "sku": "B", "location": "wh"}})
    )["clearReorderPoint"]
    assert cleared["balance"] == {"sku": "B", "reorderPoint": None, "lowStock": False}
    at_wh = (await gql.data(LOW, {"l": "wh"}))["lowStock"]["edges"]
    assert [e["node"]["sku"] for e in at_wh] == ["A"]


async def test_bad_reorder_points_are_validation_errors(gql: GraphQLClient) -> None:
    for point, field in (
        ({"minimumLevel": -1, "reorderQuantity": 1}, "minimumLevel"),
        ({"minimumLevel": 1, "reorderQuantity": 0}, "reorderQuantity"),
        ({"minimumLevel": 5, "reorderQuantity": 1, "maximumLevel": 2}, "maximumLevel"),
    ):
        refused = await set_point(gql, f"bad-{field}", sku="A", **point)
        assert (refused["__typename"], refused["field"]) == ("ValidationError", field)
    missing = (await gql.data(CLEAR, {"i": {"idempotencyKey": "cl", "sku": "nothing"}}))[
        "clearReorderPoint"
    ]
    assert missing["__typename"] == "ValidationError"
    assert await gql.balance("A") is None  # nothing was created


async def test_a_never_stocked_sku_gets_an_empty_balance_and_is_low_at_once(
    gql: GraphQLClient,
) -> None:
    made = await set_point(gql, "rp", sku="NEW", minimumLevel=0, reorderQuantity=6)
    assert made["balance"]["onHand"] == 0 and made["balance"]["lowStock"] is True
    [suggestion] = (await gql.data(SUGGEST, {"l": "default"}))["reorderSuggestions"]
    assert suggestion["quantity"] == 6


async def test_suggestions_count_incoming_and_fill_up_to_the_maximum(gql: GraphQLClient) -> None:
    await gql.restock("s", line("A", 4, "wh"), line("B", 4, "wh"), line("C", 1, "wh"))
    await gql.restock("s2", line("B", 10, "dc"))
    for key, sku, point in (
        ("p-a", "A", {"minimumLevel": 5, "reorderQuantity": 10}),
        ("p-b", "B", {"minimumLevel": 5, "reorderQuantity": 10}),
        ("p-c", "C", {"minimumLevel": 5, "reorderQuantity": 10, "maximumLevel": 30}),
    ):
        await set_point(gql, key, sku=sku, location="wh", **point)
    # B has 3 on their way: 4 + 3 > 5, so it is not suggested.
    sent = await gql.data(
        """mutation($i: TransferInput!) { transfer(input: $i) { __typename } }""",
        {
            "i": {
                "idempotencyKey": "t",
                "fromLocation": "dc",
                "toLocation": "wh",
                "lines": [{"sku": "B", "quantity": 3}],
                "inTransit": True,
            }
        },
    )
    assert sent["transfer"]["__typename"] == "TransferSuccess"
    found = (await gql.data(SUGGEST, {"l": "wh"}))["reorderSuggestions"]
    assert [(s["balance"]["sku"], s["quantity"]) for s in found] == [("C", 29), ("A", 10)]
    assert (await gql.data(SUGGEST, {"l": "dc"}))["reorderSuggestions"] == []
