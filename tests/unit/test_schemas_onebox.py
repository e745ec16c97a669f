"""Loading Onebox's answers: tolerant of additions, strict about what the flow relies on."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from marshmallow import ValidationError

from schemas import (
    ORDER_STATUSES,
    AccessToken,
    ApiError,
    Order,
    OrderItem,
    load_api_error,
    load_order,
    load_token,
)

SANDBOX_DOC = Path(__file__).resolve().parents[2] / "docs" / "sandbox.md"


def sandbox_order() -> dict[str, Any]:
    """The order example of docs/sandbox.md, as the sandbox documents it."""
    text = SANDBOX_DOC.read_text(encoding="utf-8")
    block = re.search(r"## The order object\s+```json\n(.*?)```", text, re.DOTALL)
    assert block, "docs/sandbox.md lost its order example"
    document = json.loads(block.group(1))
    assert isinstance(document, dict)
    return document


TOKEN = {"access_token": "secret-access", "token_type": "bearer",
         "refresh_token": "secret-refresh", "expires_in": 43199, "scope": "distribution",
         "jti": "0f1e2d3c"}


def test_the_sandbox_order_example_loads() -> None:
    assert load_order(sandbox_order()) == Order(
        id="3f2c9a5e0b7d4e1f8a6c2b9d0e4f7a1c",
        status="PRE_CONFIRM",
        code="AX59SJ29392X",
        external_code="shop-42",
        items=(OrderItem(id=17, type="SEAT", state="RESERVED", session_id=1001, seat_id=103,
                         price_type_id=1),),
        expires_at=datetime(2026, 11, 26, 17, 10, tzinfo=UTC),
    )


def test_buyer_data_is_not_kept() -> None:
    document = sandbox_order()
    document["buyer_data"] = {"email": "secret.buyer@example.com", "phone": "+34 600"}
    order = load_order(document)
    assert "secret.buyer" not in repr(order)
    assert not hasattr(order, "buyer_data")


def test_a_basket_without_code_and_a_confirmed_order_without_expiry() -> None:
    basket = sandbox_order()
    basket.update(code=None, external_code=None, items=[])
    basket["status"]["type"] = "BASKET"
    assert load_order(basket).code is None
    assert load_order(basket).items == ()
    sold = sandbox_order()
    sold["status"] = {"type": "CONFIRM", "expires_in": None}
    sold["items"][0]["state"] = "SOLD"
    order = load_order(sold)
    assert (order.status, order.expires_at, order.items[0].state) == ("CONFIRM", None, "SOLD")


def test_a_not_numbered_item_has_no_seat() -> None:
    document = sandbox_order()
    allocation = document["items"][0]["allocation"]
    allocation["type"] = "NOT_NUMBERED"
    for key in ("seat", "row", "sector"):
        del allocation[key]
    item = load_order(document).items[0]
    assert (item.session_id, item.seat_id, item.price_type_id) == (1001, None, 1)


def test_an_expiry_without_zone_is_read_as_utc() -> None:
    document = sandbox_order()
    document["status"]["expires_in"]["date"] = "2026-11-26T17:10:00"
    assert load_order(document).expires_at == datetime(2026, 11, 26, 17, 10, tzinfo=UTC)


def test_fields_onebox_adds_are_ignored_at_every_level() -> None:
    document = sandbox_order()
    document["loyalty"] = {"points": 3}
    document["status"]["reason"] = "NEW"
    document["status"]["expires_in"]["precision"] = "ms"
    document["items"][0]["barcode"] = "X1"
    document["items"][0]["allocation"]["session"]["capacity"] = 300
    assert load_order(document) == load_order(sandbox_order())


def test_only_the_known_statuses_are_documented() -> None:
    assert ORDER_STATUSES == ("BASKET", "PRE_CONFIRM", "CONFIRM")


def _without(path: tuple[Any, ...]) -> dict[str, Any]:
    document = sandbox_order()
    node: Any = document
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return document


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    document = sandbox_order()
    node: Any = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


@pytest.mark.parametrize(("document", "field"), [
    (_without(("id",)), "id"),
    (_with(("id",), 17), "id"),
    (_with(("id",), ""), "id"),
    (_without(("status",)), "status"),
    (_with(("status",), "CONFIRM"), "status"),
    (_without(("status", "type")), "status"),
    (_without(("items", 0, "id")), "items"),
    (_with(("items", 0, "id"), "17"), "items"),
    (_with(("items",), {"id": 17}), "items"),
    (_with(("code",), 42), "code"),
    (_with(("status", "expires_in", "date"), "soon"), "status"),
    (_with(("items", 0, "allocation", "session", "id"), "1001"), "items"),
])
def test_a_missing_or_mistyped_field_we_rely_on_is_refused(document: dict[str, Any],
                                                          field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        load_order(document)
    assert field in caught.value.messages


@pytest.mark.parametrize("data", [None, [], "order", 17])
def test_an_order_that_is_not_an_object_is_refused(data: Any) -> None:
    with pytest.raises(ValidationError):
        load_order(data)


def test_a_token_loads_and_hides_its_secrets() -> None:
    token = load_token({**TOKEN, "issued_by": "onebox"})
    assert token == AccessToken(access_token="secret-access", token_type="bearer",
                                expires_in=43199, refresh_token="secret-refresh",
                                scope="distribution", jti="0f1e2d3c")
    assert "secret" not in repr(token)


def test_a_token_with_only_the_required_fields() -> None:
    token = load_token({"access_token": "a", "token_type": "bearer", "expires_in": 60,
                        "scope": None})
    assert (token.refresh_token, token.scope, token.jti) == (None, None, None)


@pytest.mark.parametrize(("change", "field"), [
    ({"access_token": ...}, "access_token"),
    ({"access_token": ""}, "access_token"),
    ({"access_token": None}, "access_token"),
    ({"token_type": ...}, "token_type"),
    ({"expires_in": ...}, "expires_in"),
    ({"expires_in": "43199"}, "expires_in"),
    ({"expires_in": -1}, "expires_in"),
])
def test_a_bad_token_is_refused(change: dict[str, Any], field: str) -> None:
    document = {**copy.deepcopy(TOKEN), **change}
    document = {key: value for key, value in document.items() if value is not ...}
    with pytest.raises(ValidationError) as caught:
        load_token(document)
    assert field in caught.value.messages


@pytest.mark.parametrize(("body", "error"), [
    ({"code": "ORDER_SEAT_NOT_AVAILABLE", "message": "held"},
     ApiError("ORDER_SEAT_NOT_AVAILABLE", "held")),
    ({"code": "DIST0000", "message": None, "extra": 1}, ApiError("DIST0000", "")),
    ({"code": "DIST0001"}, ApiError("DIST0001", "")),
    ({"error": "invalid_token", "error_description": "expired"},
     ApiError("invalid_token", "expired")),
    ({"error": "invalid_client"}, ApiError("invalid_client", "")),
])
def test_error_bodies_of_both_shapes_load(body: dict[str, Any], error: ApiError) -> None:
    assert load_api_error(body) == error


@pytest.mark.parametrize("body", [
    None, [], "Bad Gateway", 502, {}, {"code": 5}, {"code": ""}, {"error": None},
    {"message": "no code"}, sandbox_order(),
])
def test_a_body_that_is_not_an_error_gives_none(body: Any) -> None:
    assert load_api_error(body) is None
