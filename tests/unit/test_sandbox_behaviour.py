"""The sandbox's switches (``Behaviour``) and the new fault outcomes, without a socket.

State-level switches are tested on ``SandboxState`` with a fake clock, each in
both positions; the ``late`` outcome is driven on ``SandboxApp`` in an event
loop this test controls, so "the late call lands after the others" is shown
without depending on timing.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any

import pytest

from fulfilment.sandbox.api import SandboxApp, SandboxOptions
from fulfilment.sandbox.behaviour import DEFAULT, Behaviour, BehaviourError
from fulfilment.sandbox.catalogue import Catalogue
from fulfilment.sandbox.faults import (
    EndpointFaults,
    FaultInjector,
    FaultPlan,
    FaultPlanError,
)
from fulfilment.sandbox.http import Request, Response
from fulfilment.sandbox.state import BASKET, CONFIRM, PRE_CONFIRM, ApiError, Order, SandboxState
from tests.unit.test_sandbox_state import SMALL, Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_state(clock: Clock, **switches: Any) -> SandboxState:
    return SandboxState(Catalogue.from_dict(SMALL), basket_ttl=60.0, max_items=6, clock=clock,
                        rng=random.Random(1), behaviour=Behaviour(**switches))


def refused(call: Callable[[], object]) -> tuple[int, str]:
    with pytest.raises(ApiError) as exc:
        call()
    return exc.value.status, exc.value.code


def basket(state: SandboxState, seats: tuple[int, ...] = (1, 2)) -> Order:
    order = state.create_order()
    state.add_seats(order, [(seat, 1, None) for seat in seats])
    state.set_buyer(order, {"email": "a@example.com"})
    return order


def pre_confirmed(state: SandboxState, seats: tuple[int, ...] = (1, 2)) -> Order:
    order = basket(state, seats)
    state.pre_confirm(order)
    return order


def code_of(order: Order) -> str | None:
    """The order's code now: read through a call, as mypy would otherwise keep an
    ``order.code is None`` narrowing past the calls that give it a new code."""
    return order.code


# -- Behaviour itself ------------------------------------------------------------------


def test_defaults_are_todays_choices() -> None:
    assert Behaviour() == DEFAULT
    assert DEFAULT.to_dict() == {
        "release_outside_basket": "to_basket", "orders_mgmt_read": "ok",
        "orders_mgmt_lag_ms": 0, "orders_mgmt_scope": "coded",
        "repeat_status_call": "refuse", "expired_orders": "gone",
        "refused_calls_touch": True, "reads_touch": False, "seats_auto_items": "per_place",
        "buyer_data": "replace", "empty_body": "as_object", "create_body": "checked",
        "check_order": "fields_first", "change_pre_confirmed": "refuse",
        "code_after_basket": "kept", "release_unknown_items": "refuse",
        "missing_rate_id": "first_rate", "seat_unavailable_status": 409,
        "repeat_refund": "conflict",
        "webhook_signature": "hmac-sha256",
    }
    assert SandboxOptions().behaviour == DEFAULT


def test_from_dict_validates_and_round_trips() -> None:
    changed = Behaviour.from_dict({"orders_mgmt_read": "403", "orders_mgmt_lag_ms": 250,
                                   "reads_touch": True, "seat_unavailable_status": 400})
    assert changed.orders_mgmt_read == "403"
    assert changed.orders_mgmt_lag_ms == 250
    assert changed.reads_touch is True
    assert changed.seat_unavailable_status == 400
    assert Behaviour.from_dict(json.loads(json.dumps(changed.to_dict()))) == changed


@pytest.mark.parametrize(
    "changes",
    [
        {"no_such_switch": 1},
        {"orders_mgmt_read": 401},  # the choices are strings
        {"orders_mgmt_read": "500"},
        {"orders_mgmt_read": 404},  # the choices are strings
        {"release_outside_basket": "ignore"},
        {"orders_mgmt_lag_ms": -1},
        {"orders_mgmt_lag_ms": 1.5},
        {"orders_mgmt_lag_ms": True},
        {"reads_touch": "yes"},
        {"reads_touch": 1},
        {"seat_unavailable_status": "400"},
        {"seat_unavailable_status": 418},
    ],
)
def test_bad_switches_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(BehaviourError):
        DEFAULT.replace(changes)


def test_command_line_assignments() -> None:
    behaviour = DEFAULT.with_assignments([
        "repeat_status_call=idempotent", "orders_mgmt_lag_ms=1500", "reads_touch=true",
        "refused_calls_touch=no", "seat_unavailable_status=400", "orders_mgmt_read=401"])
    assert behaviour == Behaviour(repeat_status_call="idempotent", orders_mgmt_lag_ms=1500,
                                  reads_touch=True, refused_calls_touch=False,
                                  seat_unavailable_status=400, orders_mgmt_read="401")


@pytest.mark.parametrize("text", ["reads_touch", "nope=1", "reads_touch=maybe",
                                  "orders_mgmt_lag_ms=-5", "buyer_data=append"])
def test_bad_command_line_assignments(text: str) -> None:
    with pytest.raises(BehaviourError):
        DEFAULT.with_assignments([text])


# -- fault plan: late, error_401, error_403 ---------------------------------------------


def test_new_outcomes_are_plan_keys_and_script_entries() -> None:
    plan = FaultPlan.from_dict({"endpoints": {"confirm": {
        "late": 0.2, "late_ms": 500, "error_401": 0.1, "error_403": 0.1,
        "script": ["late", "error_401", "error_403"]}}})
    faults = plan.endpoints["confirm"]
    assert (faults.late, faults.late_ms, faults.error_401, faults.error_403) == (
        0.2, 500.0, 0.1, 0.1)
    assert EndpointFaults().late_ms == 3000.0
    assert FaultPlan.from_dict(plan.to_dict()) == plan
    injector = FaultInjector(plan, seed=1)
    late = injector.decide("confirm")
    assert (late.outcome, late.late) == ("late", 0.5)
    assert [injector.decide("confirm").outcome for _ in range(2)] == ["error_401", "error_403"]
    assert injector.counts == {"confirm": {"late": 1, "error_401": 1, "error_403": 1}}


def test_new_outcomes_are_drawn_by_probability() -> None:
    for outcome in ("late", "error_401", "error_403"):
        injector = FaultInjector(FaultPlan.from_dict({"endpoints": {"create": {outcome: 1}}}))
        assert injector.decide("create").outcome == outcome


def test_probabilities_including_the_new_ones_add_up_to_at_most_one() -> None:
    with pytest.raises(FaultPlanError, match="add up"):
        FaultPlan.from_dict({"endpoints": {"create": {"late": 0.6, "error_403": 0.6}}})


# -- state switches ------------------------------------------------------------------------


def test_release_outside_basket_to_basket(clock: Clock) -> None:
    state = make_state(clock)
    order = pre_confirmed(state)
    state.release(order, [next(iter(order.items))])
    assert order.status == BASKET
    assert len(order.items) == 1


def test_release_outside_basket_refuse(clock: Clock) -> None:
    state = make_state(clock, release_outside_basket="refuse")
    order = pre_confirmed(state)
    assert refused(lambda: state.release(order, list(order.items))) == (400, "DIST0004")
    assert order.status == PRE_CONFIRM
    assert len(order.items) == 2
    assert state.inventory(1)["seats"]["1"] == "HELD"
    released = basket(state, (3,))  # a basket still releases
    state.release(released, list(released.items))
    assert state.inventory(1)["seats"]["3"] == "FREE"


def test_release_outside_basket_ignored(clock: Clock) -> None:
    # A release that answers 200 but does not take: a late confirm still buys the seats
    state = make_state(clock, release_outside_basket="ignored")
    order = pre_confirmed(state)
    state.release(order, list(order.items))
    assert order.status == PRE_CONFIRM
    assert len(order.items) == 2
    assert state.inventory(1)["seats"]["1"] == "HELD"
    state.confirm(order, "ref-1")
    assert state.inventory(1)["seats"]["1"] == "SOLD"
    released = basket(state, (3,))  # a basket still releases
    state.release(released, list(released.items))
    assert state.inventory(1)["seats"]["3"] == "FREE"


def test_repeat_status_call_refuse(clock: Clock) -> None:
    state = make_state(clock)
    order = pre_confirmed(state)
    assert refused(lambda: state.pre_confirm(order)) == (400, "DIST0004")
    state.confirm(order, "ref-1")
    assert refused(lambda: state.confirm(order, "ref-1")) == (400, "DIST0004")


def test_repeat_status_call_idempotent(clock: Clock) -> None:
    state = make_state(clock, repeat_status_call="idempotent")
    order = pre_confirmed(state)
    code = order.code
    state.pre_confirm(order, "EMAIL")
    assert (order.status, order.code, order.delivery_method) == (PRE_CONFIRM, code, None)
    state.confirm(order, "ref-1")
    state.confirm(order, "ref-2", [{"type": "CASH"}])
    assert order.status == CONFIRM
    assert order.external_code == "ref-1"
    assert order.payments is None
    audit = state.audit()
    assert audit["confirmed"] == {"ref-1": [code]}
    assert audit["seats_sold"] == {"1": 2}
    # Only the repeat is forgiven: confirming a basket is still refused.
    other = basket(state, (3,))
    assert refused(lambda: state.confirm(other)) == (400, "DIST0004")


def test_expired_orders_gone(clock: Clock) -> None:
    state = make_state(clock)
    order = pre_confirmed(state)
    clock.now += 61
    assert order.code is not None
    code = order.code
    assert refused(lambda: state.read_by_code(code)) == (404, "ORDER_NOT_FOUND")


def test_expired_orders_readable(clock: Clock) -> None:
    state = make_state(clock, expired_orders="readable")
    order = pre_confirmed(state)
    code = order.code
    assert code is not None
    clock.now += 61
    doc = state.read_by_code(code)
    assert doc["status"] == {"type": "EXPIRED", "expires_in": None}
    assert doc["id"] == order.id
    assert doc["code"] == code
    assert [item["state"] for item in doc["items"]] == ["RELEASED", "RELEASED"]
    assert doc["buyer_data"] == {"email": "a@example.com"}
    assert refused(lambda: state.order(order.id)) == (404, "ORDER_NOT_FOUND")
    assert state.inventory(1)["seats"]["1"] == "FREE"
    assert state.audit()["orders"] == {BASKET: 0, PRE_CONFIRM: 0, CONFIRM: 0}
    # A basket that never had a code is not readable by any code.
    state.create_order()
    clock.now += 61
    assert state.audit()["orders_expired"] == 2
    # Switched back, the expired order is gone again.
    state.behaviour = DEFAULT
    assert refused(lambda: state.read_by_code(code)) == (404, "ORDER_NOT_FOUND")


@pytest.mark.parametrize(("reads_touch", "alive"), [(False, False), (True, True)])
def test_reads_touch(clock: Clock, reads_touch: bool, alive: bool) -> None:
    state = make_state(clock, reads_touch=reads_touch)
    order = pre_confirmed(state)
    code = order.code
    assert code is not None
    clock.now += 40
    state.read_by_code(code)
    clock.now += 40  # 80 s after the last distribution call, 40 s after the read
    if alive:
        assert state.order(order.id) is order
    else:
        assert refused(lambda: state.read_by_code(code)) == (404, "ORDER_NOT_FOUND")


def test_seats_auto_items_per_place(clock: Clock) -> None:
    state = make_state(clock)
    order = state.create_order()
    state.add_seats_auto(order, 2, 20, 3)
    assert len(order.items) == 3
    assert all("quantity" not in item.doc for item in order.items.values())


def test_seats_auto_items_per_call_not_numbered(clock: Clock) -> None:
    state = make_state(clock, seats_auto_items="per_call")
    order = state.create_order()
    state.add_seats_auto(order, 2, 20, 3)
    [item] = order.items.values()
    assert item.doc["quantity"] == 3
    assert item.doc["price"] == 45.0
    assert state.render(order)["price"]["final"] == 45.0
    assert state.inventory(2)["capacity"]["20"] == {"total": 5, "free": 2, "held": 3, "sold": 0}
    state.add_seats_auto(order, 2, 20, 1)
    assert len(order.items) == 2
    state.set_buyer(order, {"email": "a@example.com"})
    state.pre_confirm(order)
    state.confirm(order)
    assert state.inventory(2)["capacity"]["20"] == {"total": 5, "free": 1, "held": 0, "sold": 4}
    assert state.audit()["seats_sold"] == {"2": 4}


def test_seats_auto_items_per_call_numbered(clock: Clock) -> None:
    state = make_state(clock, seats_auto_items="per_call")
    state.max_items = 1  # one item per call: the limit counts items, not places
    order = state.create_order()
    state.add_seats_auto(order, 1, 10, 3)
    [item] = order.items.values()
    assert item.doc["allocation"]["seat"]["id"] == 1
    seats = state.inventory(1)["seats"]
    assert [seats[str(seat)] for seat in (1, 2, 3, 4)] == ["HELD", "HELD", "HELD", "FREE"]
    state.release(order, [item.id])
    assert set(state.inventory(1)["seats"].values()) == {"FREE"}
    state.add_seats_auto(order, 1, 10, 2)
    state.set_buyer(order, {"email": "a@example.com"})
    state.pre_confirm(order)
    state.confirm(order)
    seats = state.inventory(1)["seats"]
    assert [seats[str(seat)] for seat in (1, 2, 3)] == ["SOLD", "SOLD", "FREE"]
    assert state.audit()["seats_sold_twice"] == 0


@pytest.mark.parametrize(("mode", "expected"), [
    ("replace", {"email": "b@example.com"}),
    ("merge", {"email": "b@example.com", "name": "Ann"}),
])
def test_buyer_data(clock: Clock, mode: str, expected: dict[str, str]) -> None:
    state = make_state(clock, buyer_data=mode)
    order = state.create_order()
    state.set_buyer(order, {"email": "a@example.com", "name": "Ann"})
    state.set_buyer(order, {"email": "b@example.com"})
    assert state.render(order)["buyer_data"] == expected


def test_change_pre_confirmed_refuse(clock: Clock) -> None:
    state = make_state(clock)
    order = pre_confirmed(state)
    assert refused(lambda: state.add_seats(order, [(3, 1, None)])) == (400, "DIST0004")
    assert refused(lambda: state.add_seats_auto(order, 2, 20, 1)) == (400, "DIST0004")
    assert refused(lambda: state.set_buyer(order, {"email": "b@x"})) == (400, "DIST0004")
    assert order.status == PRE_CONFIRM
    assert len(order.items) == 2


def test_change_pre_confirmed_to_basket(clock: Clock) -> None:
    state = make_state(clock, change_pre_confirmed="to_basket")
    order = pre_confirmed(state)
    code = order.code
    state.add_seats(order, [(3, 1, None)])
    assert (order.status, order.code, len(order.items)) == (BASKET, code, 3)
    state.pre_confirm(order)
    state.set_buyer(order, {"email": "b@example.com"})
    assert order.status == BASKET
    state.pre_confirm(order)
    # A refused change leaves the order as it was.
    assert refused(lambda: state.add_seats_auto(order, 1, 11, 3)) == (
        409, "ORDER_SEAT_NOT_AVAILABLE")
    assert order.status == PRE_CONFIRM
    state.confirm(order)
    assert refused(lambda: state.add_seats(order, [(4, 1, None)])) == (400, "DIST0004")


def test_code_after_basket_kept(clock: Clock) -> None:
    state = make_state(clock)
    order = pre_confirmed(state)
    code = order.code
    assert code is not None
    state.release(order, [next(iter(order.items))])
    assert state.read_by_code(code)["status"]["type"] == BASKET
    state.pre_confirm(order)
    assert order.code == code


def test_code_after_basket_new(clock: Clock) -> None:
    state = make_state(clock, code_after_basket="new")
    order = pre_confirmed(state)
    old = order.code
    assert old is not None
    state.release(order, [next(iter(order.items))])
    assert code_of(order) is None
    assert state.render(order)["code"] is None
    assert refused(lambda: state.read_by_code(old)) == (404, "ORDER_NOT_FOUND")
    state.pre_confirm(order)
    assert order.code is not None
    assert order.code != old
    assert state.read_by_code(order.code)["id"] == order.id


def test_release_unknown_items_refuse(clock: Clock) -> None:
    state = make_state(clock)
    order = basket(state)
    first = next(iter(order.items))
    assert refused(lambda: state.release(order, [first, 999])) == (400, "DIST0005")
    assert len(order.items) == 2


def test_release_unknown_items_ignore(clock: Clock) -> None:
    state = make_state(clock, release_unknown_items="ignore")
    order = pre_confirmed(state)
    first, second = list(order.items)
    state.release(order, [999])  # nothing of the order: nothing changes
    assert (order.status, len(order.items)) == (PRE_CONFIRM, 2)
    state.release(order, [first, 999])
    assert (order.status, list(order.items)) == (BASKET, [second])
    state.release(order, [first])  # a repeated release is harmless
    assert list(order.items) == [second]
    assert state.inventory(1)["seats"]["1"] == "FREE"


@pytest.mark.parametrize(("scope", "pre_confirm_readable"), [("coded", True),
                                                             ("confirmed", False)])
def test_orders_mgmt_scope(clock: Clock, scope: str, pre_confirm_readable: bool) -> None:
    state = make_state(clock, orders_mgmt_scope=scope)
    order = pre_confirmed(state)
    code = order.code
    assert code is not None
    if pre_confirm_readable:
        assert state.read_by_code(code)["status"]["type"] == PRE_CONFIRM
    else:
        assert refused(lambda: state.read_by_code(code)) == (404, "ORDER_NOT_FOUND")
    state.confirm(order)
    assert state.read_by_code(code)["status"]["type"] == CONFIRM


def test_orders_mgmt_without_lag_sees_changes_at_once(clock: Clock) -> None:
    state = make_state(clock)
    order = pre_confirmed(state)
    assert order.code is not None
    assert state.read_by_code(order.code)["status"]["type"] == PRE_CONFIRM
    state.confirm(order)
    assert state.read_by_code(order.code)["status"]["type"] == CONFIRM


def test_orders_mgmt_lag(clock: Clock) -> None:
    state = make_state(clock, orders_mgmt_lag_ms=2000)
    order = pre_confirmed(state)
    code = order.code
    assert code is not None
    assert refused(lambda: state.read_by_code(code)) == (404, "ORDER_NOT_FOUND")
    clock.now += 1.999
    assert refused(lambda: state.read_by_code(code)) == (404, "ORDER_NOT_FOUND")
    clock.now += 0.001
    assert state.read_by_code(code)["status"]["type"] == PRE_CONFIRM
    state.confirm(order, "ref")
    stale = state.read_by_code(code)
    assert stale["status"]["type"] == PRE_CONFIRM
    assert [item["state"] for item in stale["items"]] == ["RESERVED", "RESERVED"]
    assert stale["external_code"] is None
    clock.now += 1.5
    assert state.read_by_code(code)["status"]["type"] == PRE_CONFIRM
    clock.now += 0.5
    fresh = state.read_by_code(code)
    assert fresh["status"]["type"] == CONFIRM
    assert fresh["external_code"] == "ref"
    # The distribution API itself never lags.
    assert state.render(state.order(order.id))["status"]["type"] == CONFIRM


def test_orders_mgmt_lag_switched_on_later(clock: Clock) -> None:
    state = make_state(clock)
    order = pre_confirmed(state)
    code = order.code
    assert code is not None
    state.behaviour = Behaviour(orders_mgmt_lag_ms=1000)
    assert state.read_by_code(code)["status"]["type"] == PRE_CONFIRM  # already visible
    state.release(order, [next(iter(order.items))])
    assert state.read_by_code(code)["status"]["type"] == PRE_CONFIRM
    assert len(state.read_by_code(code)["items"]) == 2
    clock.now += 1
    assert state.read_by_code(code)["status"]["type"] == BASKET
    state.behaviour = DEFAULT
    state.pre_confirm(order)
    assert state.read_by_code(code)["status"]["type"] == PRE_CONFIRM


# -- the app: late calls land after the calls sent meanwhile ----------------------------


def request(method: str, path: str, body: Any = None, **headers: str) -> Request:
    raw = b"" if body is None else json.dumps(body).encode()
    all_headers = {"content-type": "application/json", **headers}
    return Request(method, path, "", all_headers, raw)


def answer(result: Response | Any) -> tuple[int, dict[str, Any]]:
    assert isinstance(result, Response)
    doc: dict[str, Any] = json.loads(result.body)
    return result.status, doc


def test_a_late_call_is_done_after_the_calls_sent_meanwhile() -> None:
    async def scenario() -> None:
        app = SandboxApp(SandboxOptions(seed=1))
        status, token = answer(app(Request(
            "POST", "/oauth/token", "", {"content-type": "application/x-www-form-urlencoded"},
            b"grant_type=client_credentials&channel_id=sandbox-channel"
            b"&client_id=seller-channel-client&client_secret=sandbox-api-key")))
        assert status == 200
        auth = f"Bearer {token['access_token']}"
        dist = "/distribution-api/v1/orders"
        _, order = answer(app(request("POST", dist, authorization=auth)))
        ids = {"authorization": auth, "ob-order-id": order["id"]}
        answer(app(request("POST", f"{dist}/seats-auto",
                           {"session_id": 1002, "price_type_id": 3, "quantity": 1}, **ids)))
        answer(app(request("POST", f"{dist}/buyer-data", {"email": "a@b.c"}, **ids)))
        _, pre = answer(app(request("POST", f"{dist}/pre-confirm", {}, **ids)))
        app.faults = FaultInjector(FaultPlan.from_dict(
            {"endpoints": {"confirm": {"script": ["late"], "late_ms": 10}}}))

        late = app(request("POST", f"{dist}/confirm", {"external_code": "late"}, **ids))
        assert not isinstance(late, Response)  # it is waiting
        # Meanwhile (the event loop has not run it yet) the retry arrives and is done.
        status, retried = answer(app(request("POST", f"{dist}/confirm",
                                             {"external_code": "retry"}, **ids)))
        assert (status, retried["status"]["type"]) == (200, CONFIRM)
        status, late_answer = answer(await late)
        assert (status, late_answer["code"]) == (400, "DIST0004")  # it landed second
        audit = app.state.audit()
        assert audit["confirmed"] == {"retry": [pre["code"]]}
        assert app.faults.counts == {"confirm": {"late": 1}}

    asyncio.run(scenario())
