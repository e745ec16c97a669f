"""The sandbox's order and inventory rules, without HTTP and with a fake clock."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from fulfilment.sandbox.catalogue import Catalogue, CatalogueError
from fulfilment.sandbox.faults import FaultInjector, FaultPlan, FaultPlanError
from fulfilment.sandbox.state import (
    BASKET,
    CONFIRM,
    PRE_CONFIRM,
    ApiError,
    Order,
    SandboxState,
)

SMALL = {
    "venues": [{"id": 1, "name": "Hall", "city": "Madrid", "time_zone": "Europe/Madrid"}],
    "sessions": [
        {
            "id": 1, "name": "Numbered", "venue_id": 1,
            "start": "2026-01-01T20:00:00Z", "end": "2026-01-01T22:00:00Z",
            "rates": [{"id": 1, "name": "General"}, {"id": 2, "name": "Reduced"}],
            "price_types": [{"id": 10, "name": "Stalls", "prices": {"1": 40.0, "2": 25.0}},
                            {"id": 11, "name": "Box", "prices": {"1": 90.0}}],
            "sectors": [{"id": 1, "name": "Stalls", "price_type_id": 10, "rows": 2,
                         "seats_per_row": 3},
                        {"id": 2, "name": "Box", "price_type_id": 11, "rows": 1,
                         "seats_per_row": 2}],
        },
        {
            "id": 2, "name": "Standing", "venue_id": 1,
            "start": "2026-01-02T20:00:00Z", "end": "2026-01-02T22:00:00Z",
            "price_types": [{"id": 20, "name": "Floor", "prices": {"1": 15.0}}],
            "capacity": {"20": 5},
        },
    ],
}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(clock: Clock) -> SandboxState:
    return SandboxState(Catalogue.from_dict(SMALL), basket_ttl=60.0, max_items=6, clock=clock,
                        rng=random.Random(1))


def error_code(exc: pytest.ExceptionInfo[ApiError]) -> tuple[int, str]:
    return exc.value.status, exc.value.code


def assert_gone(state: SandboxState, order: Order) -> None:
    with pytest.raises(ApiError) as exc:
        state.order(order.id)
    assert error_code(exc) == (404, "ORDER_NOT_FOUND")


def ready_to_confirm(state: SandboxState, seats: list[int]) -> Order:
    order = state.create_order()
    state.add_seats(order, [(seat, 1, None) for seat in seats])
    state.set_buyer(order, {"email": "a@example.com"})
    state.pre_confirm(order)
    return order


# -- catalogue -----------------------------------------------------------------------


def test_catalogue_expands_sectors_into_numbered_seats() -> None:
    session = Catalogue.from_dict(SMALL).sessions[1]
    assert list(session.seats) == [1, 2, 3, 4, 5, 6, 7, 8]
    seat5 = session.seats[5]
    assert seat5.price_type_id == 10
    assert seat5.allocation["row"] == {"id": 2, "name": "2"}
    assert seat5.allocation["seat"] == {"id": 5, "name": "2"}
    assert session.seats[7].allocation["sector"] == {"id": 2, "name": "Box"}
    assert session.seats_by_price_type == {10: (1, 2, 3, 4, 5, 6), 11: (7, 8)}


def test_default_catalogue_has_the_benchmark_sessions() -> None:
    sessions = Catalogue.default().sessions
    assert len(sessions[1001].seats) == 5000
    assert len(sessions[1001].price_types) == 2
    assert all(places >= 100_000 for places in sessions[1002].capacity.values())
    assert len(sessions[1003].seats) + sum(sessions[1003].capacity.values()) < 10


def test_catalogue_rejects_an_unknown_price_type() -> None:
    bad = {"venues": SMALL["venues"], "sessions": [dict(SMALL["sessions"][1],
                                                         capacity={"99": 1})]}
    with pytest.raises(CatalogueError, match="unknown price type 99"):
        Catalogue.from_dict(bad)


# -- the flow --------------------------------------------------------------------------


def test_full_flow_numbered(state: SandboxState) -> None:
    order = state.create_order()
    assert len(order.id) == 32
    assert int(order.id, 16) >= 0
    state.add_seats(order, [(2, 1, None), (3, 1, 2)])
    state.set_buyer(order, {"email": "a@example.com"})
    state.pre_confirm(order)
    assert order.status == PRE_CONFIRM
    code = order.code
    assert code is not None
    assert len(code) == 12
    assert code == code.upper()
    assert code.isalnum()
    state.confirm(order, external_code="intent-1")

    doc = state.render(order)
    assert doc["status"] == {"type": CONFIRM, "expires_in": None}
    assert doc["code"] == code
    assert doc["external_code"] == "intent-1"
    assert [item["state"] for item in doc["items"]] == ["SOLD", "SOLD"]
    assert [item["price"] for item in doc["items"]] == [40.0, 25.0]
    assert doc["items"][1]["rate"] == {"id": 2, "name": "Reduced"}
    assert doc["price"]["final"] == 65.0
    assert state.inventory(1)["seats"]["2"] == "SOLD"
    assert state.order_by_code(code) is order


def test_render_basket_reports_expiry(state: SandboxState, clock: Clock) -> None:
    order = state.create_order()
    clock.now += 20.5
    doc = state.render(order)
    assert doc["status"]["type"] == BASKET
    assert doc["status"]["expires_in"]["value"] == 40
    assert doc["status"]["expires_in"]["time_unit"] == "SECONDS"
    assert doc["code"] is None
    assert doc["price"]["base"] == 0.0


def test_seats_auto_takes_capacity_first(state: SandboxState) -> None:
    order = state.create_order()
    state.add_seats_auto(order, 2, 20, 3)
    assert [item.seat_id for item in order.items.values()] == [None, None, None]
    assert order.items[1].doc["allocation"]["type"] == "NOT_NUMBERED"
    assert state.inventory(2)["capacity"]["20"] == {"total": 5, "free": 2, "held": 3, "sold": 0}


def test_seats_auto_takes_lowest_free_numbered_seats(state: SandboxState) -> None:
    other = state.create_order()
    state.add_seats(other, [(1, 1, None), (3, 1, None)])
    order = state.create_order()
    state.add_seats_auto(order, 1, 10, 3)
    assert sorted(item.seat_id or 0 for item in order.items.values()) == [2, 4, 5]


def test_seats_auto_is_all_or_none(state: SandboxState) -> None:
    order = state.create_order()
    with pytest.raises(ApiError) as exc:
        state.add_seats_auto(order, 1, 11, 3)  # the box has two seats
    assert error_code(exc) == (409, "ORDER_SEAT_NOT_AVAILABLE")
    assert not order.items
    assert state.inventory(1)["seats"]["7"] == "FREE"
    with pytest.raises(ApiError) as exc:
        state.add_seats_auto(order, 2, 20, 6)
    assert error_code(exc) == (409, "ORDER_SEAT_NOT_AVAILABLE")
    assert state.inventory(2)["capacity"]["20"]["held"] == 0


def test_released_seat_goes_back_to_seats_auto(state: SandboxState) -> None:
    first = state.create_order()
    state.add_seats_auto(first, 1, 11, 2)
    second = state.create_order()
    with pytest.raises(ApiError):
        state.add_seats_auto(second, 1, 11, 1)
    state.release(first, [next(iter(first.items))])
    state.add_seats_auto(second, 1, 11, 1)
    assert [item.seat_id for item in second.items.values()] == [7]


def test_a_held_seat_is_unavailable_to_other_baskets(state: SandboxState) -> None:
    first, second = state.create_order(), state.create_order()
    state.add_seats(first, [(4, 1, None)])
    with pytest.raises(ApiError) as exc:
        state.add_seats(second, [(5, 1, None), (4, 1, None)])
    assert error_code(exc) == (409, "ORDER_SEAT_NOT_AVAILABLE")
    assert not second.items
    assert state.inventory(1)["seats"]["5"] == "FREE"


def test_a_sold_seat_stays_unavailable(state: SandboxState) -> None:
    ready = ready_to_confirm(state, [6])
    state.confirm(ready)
    order = state.create_order()
    with pytest.raises(ApiError) as exc:
        state.add_seats(order, [(6, 1, None)])
    assert error_code(exc) == (409, "ORDER_SEAT_NOT_AVAILABLE")


@pytest.mark.parametrize(
    ("seats", "expected"),
    [
        ([(99, 1, None)], (409, "ORDER_SEAT_NOT_AVAILABLE")),
        ([(1, 77, None)], (404, "SESSION_NOT_FOUND")),
        ([(1, 1, 9)], (400, "DIST0005")),
        ([(1, 1, None), (1, 1, None)], (400, "DIST0005")),
        ([(n, 1, None) for n in range(1, 8)], (400, "ORDER_ITEMS_LIMIT_EXCEEDED")),
        ([], (400, "DIST0005")),
    ],
)
def test_add_seats_refusals(state: SandboxState, seats: list[tuple[int, int, int | None]],
                            expected: tuple[int, str]) -> None:
    order = state.create_order()
    with pytest.raises(ApiError) as exc:
        state.add_seats(order, seats)
    assert error_code(exc) == expected
    assert not order.items


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1, 10, 0), (400, "DIST0005")),
        ((1, 99, 1), (400, "DIST0005")),
        ((77, 10, 1), (404, "SESSION_NOT_FOUND")),
        ((2, 20, 7), (400, "ORDER_ITEMS_LIMIT_EXCEEDED")),
    ],
)
def test_seats_auto_refusals(state: SandboxState, args: tuple[int, int, int],
                             expected: tuple[int, str]) -> None:
    order = state.create_order()
    with pytest.raises(ApiError) as exc:
        state.add_seats_auto(order, *args)
    assert error_code(exc) == expected


def test_pre_confirm_needs_items_and_buyer(state: SandboxState) -> None:
    order = state.create_order()
    with pytest.raises(ApiError) as exc:
        state.pre_confirm(order)
    assert error_code(exc) == (400, "PARAMETER_REQUIRED")
    state.add_seats(order, [(1, 1, None)])
    with pytest.raises(ApiError) as exc:
        state.pre_confirm(order)
    assert error_code(exc) == (400, "PARAMETER_REQUIRED")
    assert order.status == BASKET


def test_status_rules(state: SandboxState) -> None:
    order = state.create_order()
    with pytest.raises(ApiError) as exc:
        state.confirm(order)
    assert error_code(exc) == (400, "DIST0004")
    order = ready_to_confirm(state, [1])
    on_pre_confirm: list[Callable[[], None]] = [
        lambda: state.add_seats(order, [(2, 1, None)]),
        lambda: state.set_buyer(order, {"email": "b@example.com"}),
        lambda: state.pre_confirm(order),
    ]
    for refused in on_pre_confirm:
        with pytest.raises(ApiError) as exc:
            refused()
        assert error_code(exc) == (400, "DIST0004")
    state.confirm(order)
    on_confirm: list[Callable[[], None]] = [
        lambda: state.confirm(order),
        lambda: state.release(order, list(order.items)),
    ]
    for refused in on_confirm:
        with pytest.raises(ApiError) as exc:
            refused()
        assert error_code(exc) == (400, "DIST0004")


def test_release_moves_pre_confirm_back_to_basket_keeping_the_code(
        state: SandboxState) -> None:
    order = ready_to_confirm(state, [1, 2])
    code = order.code
    first = next(iter(order.items))
    state.release(order, [first])
    assert order.status == BASKET
    assert order.code == code
    assert state.inventory(1)["seats"]["1"] == "FREE"
    state.pre_confirm(order)
    assert order.code == code


def test_release_of_unknown_items_releases_nothing(state: SandboxState) -> None:
    order = state.create_order()
    state.add_seats(order, [(1, 1, None)])
    with pytest.raises(ApiError) as exc:
        state.release(order, [1, 999])
    assert error_code(exc) == (400, "DIST0005")
    assert list(order.items) == [1]


# -- expiry ------------------------------------------------------------------------------


def test_basket_expires_and_frees_its_seats(state: SandboxState, clock: Clock) -> None:
    order = state.create_order()
    state.add_seats(order, [(1, 1, None)])
    state.add_seats_auto(order, 2, 20, 2)
    clock.now += 59.9
    assert state.inventory(1)["seats"]["1"] == "HELD"
    clock.now += 0.2
    assert state.inventory(1)["seats"]["1"] == "FREE"
    assert state.inventory(2)["capacity"]["20"]["held"] == 0
    with pytest.raises(ApiError) as exc:
        state.order(order.id)
    assert error_code(exc) == (404, "ORDER_NOT_FOUND")
    assert state.audit()["orders_expired"] == 1


def test_a_touch_restarts_the_expiry(state: SandboxState, clock: Clock) -> None:
    old, touched = state.create_order(), state.create_order()
    clock.now += 50
    state.order(touched.id)
    clock.now += 20
    assert_gone(state, old)
    assert state.order(touched.id) is touched


def test_pre_confirm_expires_and_its_code_is_gone(state: SandboxState, clock: Clock) -> None:
    order = ready_to_confirm(state, [3])
    assert order.code is not None
    clock.now += 61
    with pytest.raises(ApiError) as exc:
        state.order_by_code(order.code)
    assert error_code(exc) == (404, "ORDER_NOT_FOUND")
    assert state.inventory(1)["seats"]["3"] == "FREE"


def test_confirmed_orders_never_expire(state: SandboxState, clock: Clock) -> None:
    order = ready_to_confirm(state, [3])
    state.confirm(order)
    clock.now += 10_000
    assert state.order(order.id) is order
    assert state.inventory(1)["seats"]["3"] == "SOLD"


def test_a_shorter_ttl_applies_to_open_baskets(state: SandboxState, clock: Clock) -> None:
    order = state.create_order()
    clock.now += 10
    state.basket_ttl = 5
    assert state.audit()["orders"][BASKET] == 0
    assert_gone(state, order)


def test_reading_by_code_does_not_touch(state: SandboxState, clock: Clock) -> None:
    order = ready_to_confirm(state, [4])
    assert order.code is not None
    clock.now += 40
    state.order_by_code(order.code)
    clock.now += 30
    assert_gone(state, order)


# -- audit -------------------------------------------------------------------------------


def test_audit_counts_confirmations_and_duplicates(state: SandboxState) -> None:
    codes = []
    for seat in (1, 2):
        order = ready_to_confirm(state, [seat])
        state.confirm(order, external_code="intent-7")
        codes.append(order.code)
    state.confirm(ready_to_confirm(state, [3]))
    state.create_order()
    ready_to_confirm(state, [4])

    audit = state.audit()
    assert audit["orders"] == {BASKET: 1, PRE_CONFIRM: 1, CONFIRM: 3}
    assert audit["confirmed"] == {"intent-7": codes}
    assert audit["duplicates"] == {"intent-7": 2}
    assert audit["confirmed_without_external_code"] == 1
    assert audit["seats_sold"] == {"1": 3}
    assert audit["seats_sold_twice"] == 0


def test_reset_forgets_orders_and_sales(state: SandboxState) -> None:
    state.confirm(ready_to_confirm(state, [1]), external_code="x")
    state.reset()
    assert state.audit()["orders"] == {BASKET: 0, PRE_CONFIRM: 0, CONFIRM: 0}
    assert state.inventory(1)["seats"]["1"] == "FREE"


# -- fault plan --------------------------------------------------------------------------


def test_fault_script_runs_before_probabilities() -> None:
    plan = FaultPlan.from_dict({"endpoints": {
        "confirm": {"script": ["error_503", "ok", "lost_response"], "error_500": 1.0}}})
    injector = FaultInjector(plan, seed=3)
    outcomes = [injector.decide("confirm").outcome for _ in range(4)]
    assert outcomes == ["error_503", "ok", "lost_response", "error_500"]
    assert injector.decide("create").outcome == "ok"
    assert injector.counts == {"confirm": {"error_503": 1, "lost_response": 1, "error_500": 1}}


def test_star_entry_applies_to_endpoints_without_their_own() -> None:
    plan = FaultPlan.from_dict({"endpoints": {"*": {"error_500": 1.0},
                                              "confirm": {"latency_ms": 5}}})
    injector = FaultInjector(plan)
    assert injector.decide("create").outcome == "error_500"
    decision = injector.decide("confirm")
    assert (decision.outcome, decision.latency) == ("ok", 0.005)


def test_seeded_probabilities_repeat() -> None:
    plan = FaultPlan.from_dict({"seed": 11, "endpoints": {
        "*": {"error_500": 0.3, "throttle_429": 0.3}}})
    first, second = FaultInjector(plan), FaultInjector(plan)
    sequence = [first.decide("seats").outcome for _ in range(50)]
    assert sequence == [second.decide("seats").outcome for _ in range(50)]
    assert {"ok", "error_500", "throttle_429"} <= set(sequence)


def test_rate_limit_token_bucket() -> None:
    now = [0.0]
    plan = FaultPlan.from_dict({"rate_limit": {"per_second": 2, "burst": 3,
                                               "retry_after": 0.5}})
    injector = FaultInjector(plan, clock=lambda: now[0])
    outcomes = [injector.decide("create").outcome for _ in range(4)]
    assert outcomes == ["ok", "ok", "ok", "rate_limit"]
    assert injector.decide("create").retry_after == 0.5
    now[0] += 0.5  # one token back
    assert [injector.decide("create").outcome for _ in range(2)] == ["ok", "rate_limit"]


@pytest.mark.parametrize(
    "plan",
    [
        {"endpoints": {"nope": {}}},
        {"endpoints": {"confirm": {"error_500": 1.5}}},
        {"endpoints": {"confirm": {"error_500": 0.6, "error_503": 0.6}}},
        {"endpoints": {"confirm": {"script": ["explode"]}}},
        {"endpoints": {"confirm": {"latency": 5}}},
        {"rate_limit": {"per_second": 0}},
        {"surprise": 1},
    ],
)
def test_malformed_fault_plans_are_refused(plan: dict[str, object]) -> None:
    with pytest.raises(FaultPlanError):
        FaultPlan.from_dict(plan)


def test_fault_plan_round_trips() -> None:
    plan = FaultPlan.from_dict({"seed": 7, "endpoints": {"*": {"latency_ms": 5},
                                                         "confirm": {"script": ["ok"]}},
                                "rate_limit": {"per_second": 500, "burst": 50}})
    assert FaultPlan.from_dict(plan.to_dict()) == plan
