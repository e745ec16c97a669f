"""The sandbox's other possible answers over real HTTP: switches and the new faults.

Each switch where the real Onebox API is unknown is tested in both positions;
``late``, ``error_401`` and ``error_403`` on several endpoints. The sandbox's
wall clock (baskets, tokens, the orders-management lag) is one this module moves
by hand, so expiry and lag are shown without waiting; a late call takes real
time and is waited for as a condition with a deadline, never with a sleep.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import requests

from fulfilment.sandbox import Behaviour, RunningSandbox, SandboxOptions, start_in_thread
from tests.integration.test_sandbox_http import (
    API_KEY,
    CHANNEL,
    DIST,
    Api,
    assert_error,
    wait_for,
)

pytestmark = pytest.mark.integration

TTL = 600


class Clock:
    """A wall clock the test moves forward by hand; read from the sandbox's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = time.time()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def sandbox(clock: Clock) -> Iterator[RunningSandbox]:
    options = SandboxOptions(api_key=API_KEY, channel_id=CHANNEL, seed=9, basket_ttl=TTL)
    with start_in_thread(options, clock=clock) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(sandbox: RunningSandbox) -> None:
    sandbox.admin.reset()


@pytest.fixture
def api(sandbox: RunningSandbox) -> Iterator[Api]:
    with requests.Session() as http:
        yield Api(http, sandbox.url)


def configure(sandbox: RunningSandbox, **switches: Any) -> None:
    config = sandbox.admin.configure(**switches)
    for key, value in switches.items():
        assert config[key] == value


def status_of(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    status: str = response.json()["status"]["type"]
    return status


# -- /__sandbox/config, SandboxOptions and the command line --------------------------------


def test_config_shows_every_switch_and_changes_them(sandbox: RunningSandbox) -> None:
    admin = sandbox.admin
    config = requests.get(f"{sandbox.url}/__sandbox/config", timeout=5).json()
    assert config == {"token_ttl": 43199, "basket_ttl": TTL, "max_items": 1000,
                      **Behaviour().to_dict()}
    changed = admin.configure(repeat_status_call="idempotent", orders_mgmt_lag_ms=250,
                              reads_touch=True, seat_unavailable_status=400, max_items=5)
    assert changed == {**config, "repeat_status_call": "idempotent", "orders_mgmt_lag_ms": 250,
                       "reads_touch": True, "seat_unavailable_status": 400, "max_items": 5}
    admin.reset()
    assert requests.get(f"{sandbox.url}/__sandbox/config", timeout=5).json() == config


@pytest.mark.parametrize("bad", [{"repeat_status_call": "maybe"}, {"no_such_switch": 1},
                                 {"orders_mgmt_lag_ms": -1}, {"reads_touch": "true"}])
def test_a_bad_switch_changes_nothing(sandbox: RunningSandbox, bad: dict[str, Any]) -> None:
    before = requests.get(f"{sandbox.url}/__sandbox/config", timeout=5).json()
    response = requests.post(f"{sandbox.url}/__sandbox/config", timeout=5,
                             json={"buyer_data": "merge", "max_items": 3, **bad})
    assert_error(response, 400, "DIST0005")
    assert requests.get(f"{sandbox.url}/__sandbox/config", timeout=5).json() == before


def test_reset_restores_the_start_up_switches() -> None:
    options = SandboxOptions(behaviour=Behaviour(repeat_status_call="idempotent",
                                                 orders_mgmt_read="403"))
    with start_in_thread(options) as running:
        assert running.admin.configure()["repeat_status_call"] == "idempotent"
        running.admin.configure(repeat_status_call="refuse", orders_mgmt_read="ok")
        running.admin.reset()
        config = running.admin.configure()
        assert (config["repeat_status_call"], config["orders_mgmt_read"]) == (
            "idempotent", "403")


def test_command_line_switches() -> None:
    root = Path(__file__).resolve().parents[2]
    with subprocess.Popen(
        [sys.executable, "-m", "fulfilment.sandbox", "--port", "0",
         "--behaviour", "repeat_status_call=idempotent", "--behaviour", "orders_mgmt_lag_ms=250",
         "--behaviour", "reads_touch=true"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root, env=os.environ,
    ) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip().removeprefix("sandbox listening on ")
            config = requests.get(f"{url}/__sandbox/config", timeout=5).json()
            assert config == {**config, "repeat_status_call": "idempotent",
                              "orders_mgmt_lag_ms": 250, "reads_touch": True,
                              "buyer_data": "replace"}
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_command_line_refuses_a_bad_switch() -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "fulfilment.sandbox", "--port", "0",
         "--behaviour", "repeat_status_call=sometimes"],
        capture_output=True, text=True, cwd=root, timeout=30, check=False)
    assert done.returncode == 2
    assert "repeat_status_call must be one of" in done.stderr
    assert done.stdout == ""


# -- the late outcome -----------------------------------------------------------------------


def test_a_late_confirm_times_out_and_is_done_afterwards(
        api: Api, sandbox: RunningSandbox) -> None:
    pre = api.pre_confirmed()
    sandbox.admin.set_faults({"endpoints": {"confirm": {"script": ["late"], "late_ms": 2000}}})
    with pytest.raises(requests.Timeout):
        api.call("confirm", {"external_code": "intent-late"}, order_id=pre["id"], timeout=0.3)
    wait_for(lambda: status_of(api.get_order(pre["code"])) == "CONFIRM",
             "the late confirm to be done")
    audit = sandbox.admin.audit()
    assert audit["confirmed"] == {"intent-late": [pre["code"]]}
    assert audit["faults"] == {"confirm": {"late": 1}}


def send_and_hang_up(port: int, raw: bytes) -> None:
    """Send one request and close the connection at once: a client that gave up."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(raw)


def raw_request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: sandbox\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (head + "\r\n").encode() + body


def test_a_late_token_call_is_done_after_the_client_hung_up(sandbox: RunningSandbox) -> None:
    sandbox.admin.set_faults({"endpoints": {"token": {"script": ["late"], "late_ms": 200}}})
    form = (f"grant_type=client_credentials&channel_id={CHANNEL}"
            f"&client_id=seller-channel-client&client_secret={API_KEY}").encode()
    send_and_hang_up(sandbox.port, raw_request(
        "POST", "/oauth/token", {"Content-Type": "application/x-www-form-urlencoded"}, form))
    wait_for(lambda: sandbox.admin.audit()["tokens_issued"] == 1, "the late token call")
    assert sandbox.admin.audit()["faults"] == {"token": {"late": 1}}


class LateCase(NamedTuple):
    """A call to send late, and how to see it was done."""

    method: str
    step: str
    body: Any
    order_id: str | None
    done: Callable[[], bool]


def _ready_basket(api: Api) -> str:
    order_id = api.basket()
    api.ok("seats-auto", {"session_id": 1002, "price_type_id": 3, "quantity": 1},
           order_id=order_id)
    api.ok("buyer-data", {"email": "buyer@example.com"}, order_id=order_id)
    return order_id


def _late_case(endpoint: str, api: Api, sandbox: RunningSandbox) -> LateCase:
    admin = sandbox.admin
    if endpoint == "create":
        return LateCase("POST", "", None, None,
                        lambda: admin.audit()["orders"]["BASKET"] == 1)
    if endpoint == "seats":
        return LateCase("POST", "seats", {"seats": [{"id": 7, "session_id": 1001}]},
                        api.basket(), lambda: admin.inventory(1001)["seats"]["7"] == "HELD")
    if endpoint == "seats_auto":
        return LateCase("POST", "seats-auto",
                        {"session_id": 1003, "price_type_id": 6, "quantity": 2}, api.basket(),
                        lambda: admin.inventory(1003)["capacity"]["6"]["held"] == 2)
    if endpoint == "buyer_data":
        order_id = api.basket()
        api.ok("seats-auto", {"session_id": 1002, "price_type_id": 3, "quantity": 1},
               order_id=order_id)
        # pre-confirm is refused (no buyer) until the late buyer data is done
        return LateCase("POST", "buyer-data", {"email": "late@example.com"}, order_id,
                        lambda: api.call("pre-confirm", {}, order_id=order_id).status_code
                        == 200)
    if endpoint == "pre_confirm":
        return LateCase("POST", "pre-confirm", {}, _ready_basket(api),
                        lambda: admin.audit()["orders"]["PRE_CONFIRM"] == 1)
    if endpoint == "confirm":
        pre = api.pre_confirmed()
        return LateCase("POST", "confirm", {"external_code": "late"}, pre["id"],
                        lambda: admin.audit()["confirmed"] == {"late": [pre["code"]]})
    assert endpoint == "release"
    order_id = api.basket()
    item = api.ok("seats", {"seats": [{"id": 5, "session_id": 1001}]},
                  order_id=order_id)["items"][0]["id"]
    return LateCase("DELETE", f"seats?id={item}", None, order_id,
                    lambda: admin.inventory(1001)["seats"]["5"] == "FREE")


@pytest.mark.parametrize("endpoint", ["create", "seats", "seats_auto", "buyer_data",
                                      "pre_confirm", "confirm", "release"])
def test_a_late_call_is_done_after_the_client_hung_up(
        api: Api, sandbox: RunningSandbox, endpoint: str) -> None:
    case = _late_case(endpoint, api, sandbox)
    headers = {"Authorization": f"Bearer {api.token()}", "Content-Type": "application/json"}
    if case.order_id is not None:
        headers["ob-order-id"] = case.order_id
    # Long enough for the server to see the hang-up before it starts the work.
    sandbox.admin.set_faults({"endpoints": {endpoint: {"script": ["late"], "late_ms": 500}}})
    path = f"{DIST}/orders{'/' + case.step if case.step else ''}"
    body = b"" if case.body is None else json.dumps(case.body).encode()
    send_and_hang_up(sandbox.port, raw_request(case.method, path, headers, body))
    wait_for(case.done, f"the late {endpoint} call to be done")
    assert sandbox.admin.audit()["faults"] == {endpoint: {"late": 1}}


def test_a_late_read_answers_late(api: Api, sandbox: RunningSandbox) -> None:
    pre = api.pre_confirmed()
    sandbox.admin.set_faults({"endpoints": {"get_order": {"script": ["late"], "late_ms": 2000}}})
    with pytest.raises(requests.Timeout):
        api.http.get(f"{api.url}/orders-mgmt-api/v1/orders/{pre['code']}", timeout=0.3,
                     headers={"Authorization": f"Bearer {api.token()}"})
    assert status_of(api.get_order(pre["code"])) == "PRE_CONFIRM"  # the script is used up
    assert sandbox.admin.audit()["faults"] == {"get_order": {"late": 1}}


# -- error_401 and error_403 ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["error_401", "error_403"])
def test_auth_faults_on_the_token_endpoint(api: Api, sandbox: RunningSandbox, kind: str) -> None:
    sandbox.admin.set_faults({"endpoints": {"token": {"script": [kind]}}})
    response = api.token_response()  # good credentials
    if kind == "error_401":
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_client"'
    else:
        assert_error(response, 403, "FORBIDDEN_RESOURCE")
    audit = sandbox.admin.audit()
    assert audit["tokens_issued"] == 0
    assert audit["faults"] == {"token": {kind: 1}}
    assert api.token_response().status_code == 200  # the script is used up


@pytest.mark.parametrize("kind", ["error_401", "error_403"])
def test_auth_faults_on_confirm_do_nothing(api: Api, sandbox: RunningSandbox, kind: str) -> None:
    pre = api.pre_confirmed()
    sandbox.admin.set_faults({"endpoints": {"*": {"script": [kind]}}})
    response = api.call("confirm", {"external_code": "auth"}, order_id=pre["id"])
    if kind == "error_401":
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_token"
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    else:
        assert_error(response, 403, "FORBIDDEN_RESOURCE")
    assert status_of(api.get_order(pre["code"])) == "PRE_CONFIRM"
    audit = sandbox.admin.audit()
    assert audit["confirmed"] == {}
    assert audit["faults"] == {"confirm": {kind: 1}}
    assert status_of(api.call("confirm", {}, order_id=pre["id"])) == "CONFIRM"


@pytest.mark.parametrize("kind", ["error_401", "error_403"])
def test_auth_faults_on_create_and_read(api: Api, sandbox: RunningSandbox, kind: str) -> None:
    pre = api.pre_confirmed()
    sandbox.admin.set_faults({"endpoints": {"create": {"error_401": 1.0 if kind == "error_401"
                                                       else 0, "error_403": 1.0
                                                       if kind == "error_403" else 0},
                                            "get_order": {"script": [kind]}}})
    status = 401 if kind == "error_401" else 403
    assert api.call("").status_code == status
    assert api.get_order(pre["code"]).status_code == status
    audit = sandbox.admin.audit()
    assert audit["orders"]["BASKET"] == 0
    assert audit["faults"] == {"create": {kind: 1}, "get_order": {kind: 1}}


# -- switches, each in both positions -------------------------------------------------------


def test_release_outside_basket(api: Api, sandbox: RunningSandbox) -> None:
    pre = api.pre_confirmed()
    item = pre["items"][0]["id"]
    configure(sandbox, release_outside_basket="refuse")
    assert_error(api.call(f"seats?id={item}", method="DELETE", order_id=pre["id"]),
                 400, "DIST0004")
    assert status_of(api.get_order(pre["code"])) == "PRE_CONFIRM"
    assert sandbox.admin.inventory(1002)["capacity"]["3"]["held"] == 1
    configure(sandbox, release_outside_basket="ignored")
    kept = api.ok(f"seats?id={item}", method="DELETE", order_id=pre["id"])
    assert (kept["status"]["type"], [i["id"] for i in kept["items"]]) == ("PRE_CONFIRM", [item])
    assert sandbox.admin.inventory(1002)["capacity"]["3"]["held"] == 1
    configure(sandbox, release_outside_basket="to_basket")
    released = api.ok(f"seats?id={item}", method="DELETE", order_id=pre["id"])
    assert (released["status"]["type"], released["items"]) == ("BASKET", [])
    assert sandbox.admin.inventory(1002)["capacity"]["3"]["held"] == 0


def test_orders_mgmt_read(api: Api, sandbox: RunningSandbox) -> None:
    pre = api.pre_confirmed()
    assert status_of(api.get_order(pre["code"])) == "PRE_CONFIRM"
    configure(sandbox, orders_mgmt_read="401")
    response = api.get_order(pre["code"])
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert api.get_order(pre["code"]).status_code == 401  # every time, even with a new token
    assert api.call("confirm", {}, order_id=pre["id"]).status_code == 200  # the token is good
    configure(sandbox, orders_mgmt_read="403")
    assert_error(api.get_order(pre["code"]), 403, "FORBIDDEN_RESOURCE")
    # 404 for an order that exists, as for one this channel may not read
    configure(sandbox, orders_mgmt_read="404")
    assert_error(api.get_order(pre["code"]), 404, "ORDER_NOT_FOUND")
    assert_error(api.get_order("NOSUCHCODE00"), 404, "ORDER_NOT_FOUND")
    configure(sandbox, orders_mgmt_read="ok")
    assert status_of(api.get_order(pre["code"])) == "CONFIRM"


def test_confirm_calls_are_recorded_per_order_whatever_the_answer(
        api: Api, sandbox: RunningSandbox) -> None:
    # Given one order confirmed after an injected 503, and one never confirmed
    confirmed, untouched = api.pre_confirmed(), api.pre_confirmed()
    sandbox.admin.set_faults({"endpoints": {"confirm": {"script": ["error_503"]}}})
    assert api.call("confirm", {}, order_id=confirmed["id"]).status_code == 503
    api.ok("confirm", {}, order_id=confirmed["id"])
    # Then the record names every confirm call that reached the sandbox, by order
    calls = sandbox.admin.confirm_calls()
    assert calls[confirmed["id"]] == 2 and untouched["id"] not in calls
    sandbox.admin.reset()
    assert sandbox.admin.confirm_calls() == {}


def test_orders_mgmt_lag(api: Api, sandbox: RunningSandbox, clock: Clock) -> None:
    configure(sandbox, orders_mgmt_lag_ms=1500)
    pre = api.pre_confirmed()
    assert_error(api.get_order(pre["code"]), 404, "ORDER_NOT_FOUND")  # the code is too new
    clock.advance(1.5)
    assert status_of(api.get_order(pre["code"])) == "PRE_CONFIRM"
    assert status_of(api.call("confirm", {}, order_id=pre["id"])) == "CONFIRM"
    assert status_of(api.get_order(pre["code"])) == "PRE_CONFIRM"  # still the old status
    clock.advance(1.0)
    assert status_of(api.get_order(pre["code"])) == "PRE_CONFIRM"
    clock.advance(0.5)
    assert status_of(api.get_order(pre["code"])) == "CONFIRM"


def test_orders_mgmt_without_lag(api: Api) -> None:
    pre = api.pre_confirmed()
    assert status_of(api.get_order(pre["code"])) == "PRE_CONFIRM"
    api.ok("confirm", {}, order_id=pre["id"])
    assert status_of(api.get_order(pre["code"])) == "CONFIRM"


def test_orders_mgmt_scope(api: Api, sandbox: RunningSandbox) -> None:
    pre = api.pre_confirmed()
    assert status_of(api.get_order(pre["code"])) == "PRE_CONFIRM"
    configure(sandbox, orders_mgmt_scope="confirmed")
    assert_error(api.get_order(pre["code"]), 404, "ORDER_NOT_FOUND")
    api.ok("confirm", {}, order_id=pre["id"])
    assert status_of(api.get_order(pre["code"])) == "CONFIRM"


def test_repeat_status_call(api: Api, sandbox: RunningSandbox) -> None:
    pre = api.pre_confirmed()
    assert_error(api.call("pre-confirm", {}, order_id=pre["id"]), 400, "DIST0004")
    configure(sandbox, repeat_status_call="idempotent")
    again = api.ok("pre-confirm", {}, order_id=pre["id"])
    assert (again["status"]["type"], again["code"]) == ("PRE_CONFIRM", pre["code"])
    api.ok("confirm", {"external_code": "first"}, order_id=pre["id"])
    repeat = api.ok("confirm", {"external_code": "second"}, order_id=pre["id"])
    assert (repeat["status"]["type"], repeat["external_code"]) == ("CONFIRM", "first")
    assert sandbox.admin.audit()["confirmed"] == {"first": [pre["code"]]}
    configure(sandbox, repeat_status_call="refuse")
    assert_error(api.call("confirm", {}, order_id=pre["id"]), 400, "DIST0004")


@pytest.mark.parametrize("mode", ["gone", "readable"])
def test_expired_orders(api: Api, sandbox: RunningSandbox, clock: Clock, mode: str) -> None:
    configure(sandbox, expired_orders=mode)
    pre = api.pre_confirmed()
    clock.advance(TTL + 1)
    assert_error(api.call("confirm", {}, order_id=pre["id"]), 404, "ORDER_NOT_FOUND")
    response = api.get_order(pre["code"])
    if mode == "gone":
        assert_error(response, 404, "ORDER_NOT_FOUND")
    else:
        doc = response.json()
        assert status_of(response) == "EXPIRED"
        assert doc["status"]["expires_in"] is None
        assert (doc["id"], doc["code"]) == (pre["id"], pre["code"])
        assert [item["state"] for item in doc["items"]] == ["RELEASED"]
    assert sandbox.admin.inventory(1002)["capacity"]["3"]["held"] == 0
    assert sandbox.admin.audit()["orders_expired"] == 1


@pytest.mark.parametrize(("touch", "alive"), [(True, True), (False, False)])
def test_refused_calls_touch(api: Api, sandbox: RunningSandbox, clock: Clock, touch: bool,
                             alive: bool) -> None:
    configure(sandbox, refused_calls_touch=touch)
    pre = api.pre_confirmed()
    clock.advance(TTL - 100)
    assert_error(api.call("pre-confirm", {}, order_id=pre["id"]), 400, "DIST0004")
    clock.advance(200)  # past the last success's deadline, not the refused call's
    response = api.call("confirm", {}, order_id=pre["id"])
    if alive:
        assert status_of(response) == "CONFIRM"
    else:
        assert_error(response, 404, "ORDER_NOT_FOUND")


def test_a_successful_call_touches_when_refusals_do_not(
        api: Api, sandbox: RunningSandbox, clock: Clock) -> None:
    configure(sandbox, refused_calls_touch=False)
    order_id = api.basket()
    clock.advance(TTL - 100)
    fresh = api.ok("seats-auto", {"session_id": 1002, "price_type_id": 3, "quantity": 1},
                   order_id=order_id)
    assert fresh["status"]["expires_in"]["value"] == TTL
    clock.advance(200)
    assert api.call("buyer-data", {"email": "a@b.c"}, order_id=order_id).status_code == 200


@pytest.mark.parametrize(("touch", "alive"), [(False, False), (True, True)])
def test_reads_touch(api: Api, sandbox: RunningSandbox, clock: Clock, touch: bool,
                     alive: bool) -> None:
    configure(sandbox, reads_touch=touch)
    pre = api.pre_confirmed()
    clock.advance(TTL - 100)
    assert status_of(api.get_order(pre["code"])) == "PRE_CONFIRM"
    clock.advance(200)
    response = api.call("confirm", {}, order_id=pre["id"])
    if alive:
        assert status_of(response) == "CONFIRM"
    else:
        assert_error(response, 404, "ORDER_NOT_FOUND")


@pytest.mark.parametrize(("mode", "items"), [("per_place", 3), ("per_call", 1)])
def test_seats_auto_items(api: Api, sandbox: RunningSandbox, mode: str, items: int) -> None:
    configure(sandbox, seats_auto_items=mode)
    order = api.ok("seats-auto", {"session_id": 1002, "price_type_id": 3, "quantity": 3},
                   order_id=api.basket())
    assert len(order["items"]) == items
    assert order["price"]["final"] == 180.0
    assert sandbox.admin.inventory(1002)["capacity"]["3"]["held"] == 3
    if mode == "per_call":
        assert order["items"][0]["quantity"] == 3


@pytest.mark.parametrize(("mode", "expected"), [
    ("replace", {"email": "b@example.com"}),
    ("merge", {"email": "b@example.com", "phone": "600"}),
])
def test_buyer_data(api: Api, sandbox: RunningSandbox, mode: str,
                    expected: dict[str, str]) -> None:
    configure(sandbox, buyer_data=mode)
    order_id = api.basket()
    api.ok("buyer-data", {"email": "a@example.com", "phone": "600"}, order_id=order_id)
    order = api.ok("buyer-data", {"email": "b@example.com"}, order_id=order_id)
    assert order["buyer_data"] == expected


def test_empty_body(api: Api, sandbox: RunningSandbox) -> None:
    order_id = api.basket()  # no body: counts as {}
    api.ok("seats-auto", {"session_id": 1002, "price_type_id": 3, "quantity": 1},
           order_id=order_id)
    api.ok("buyer-data", {"email": "a@example.com"}, order_id=order_id)
    configure(sandbox, empty_body="refuse")
    assert_error(api.call(""), 400, "DIST0001")
    assert_error(api.call("pre-confirm", order_id=order_id), 400, "DIST0001")
    assert sandbox.admin.audit()["orders"] == {"BASKET": 1, "PRE_CONFIRM": 0, "CONFIRM": 0}
    assert api.ok("", {})["status"]["type"] == "BASKET"
    assert api.ok("pre-confirm", {}, order_id=order_id)["status"]["type"] == "PRE_CONFIRM"
    configure(sandbox, empty_body="as_object")
    assert api.ok("confirm", order_id=order_id)["status"]["type"] == "CONFIRM"


def test_create_body(api: Api, sandbox: RunningSandbox) -> None:
    plain = {"Content-Type": "text/plain"}
    assert_error(api.call("", data="hello", headers=plain), 415, "DIST0003")
    assert_error(api.call("", data="[1]", headers={"Content-Type": "application/json"}),
                 400, "DIST0001")
    configure(sandbox, create_body="ignored")
    assert api.ok("", data="hello", headers=plain)["status"]["type"] == "BASKET"
    assert api.ok("", data="[1]", headers={"Content-Type": "application/json"})
    assert sandbox.admin.audit()["orders"]["BASKET"] == 2
    # only create ignores its body
    assert_error(api.call("buyer-data", data="hello", headers=plain, order_id=api.basket()),
                 415, "DIST0003")


def test_check_order(api: Api, sandbox: RunningSandbox) -> None:
    pre = api.pre_confirmed()
    bad_seats: dict[str, Any] = {"seats": []}
    assert_error(api.call("seats", bad_seats, order_id=pre["id"]), 400, "DIST0005")
    assert_error(api.call("buyer-data", {}, order_id=pre["id"]), 400, "PARAMETER_REQUIRED")
    configure(sandbox, check_order="status_first")
    assert_error(api.call("seats", bad_seats, order_id=pre["id"]), 400, "DIST0004")
    assert_error(api.call("buyer-data", {}, order_id=pre["id"]), 400, "DIST0004")
    assert_error(api.call("confirm", {"payments": "cash"}, order_id=pre["id"]), 400, "DIST0005")
    api.ok("confirm", {}, order_id=pre["id"])
    assert_error(api.call("seats?id=x", method="DELETE", order_id=pre["id"]), 400, "DIST0004")
    basket = api.basket()
    assert_error(api.call("seats-auto", {"session_id": 1002}, order_id=basket),
                 400, "PARAMETER_REQUIRED")


def test_change_pre_confirmed(api: Api, sandbox: RunningSandbox) -> None:
    pre = api.pre_confirmed()
    more = {"session_id": 1002, "price_type_id": 3, "quantity": 1}
    assert_error(api.call("seats-auto", more, order_id=pre["id"]), 400, "DIST0004")
    assert_error(api.call("buyer-data", {"email": "b@example.com"}, order_id=pre["id"]),
                 400, "DIST0004")
    configure(sandbox, change_pre_confirmed="to_basket")
    order = api.ok("seats-auto", more, order_id=pre["id"])
    assert (order["status"]["type"], len(order["items"]), order["code"]) == (
        "BASKET", 2, pre["code"])
    api.ok("pre-confirm", {}, order_id=pre["id"])
    order = api.ok("buyer-data", {"email": "b@example.com"}, order_id=pre["id"])
    assert order["status"]["type"] == "BASKET"


@pytest.mark.parametrize("mode", ["kept", "new"])
def test_code_after_basket(api: Api, sandbox: RunningSandbox, mode: str) -> None:
    configure(sandbox, code_after_basket=mode)
    pre = api.pre_confirmed()
    back = api.ok(f"seats?id={pre['items'][0]['id']}", method="DELETE", order_id=pre["id"])
    assert back["status"]["type"] == "BASKET"
    api.ok("seats-auto", {"session_id": 1002, "price_type_id": 3, "quantity": 1},
           order_id=pre["id"])
    again = api.ok("pre-confirm", {}, order_id=pre["id"])
    if mode == "kept":
        assert back["code"] == again["code"] == pre["code"]
        assert status_of(api.get_order(pre["code"])) == "PRE_CONFIRM"
    else:
        assert back["code"] is None
        assert again["code"] not in (None, pre["code"])
        assert_error(api.get_order(pre["code"]), 404, "ORDER_NOT_FOUND")
        assert status_of(api.get_order(again["code"])) == "PRE_CONFIRM"


def test_release_unknown_items(api: Api, sandbox: RunningSandbox) -> None:
    order_id = api.basket()
    order = api.ok("seats", {"seats": [{"id": 5, "session_id": 1001},
                                       {"id": 6, "session_id": 1001}]}, order_id=order_id)
    first, second = (item["id"] for item in order["items"])
    assert_error(api.call(f"seats?id={first}&id=999999", method="DELETE", order_id=order_id),
                 400, "DIST0005")
    assert sandbox.admin.inventory(1001)["seats"]["5"] == "HELD"
    configure(sandbox, release_unknown_items="ignore")
    left = api.ok(f"seats?id={first}&id=999999", method="DELETE", order_id=order_id)
    assert [item["id"] for item in left["items"]] == [second]
    again = api.ok(f"seats?id={first}", method="DELETE", order_id=order_id)  # a retry
    assert [item["id"] for item in again["items"]] == [second]
    assert sandbox.admin.inventory(1001)["seats"]["5"] == "FREE"
    assert_error(api.call("seats?id=x", method="DELETE", order_id=order_id), 400, "DIST0005")


def test_missing_rate_id(api: Api, sandbox: RunningSandbox) -> None:
    order_id = api.basket()
    order = api.ok("seats", {"seats": [{"id": 5, "session_id": 1001}]}, order_id=order_id)
    assert order["items"][0]["rate"]["id"] == 1
    configure(sandbox, missing_rate_id="required")
    assert_error(api.call("seats", {"seats": [{"id": 6, "session_id": 1001}]},
                          order_id=order_id), 400, "PARAMETER_REQUIRED")
    assert_error(api.call("seats-auto", {"session_id": 1002, "price_type_id": 3, "quantity": 1},
                          order_id=order_id), 400, "PARAMETER_REQUIRED")
    order = api.ok("seats", {"seats": [{"id": 6, "session_id": 1001, "rate_id": 2}]},
                   order_id=order_id)
    assert order["items"][1]["rate"]["id"] == 2
    order = api.ok("seats-auto", {"session_id": 1002, "price_type_id": 3, "quantity": 1,
                                  "rate_id": 1}, order_id=order_id)
    assert len(order["items"]) == 3


@pytest.mark.parametrize("status", [409, 400])
def test_seat_unavailable_status(api: Api, sandbox: RunningSandbox, status: int) -> None:
    configure(sandbox, seat_unavailable_status=status)
    api.ok("seats", {"seats": [{"id": 1, "session_id": 1003}]}, order_id=api.basket())
    response = api.call("seats", {"seats": [{"id": 1, "session_id": 1003}]},
                        order_id=api.basket())
    assert_error(response, status, "ORDER_SEAT_NOT_AVAILABLE")
