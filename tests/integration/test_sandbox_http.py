"""The sandbox over real HTTP on loopback: the API, its errors, faults and HTTP/1.1.

One sandbox serves the whole module (started with ``start_in_thread``); every
test starts from ``reset()``. Waiting is always for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from fulfilment.harness import processes
from fulfilment.sandbox import RunningSandbox, SandboxOptions, start_in_thread
from fulfilment.sandbox.http import HttpServer, Response

pytestmark = pytest.mark.integration

DIST = "/distribution-api/v1"
API_KEY = "test-api-key"
CHANNEL = "test-channel"
T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 10.0) -> T:
    return processes.wait_for(condition, timeout=timeout, what=what, interval=0.02)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[RunningSandbox]:
    with start_in_thread(SandboxOptions(api_key=API_KEY, channel_id=CHANNEL, seed=5)) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(sandbox: RunningSandbox) -> None:
    sandbox.admin.reset()


class Api:
    """A thin client of the sandbox's Onebox endpoints, for tests."""

    def __init__(self, http: requests.Session, url: str) -> None:
        self.http = http
        self.url = url
        self._token: str | None = None

    def token_response(self, **overrides: str | None) -> requests.Response:
        form: dict[str, str | None] = {"grant_type": "client_credentials", "channel_id": CHANNEL,
                "client_id": "seller-channel-client", "client_secret": API_KEY}
        form.update(overrides)
        data = {key: value for key, value in form.items() if value is not None}
        return self.http.post(f"{self.url}/oauth/token", data=data, timeout=5)

    def token(self) -> str:
        if self._token is None:
            response = self.token_response()
            assert response.status_code == 200, response.text
            self._token = response.json()["access_token"]
        return self._token

    def call(self, step: str, body: Any = None, *, order_id: str | None = None,
             method: str = "POST", token: str | None = None, timeout: float = 5,
             headers: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
        all_headers = {"Authorization": f"Bearer {token or self.token()}"}
        if order_id is not None:
            all_headers["ob-order-id"] = order_id
        all_headers.update(headers or {})
        path = f"{DIST}/orders{'/' + step if step else ''}"
        return self.http.request(method, self.url + path, json=body, headers=all_headers,
                                 timeout=timeout, **kwargs)

    def ok(self, step: str, body: Any = None, **kwargs: Any) -> dict[str, Any]:
        response = self.call(step, body, **kwargs)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def basket(self) -> str:
        order_id: str = self.ok("")["id"]
        return order_id

    def pre_confirmed(self, session_id: int = 1002, price_type_id: int = 3,
                      quantity: int = 1) -> dict[str, Any]:
        order_id = self.basket()
        self.ok("seats-auto", {"session_id": session_id, "price_type_id": price_type_id,
                               "quantity": quantity}, order_id=order_id)
        self.ok("buyer-data", {"email": "buyer@example.com"}, order_id=order_id)
        return self.ok("pre-confirm", {}, order_id=order_id)

    def get_order(self, code: str, **kwargs: Any) -> requests.Response:
        return self.http.get(f"{self.url}/orders-mgmt-api/v1/orders/{code}",
                             headers={"Authorization": f"Bearer {self.token()}"},
                             timeout=5, **kwargs)


@pytest.fixture
def api(sandbox: RunningSandbox) -> Iterator[Api]:
    with requests.Session() as http:
        yield Api(http, sandbox.url)


def assert_error(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["code"] == code, response.text
    assert len(response.headers["ob-audit-trace-id"]) == 32


# -- token ---------------------------------------------------------------------------


def test_token_grant(api: Api) -> None:
    response = api.token_response()
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 43199
    assert {"access_token", "refresh_token", "scope", "jti"} <= set(body)
    assert API_KEY not in response.text
    assert int(response.headers["ob-audit-trace-id"], 16) >= 0


@pytest.mark.parametrize(
    ("overrides", "status", "error"),
    [
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"grant_type": None}, 400, "invalid_request"),
        ({"client_secret": None}, 400, "invalid_request"),
        ({"client_id": "someone-else"}, 401, "invalid_client"),
        ({"channel_id": "other-channel"}, 401, "invalid_client"),
        ({"client_secret": "wrong-key"}, 401, "invalid_client"),
    ],
)
def test_token_errors(api: Api, overrides: dict[str, str | None], status: int,
                      error: str) -> None:
    response = api.token_response(**overrides)
    assert response.status_code == status
    assert response.json()["error"] == error
    assert "error_description" in response.json()
    assert API_KEY not in response.text


def test_token_needs_a_form_body(api: Api) -> None:
    response = api.http.post(f"{api.url}/oauth/token", json={"grant_type": "client_credentials"},
                             timeout=5)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


# -- the flow --------------------------------------------------------------------------


def test_full_flow_numbered(api: Api, sandbox: RunningSandbox) -> None:
    # Given a basket holding two numbered seats
    order = api.ok("")
    assert order["status"]["type"] == "BASKET"
    assert order["status"]["expires_in"]["time_unit"] == "SECONDS"
    order_id = order["id"]
    order = api.ok("seats", {"seats": [{"id": 103, "session_id": 1001},
                                       {"id": 104, "session_id": 1001, "rate_id": 2}]},
                   order_id=order_id)
    seat = order["items"][0]["allocation"]
    assert (seat["type"], seat["row"]["name"], seat["seat"]["name"]) == ("NUMBERED", "3", "3")
    assert sandbox.admin.inventory(1001)["seats"]["103"] == "HELD"
    # When it is completed and confirmed
    api.ok("buyer-data", {"email": "buyer@example.com", "name": "Ada"}, order_id=order_id)
    pre = api.ok("pre-confirm", {}, order_id=order_id)
    assert pre["status"]["type"] == "PRE_CONFIRM"
    code = pre["code"]
    done = api.ok("confirm", {"external_code": "intent-1", "payments": []}, order_id=order_id)
    # Then the order is final, sold and findable by its code
    assert done["status"] == {"type": "CONFIRM", "expires_in": None}
    assert done["code"] == code
    assert done["external_code"] == "intent-1"
    assert {item["state"] for item in done["items"]} == {"SOLD"}
    assert done["price"]["final"] == 75.0
    assert done["buyer_data"]["name"] == "Ada"
    fetched = api.get_order(code)
    assert fetched.status_code == 200
    assert fetched.json()["status"]["type"] == "CONFIRM"
    assert sandbox.admin.inventory(1001)["seats"]["104"] == "SOLD"
    assert sandbox.admin.audit()["confirmed"] == {"intent-1": [code]}


def test_full_flow_automatic(api: Api, sandbox: RunningSandbox) -> None:
    pre = api.pre_confirmed(1002, 3, quantity=3)
    assert len(pre["items"]) == 3
    assert {item["allocation"]["type"] for item in pre["items"]} == {"NOT_NUMBERED"}
    done = api.ok("confirm", {"external_code": "intent-2"}, order_id=pre["id"])
    assert done["status"]["type"] == "CONFIRM"
    capacity = sandbox.admin.inventory(1002)["capacity"]["3"]
    assert (capacity["sold"], capacity["held"]) == (3, 0)
    audit = sandbox.admin.audit()
    assert audit["seats_sold"] == {"1002": 3}
    assert audit["requests"]["confirm"] == 1


def test_seats_auto_on_numbered_seats_takes_the_lowest_ids(api: Api) -> None:
    order_id = api.basket()
    order = api.ok("seats-auto", {"session_id": 1001, "price_type_id": 2, "quantity": 2},
                   order_id=order_id)
    assert [item["allocation"]["seat"]["id"] for item in order["items"]] == [3001, 3002]


def test_release_seats(api: Api, sandbox: RunningSandbox) -> None:
    pre = api.pre_confirmed(1001, 1, quantity=2)
    first = pre["items"][0]["id"]
    response = api.call("seats", order_id=pre["id"], method="DELETE", params={"id": [first]})
    assert response.status_code == 200
    order = response.json()
    assert order["status"]["type"] == "BASKET"
    assert order["code"] == pre["code"]
    assert [item["id"] for item in order["items"]] == [pre["items"][1]["id"]]
    assert sandbox.admin.inventory(1001)["seats"]["1"] == "FREE"


# -- errors --------------------------------------------------------------------------------


def test_wrong_content_type_is_415(api: Api) -> None:
    order_id = api.basket()
    response = api.call("buyer-data", order_id=order_id, data="email=a@b.c",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_error(response, 415, "DIST0003")


@pytest.mark.parametrize("how", ["missing", "bad", "lowercase-scheme-but-unknown"])
def test_bad_tokens_are_401(api: Api, how: str) -> None:
    headers = {"missing": {}, "bad": {"Authorization": "Bearer nope"},
               "lowercase-scheme-but-unknown": {"Authorization": "bearer nope"}}[how]
    response = api.http.post(f"{api.url}{DIST}/orders", headers=headers, timeout=5)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_revoked_token_is_401(api: Api, sandbox: RunningSandbox) -> None:
    api.basket()
    assert sandbox.admin.revoke_tokens() == 1
    response = api.call("")
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


def test_expired_token_is_401(api: Api, sandbox: RunningSandbox) -> None:
    sandbox.admin.configure(token_ttl=1.5)
    grant = api.token_response().json()
    assert grant["expires_in"] == 1
    token = grant["access_token"]
    wait_for(lambda: api.call("", token=token).status_code == 401, "the token to expire")
    assert api.call("", token=api.token_response().json()["access_token"]).status_code == 200


@pytest.mark.parametrize(
    ("step", "body", "status", "code"),
    [
        ("seats-auto", b"{not json", 400, "DIST0001"),
        ("seats-auto", b"[1, 2]", 400, "DIST0001"),
        ("seats-auto", {"session_id": 1002, "price_type_id": 3, "quantity": 0}, 400, "DIST0005"),
        ("seats-auto", {"session_id": "1002", "price_type_id": 3, "quantity": 1}, 400,
         "DIST0005"),
        ("seats-auto", {"session_id": 1002, "quantity": 1}, 400, "PARAMETER_REQUIRED"),
        ("seats-auto", {"session_id": 9, "price_type_id": 3, "quantity": 1}, 404,
         "SESSION_NOT_FOUND"),
        ("seats-auto", {"session_id": 1003, "price_type_id": 6, "quantity": 3}, 409,
         "ORDER_SEAT_NOT_AVAILABLE"),
        ("seats-auto", {"session_id": 1002, "price_type_id": 3, "quantity": 1001}, 400,
         "ORDER_ITEMS_LIMIT_EXCEEDED"),
        ("seats", {"seats": [{"id": 999_999, "session_id": 1001}]}, 409,
         "ORDER_SEAT_NOT_AVAILABLE"),
        ("seats", {"seats": "all"}, 400, "DIST0005"),
        ("seats", {}, 400, "PARAMETER_REQUIRED"),
        ("buyer-data", {"name": "no email"}, 400, "PARAMETER_REQUIRED"),
        ("buyer-data", {"email": "not-an-address"}, 400, "DIST0005"),
        ("pre-confirm", {}, 400, "PARAMETER_REQUIRED"),
        ("confirm", {}, 400, "DIST0004"),
        ("confirm", {"payments": "cash"}, 400, "DIST0005"),
    ],
)
def test_error_codes_on_a_basket(api: Api, step: str, body: Any, status: int,
                                 code: str) -> None:
    order_id = api.basket()
    if isinstance(body, bytes):
        response = api.call(step, order_id=order_id, data=body,
                            headers={"Content-Type": "application/json"})
    else:
        response = api.call(step, body, order_id=order_id)
    assert_error(response, status, code)


def test_missing_order_id_header(api: Api) -> None:
    assert_error(api.call("buyer-data", {"email": "a@b.c"}), 400, "PARAMETER_REQUIRED")


def test_unknown_order(api: Api) -> None:
    assert_error(api.call("buyer-data", {"email": "a@b.c"}, order_id="0" * 32), 404,
                 "ORDER_NOT_FOUND")
    assert_error(api.get_order("NOSUCHCODE00"), 404, "ORDER_NOT_FOUND")


def test_items_limit_follows_config(api: Api, sandbox: RunningSandbox) -> None:
    sandbox.admin.configure(max_items=2)
    order_id = api.basket()
    api.ok("seats-auto", {"session_id": 1002, "price_type_id": 3, "quantity": 2},
           order_id=order_id)
    response = api.call("seats", {"seats": [{"id": 1, "session_id": 1001}]}, order_id=order_id)
    assert_error(response, 400, "ORDER_ITEMS_LIMIT_EXCEEDED")


def test_confirmed_order_refuses_changes(api: Api) -> None:
    pre = api.pre_confirmed()
    api.ok("confirm", {}, order_id=pre["id"])
    assert_error(api.call("confirm", {}, order_id=pre["id"]), 400, "DIST0004")
    assert_error(api.call("seats-auto", {"session_id": 1002, "price_type_id": 3, "quantity": 1},
                          order_id=pre["id"]), 400, "DIST0004")


def test_sold_out_small_session(api: Api) -> None:
    pre = api.pre_confirmed(1003, 6, quantity=2)
    api.ok("confirm", {}, order_id=pre["id"])
    response = api.call("seats-auto", {"session_id": 1003, "price_type_id": 6, "quantity": 1},
                        order_id=api.basket())
    assert_error(response, 409, "ORDER_SEAT_NOT_AVAILABLE")


def test_unknown_path_and_method(api: Api) -> None:
    assert_error(api.http.get(f"{api.url}/nowhere", timeout=5), 404, "NOT_FOUND")
    response = api.http.get(f"{api.url}{DIST}/orders/confirm", timeout=5)
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert response.headers["Allow"] == "POST"


# -- basket expiry -----------------------------------------------------------------------


def test_basket_expiry_releases_seats(api: Api, sandbox: RunningSandbox) -> None:
    sandbox.admin.configure(basket_ttl=1.0)
    order_id = api.basket()
    api.ok("seats", {"seats": [{"id": 42, "session_id": 1001}]}, order_id=order_id)
    assert sandbox.admin.inventory(1001)["seats"]["42"] == "HELD"
    wait_for(lambda: sandbox.admin.inventory(1001)["seats"]["42"] == "FREE",
             "the basket to expire")
    assert_error(api.call("buyer-data", {"email": "a@b.c"}, order_id=order_id), 404,
                 "ORDER_NOT_FOUND")
    assert sandbox.admin.audit()["orders_expired"] == 1


# -- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "code", "retry_after"),
    [
        ("error_500", 500, "DIST0000", None),
        ("error_503", 503, "DIST0000", "2.5"),
        ("throttle_429", 429, "TOO_MANY_REQUESTS", "2.5"),
    ],
)
def test_error_faults_answer_without_doing_anything(
        api: Api, sandbox: RunningSandbox, kind: str, status: int, code: str,
        retry_after: str | None) -> None:
    sandbox.admin.set_faults({"endpoints": {"create": {"script": [kind], "retry_after": 2.5}}})
    response = api.call("")
    assert_error(response, status, code)
    assert response.headers.get("Retry-After") == retry_after
    audit = sandbox.admin.audit()
    assert audit["orders"]["BASKET"] == 0
    assert audit["faults"] == {"create": {kind: 1}}
    assert api.call("").status_code == 200  # the script is used up


def test_lost_response_is_committed(api: Api, sandbox: RunningSandbox) -> None:
    # Given a confirm whose response will be lost
    pre = api.pre_confirmed()
    sandbox.admin.set_faults({"endpoints": {"confirm": {"script": ["lost_response"]}}})
    # When the client confirms, it sees the connection dropped
    with pytest.raises(requests.ConnectionError):
        api.call("confirm", {"external_code": "intent-lost"}, order_id=pre["id"])
    # Then the server did confirm
    assert api.get_order(pre["code"]).json()["status"]["type"] == "CONFIRM"
    audit = sandbox.admin.audit()
    assert audit["confirmed"] == {"intent-lost": [pre["code"]]}
    assert audit["faults"] == {"confirm": {"lost_response": 1}}


def test_slow_after_answers_late_but_commits_first(api: Api, sandbox: RunningSandbox) -> None:
    pre = api.pre_confirmed()
    sandbox.admin.set_faults({"endpoints": {"confirm": {"script": ["slow_after"],
                                                        "slow_after_ms": 3000}}})
    with pytest.raises(requests.Timeout):
        api.call("confirm", {"external_code": "intent-slow"}, order_id=pre["id"], timeout=0.3)
    wait_for(lambda: api.get_order(pre["code"]).json()["status"]["type"] == "CONFIRM",
             "the slow confirm to be committed")


def test_latency_does_not_stop_the_call(api: Api, sandbox: RunningSandbox) -> None:
    sandbox.admin.set_faults({"endpoints": {"create": {"latency_ms": 1000}}})
    with pytest.raises(requests.Timeout):
        api.call("", timeout=0.2)
    wait_for(lambda: sandbox.admin.audit()["orders"]["BASKET"] == 1,
             "the delayed create to be done")


def test_delayed_answer_arrives(api: Api, sandbox: RunningSandbox) -> None:
    sandbox.admin.set_faults({"endpoints": {"*": {"latency_ms": 20, "latency_jitter_ms": 10,
                                                  "script": ["ok", "slow_after"],
                                                  "slow_after_ms": 20}}})
    assert api.call("").status_code == 200
    assert api.call("").status_code == 200
    assert sandbox.admin.audit()["faults"] == {"create": {"slow_after": 1}}


def test_seeded_probabilities_repeat(api: Api, sandbox: RunningSandbox) -> None:
    plan = {"seed": 3, "endpoints": {"create": {"error_500": 0.5}}}

    def statuses() -> list[int]:
        sandbox.admin.set_faults(plan)
        return [api.call("").status_code for _ in range(12)]

    first = statuses()
    assert set(first) == {200, 500}
    assert statuses() == first


def test_rate_limit(api: Api, sandbox: RunningSandbox) -> None:
    api.token()  # the token call is limited too: take it before the bucket starts
    sandbox.admin.set_faults({"rate_limit": {"per_second": 0.01, "burst": 3, "retry_after": 1}})
    statuses = [api.call("").status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    response = api.call("")
    assert_error(response, 429, "TOO_MANY_REQUESTS")
    assert response.headers["Retry-After"] == "1"
    assert sandbox.admin.health()  # control endpoints are never limited
    audit = sandbox.admin.audit()
    assert audit["faults"] == {"create": {"rate_limit": 1}}
    # Every call is also counted in the second it arrived (token and four creates)
    assert all(second.isdigit() for second in audit["per_second"])
    assert sum(c["requests"] for c in audit["per_second"].values()) == 5
    assert sum(c["rate_limited"] for c in audit["per_second"].values()) == 1


def test_fault_plan_control(sandbox: RunningSandbox) -> None:
    admin = sandbox.admin
    admin.set_faults({"endpoints": {"confirm": {"script": ["ok", "error_503"]}}})
    current = admin.get_faults()
    assert current["endpoints"]["confirm"]["script"] == ["ok", "error_503"]
    assert current["script_remaining"] == {"confirm": ["ok", "error_503"]}
    with pytest.raises(requests.HTTPError) as exc:
        admin.set_faults({"endpoints": {"confirm": {"error_500": 2}}})
    assert exc.value.response is not None
    assert exc.value.response.json()["code"] == "INVALID_FAULT_PLAN"
    admin.reset()
    assert admin.get_faults()["endpoints"] == {}


# -- control endpoints ------------------------------------------------------------------


def test_inventory_and_audit_shapes(api: Api, sandbox: RunningSandbox) -> None:
    api.pre_confirmed(1003, 5, quantity=1)
    inventory = sandbox.admin.inventory(1003)
    assert inventory == {"seats": {"1": "HELD", "2": "FREE", "3": "FREE", "4": "FREE"},
                         "capacity": {"6": {"total": 2, "free": 2, "held": 0, "sold": 0}}}
    audit = sandbox.admin.audit()
    assert audit["orders"] == {"BASKET": 0, "PRE_CONFIRM": 1, "CONFIRM": 0}
    assert audit["tokens_issued"] == 1
    assert audit["requests"] == {"token": 1, "create": 1, "seats_auto": 1, "buyer_data": 1,
                                 "pre_confirm": 1}
    for key in ("confirmed", "duplicates", "confirmed_without_external_code", "seats_sold",
                "seats_sold_twice", "faults"):
        assert key in audit


def test_inventory_errors(sandbox: RunningSandbox) -> None:
    with requests.Session() as http:
        missing = http.get(f"{sandbox.url}/__sandbox/inventory", timeout=5)
        unknown = http.get(f"{sandbox.url}/__sandbox/inventory?session_id=5", timeout=5)
    assert_error(missing, 400, "PARAMETER_REQUIRED")
    assert_error(unknown, 404, "SESSION_NOT_FOUND")


def test_duplicates_are_audited(api: Api, sandbox: RunningSandbox) -> None:
    codes = []
    for _ in range(2):
        pre = api.pre_confirmed()
        api.ok("confirm", {"external_code": "same"}, order_id=pre["id"])
        codes.append(pre["code"])
    audit = sandbox.admin.audit()
    assert audit["duplicates"] == {"same": 2}
    assert audit["confirmed"] == {"same": codes}


# -- HTTP/1.1 --------------------------------------------------------------------------


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Read ``count`` responses (Content-Length framed) from a raw socket."""
    buf = b""
    responses: list[tuple[int, dict[str, str], bytes]] = []
    sock.settimeout(5)
    while len(responses) < count:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            lines = buf[:end].decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            length = int(headers["content-length"])
            if len(buf) >= end + 4 + length:
                responses.append((int(lines[0].split()[1]), headers,
                                  buf[end + 4:end + 4 + length]))
                buf = buf[end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {len(responses)} responses")
        buf += chunk
    return responses


def test_keep_alive_reuses_one_connection(sandbox: RunningSandbox) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", sandbox.port, timeout=5)
    try:
        conn.request("GET", "/__sandbox/health")
        conn.getresponse().read()
        first_socket = conn.sock
        for _ in range(3):
            conn.request("GET", "/__sandbox/health")
            response = conn.getresponse()
            assert json.loads(response.read()) == {"ok": True}
        assert conn.sock is first_socket
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(api: Api, sandbox: RunningSandbox) -> None:
    token = api.token()
    body = b'{"session_id": 1002, "price_type_id": 3, "quantity": 1}'
    requests_bytes = (
        b"GET /__sandbox/health HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /distribution-api/v1/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + token.encode() + b"\r\nContent-Length: 0\r\n\r\n"
        b"GET /__sandbox/inventory?session_id=1003 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /distribution-api/v1/orders/seats-auto HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\n\r\n" + body
    )
    with socket.create_connection(("127.0.0.1", sandbox.port)) as sock:
        sock.sendall(requests_bytes)
        responses = read_responses(sock, 4)
    assert [status for status, _, _ in responses] == [200, 200, 200, 401]
    assert json.loads(responses[0][2]) == {"ok": True}
    assert json.loads(responses[1][2])["status"]["type"] == "BASKET"
    assert "seats" in json.loads(responses[2][2])


def test_pipelining_keeps_order_across_delayed_answers(sandbox: RunningSandbox) -> None:
    sandbox.admin.set_faults({"endpoints": {"token": {"latency_ms": 100}}})
    form = (f"grant_type=client_credentials&channel_id={CHANNEL}"
            f"&client_id=seller-channel-client&client_secret={API_KEY}").encode()
    token_request = (b"POST /oauth/token HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: " + str(len(form)).encode() + b"\r\n\r\n" + form)
    with socket.create_connection(("127.0.0.1", sandbox.port)) as sock:
        sock.sendall(token_request + b"GET /__sandbox/health HTTP/1.1\r\nHost: x\r\n\r\n")
        (first, _, token_body), (second, _, health_body) = read_responses(sock, 2)
    assert first == 200
    assert "access_token" in json.loads(token_body)
    assert (second, json.loads(health_body)) == (200, {"ok": True})


def test_connection_close_is_honoured(sandbox: RunningSandbox) -> None:
    with socket.create_connection(("127.0.0.1", sandbox.port)) as sock:
        sock.sendall(b"GET /__sandbox/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [(status, headers, _)] = read_responses(sock, 1)
        assert status == 200
        assert headers["connection"] == "close"
        assert sock.recv(1024) == b""  # the server closed its side


def test_http10_without_keep_alive_closes(sandbox: RunningSandbox) -> None:
    with socket.create_connection(("127.0.0.1", sandbox.port)) as sock:
        sock.sendall(b"GET /__sandbox/health HTTP/1.0\r\n\r\n")
        [(status, _, _)] = read_responses(sock, 1)
        assert status == 200
        assert sock.recv(1024) == b""


def test_chunked_bodies_are_refused(sandbox: RunningSandbox) -> None:
    with socket.create_connection(("127.0.0.1", sandbox.port)) as sock:
        sock.sendall(b"POST /distribution-api/v1/orders HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        [(status, _, _)] = read_responses(sock, 1)
        assert status == 411
        assert sock.recv(1024) == b""


def test_malformed_request_is_400(sandbox: RunningSandbox) -> None:
    with socket.create_connection(("127.0.0.1", sandbox.port)) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        [(status, _, _)] = read_responses(sock, 1)
        assert status == 400


def test_idle_connections_are_closed() -> None:
    async def scenario() -> bytes:
        server = HttpServer(lambda _: Response(200, b"{}"), idle_timeout=0.3)
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            await reader.readuntil(b"{}")
            return await asyncio.wait_for(reader.read(), 10)  # EOF once the server closes
        finally:
            writer.close()
            await writer.wait_closed()
            await server.close()

    assert asyncio.run(scenario()) == b""


# -- the command ----------------------------------------------------------------------


def test_command_prints_its_url_and_stops_on_sigterm() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ONEBOX_API_KEY": "from-env"}
    with subprocess.Popen(
        [sys.executable, "-m", "fulfilment.sandbox", "--port", "0", "--basket-ttl", "30",
         "--faults", '{"endpoints": {"create": {"error_500": 1}}}'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root, env=env,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("sandbox listening on http://127.0.0.1:")
            url = line.removeprefix("sandbox listening on ")
            with requests.Session() as http:
                form = {"grant_type": "client_credentials", "channel_id": "sandbox-channel",
                        "client_id": "seller-channel-client", "client_secret": "from-env"}
                token = http.post(f"{url}/oauth/token", data=form, timeout=5).json()
                response = http.post(f"{url}{DIST}/orders", timeout=5, headers={
                    "Authorization": f"Bearer {token['access_token']}"})
                assert response.status_code == 500
                config = http.get(f"{url}/__sandbox/config", timeout=5).json()
                assert config["basket_ttl"] == 30
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            assert proc.stdout.read() == ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
