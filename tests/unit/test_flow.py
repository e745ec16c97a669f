"""The purchase flow as plain functions: fakeredis ledger, a scripted Onebox, no worker."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kombu import Connection

from fulfilment.config import Settings
from fulfilment.errors import (
    FulfilmentError,
    OutcomeUnknownError,
    PermanentError,
    TransientError,
)
from fulfilment.flow import Proceed, RetryIn, Services, Stage, UnknownIntentError, advance
from fulfilment.keys import Keys
from fulfilment.lease import Leases
from fulfilment.ledger import Admission, Ledger
from fulfilment.onebox.auth import AuthRefusedError
from fulfilment.onebox.guard import announce
from fulfilment.results import ResultPublisher, consume_results
from fulfilment.retry import RetryPolicy
from fulfilment.topology import Topology
from schemas.intent import AutoItem, Buyer, SeatRef, load_intent
from schemas.onebox import Order, OrderItem
from schemas.result import OrderResult
from tests.conftest import LedgerStore

NOW = 1_800_000_000.0


@dataclass
class FakeOnebox:
    """Onebox as the flow sees it: orders in memory, and a script of failures per step."""

    orders: dict[str, Order] = field(default_factory=dict)
    failures: dict[str, list[FulfilmentError]] = field(default_factory=dict)
    #: Steps whose call is done by the server although the client then raises.
    done_then_raise: dict[str, list[FulfilmentError]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    confirms: dict[str, int] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)
    next_item: int = 1
    #: Onebox refusing to release seats outside BASKET (one of its possible answers).
    refuse_release: bool = False
    #: Onebox answering a release outside BASKET with the order as it was (one of its
    #: possible answers: the sandbox's ``release_outside_basket=ignored``).
    ignore_release: bool = False
    #: Reads by code that still show a confirmed order as pre-confirmed (a lagging read).
    stale_reads: int = 0

    def _step(self, step: str, action: Callable[[], Order]) -> Order:
        announce(step)  # as the real client's calls do, through ``guarded``
        return self._act(step, action)

    def _act(self, step: str, action: Callable[[], Order]) -> Order:
        self.calls.append(step)
        if self.failures.get(step):
            raise self.failures[step].pop(0)
        order = action()
        if self.done_then_raise.get(step):
            raise self.done_then_raise[step].pop(0)
        return order

    def _update(self, order_id: str, **changes: Any) -> Order:
        if order_id not in self.orders:
            raise PermanentError("no such order", code="ORDER_NOT_FOUND", status=404)
        order = replace(self.orders[order_id], **changes)
        self.orders[order_id] = order
        return order

    def _items(self, order_id: str, count: int) -> tuple[OrderItem, ...]:
        if order_id not in self.orders:
            raise PermanentError("no such order", code="ORDER_NOT_FOUND", status=404)
        items = tuple(OrderItem(id=self.next_item + i) for i in range(count))
        self.next_item += count
        return self.orders[order_id].items + items

    def create_order(self) -> Order:
        def act() -> Order:
            order_id = f"{len(self.orders) + 1:032x}"
            self.orders[order_id] = Order(id=order_id, status="BASKET",
                                          expires_at=datetime.fromtimestamp(NOW + 600, UTC))
            return self.orders[order_id]
        return self._step("create", act)

    def add_seats(self, order_id: str, seats: Sequence[SeatRef]) -> Order:
        return self._step("seats", lambda: self._update(order_id,
                                                        items=self._items(order_id, len(seats))))

    def add_seats_auto(self, order_id: str, item: AutoItem) -> Order:
        return self._step("seats_auto", lambda: self._update(
            order_id, items=self._items(order_id, item.quantity)))

    def set_buyer(self, order_id: str, buyer: Buyer) -> Order:
        return self._step("buyer_data", lambda: self._update(order_id))

    def pre_confirm(self, order_id: str, delivery_method: str | None = None) -> Order:
        return self._step("pre_confirm", lambda: self._update(
            order_id, status="PRE_CONFIRM", code=f"CODE{order_id[-6:]}"))

    def confirm(self, order_id: str, external_code: str, payments: Any = None) -> Order:
        def act() -> Order:
            if order_id not in self.orders:
                raise PermanentError("no such order", code="ORDER_NOT_FOUND", status=404,
                                     step="confirm")
            if self.orders[order_id].status != "PRE_CONFIRM":
                raise PermanentError("not pre-confirmed", code="DIST0004", status=400,
                                     step="confirm")
            self.confirms[external_code] = self.confirms.get(external_code, 0) + 1
            return self._update(order_id, status="CONFIRM", external_code=external_code)
        return self._step("confirm", act)

    def release_seats(self, order_id: str, item_ids: Sequence[int]) -> Order:
        def act() -> Order:
            if order_id not in self.orders:
                raise PermanentError("no such order", code="ORDER_NOT_FOUND", status=404)
            if self.orders[order_id].status == "CONFIRM" or self.refuse_release:
                raise PermanentError("not in basket", code="DIST0004", status=400,
                                     step="release")
            if self.ignore_release and self.orders[order_id].status != "BASKET":
                return self.orders[order_id]
            held = {item.id for item in self.orders[order_id].items}
            if set(item_ids) - held:
                raise PermanentError("items not in the order", code="DIST0005", status=400,
                                     step="release")
            self.released.extend(item_ids)
            keep = tuple(i for i in self.orders[order_id].items if i.id not in item_ids)
            return self._update(order_id, items=keep, status="BASKET")
        return self._step("release", act)

    def get_order(self, code: str) -> Order:
        def act() -> Order:
            for order in self.orders.values():
                if order.code == code:
                    if self.stale_reads and order.status == "CONFIRM":
                        self.stale_reads -= 1
                        return replace(order, status="PRE_CONFIRM")
                    return order
            raise PermanentError("no such order", code="ORDER_NOT_FOUND", status=404,
                                 step="get_order")
        return self._step("get_order", act)


@dataclass
class World:
    services: Services
    onebox: FakeOnebox
    connection: Connection
    clock: list[float]

    def submit(self, reference: str = "ref-1", **overrides: Any) -> str:
        document = {"reference": reference,
                    "items": [{"seats": [{"id": 1, "session_id": 10}]},
                              {"session_id": 20, "price_type_id": 3, "quantity": 2}],
                    "buyer": {"email": "a@example.com"}, **overrides}
        assert self.services.ledger.admit(load_intent(document)) is Admission.NEW
        return reference

    def run(self, reference: str, target: Stage = Stage.PUBLISHED, attempt: int = 1) -> Any:
        return advance(self.services, reference, target, attempt)

    def results(self) -> list[OrderResult]:
        topology = Topology.for_keys(self.services.ledger._keys)
        return list(consume_results(self.connection, topology, timeout=0.01, idle_timeout=0.05))


@pytest.fixture
def world(ledger_store: LedgerStore) -> Iterator[World]:
    # The memory transport is shared by the whole process: a prefix per test.
    prefix = ledger_store.prefix
    settings = Settings.defaults().with_overrides(key_prefix=prefix)
    client = ledger_store.client  # fakeredis, and a real Redis: the ledger's Lua is Redis's
    clock = [NOW]
    onebox = FakeOnebox()
    with Connection("memory://localhost/", transport_options={"polling_interval": 0.01}) as conn:
        yield World(flow_services(settings, client, onebox, conn, clock), onebox, conn, clock)


def flow_services(settings: Settings, client: Any, onebox: FakeOnebox, conn: Connection,
                  clock: list[float]) -> Services:
    """The flow's collaborators around a stand-in Onebox, on a clock moved by hand."""
    keys = Keys(settings.key_prefix)
    return Services(
        settings=settings, client=onebox,  # type: ignore[arg-type]
        ledger=Ledger(client, keys, 3600, clock=lambda: clock[0]),
        publisher=ResultPublisher(conn, Topology.for_keys(keys)),
        leases=Leases(client, keys, 60),
        policy=RetryPolicy(max_attempts=5, base=1.0, cap=8.0, deadline=900, jitter=False),
        clock=lambda: clock[0],
    )


def test_a_purchase_goes_through_and_publishes_one_confirmed_result(world: World) -> None:
    reference = world.submit()
    assert isinstance(world.run(reference), Proceed)
    assert world.onebox.calls == ["create", "seats", "seats_auto", "buyer_data", "pre_confirm",
                                  "confirm"]
    [result] = world.results()
    assert result.status == "confirmed" and result.order_code
    entry = world.services.ledger.get(reference)
    assert entry is not None and entry.published
    assert world.services.ledger.open_count() == 0


def test_running_a_stage_again_does_nothing_twice(world: World) -> None:
    reference = world.submit()
    world.run(reference, Stage.BASKET)
    world.run(reference, Stage.BASKET)
    world.run(reference, Stage.PRE_CONFIRMED)
    world.run(reference, Stage.FINISHED)
    world.run(reference, Stage.FINISHED)
    world.run(reference, Stage.PUBLISHED)
    world.run(reference, Stage.PUBLISHED)
    assert world.onebox.calls.count("create") == 1
    assert world.onebox.calls.count("confirm") == 1
    assert len(world.results()) == 1


def test_transient_error_retries_from_the_item_it_stopped_on(world: World) -> None:
    reference = world.submit()
    world.onebox.failures["seats_auto"] = [TransientError("503", status=503, retry_after=4.0)]
    decision = world.run(reference, Stage.BASKET)
    assert decision == RetryIn(4.0, "TRANSIENT")
    world.run(reference, Stage.BASKET, attempt=2)
    assert world.onebox.calls == ["create", "seats", "seats_auto", "seats_auto", "buyer_data"]


def test_backoff_doubles_and_gives_up_with_a_failed_result(world: World) -> None:
    reference = world.submit()
    delays = []
    for attempt in range(1, 6):
        world.onebox.failures["create"] = [TransientError("down", code="CONNECT_FAILED")]
        decision = world.run(reference, attempt=attempt)
        if isinstance(decision, RetryIn):
            delays.append(decision.delay)
    assert delays == [1.0, 2.0, 4.0, 8.0]
    [result] = world.results()
    assert result.status == "failed" and result.error is not None
    assert result.error.code == "CONNECT_FAILED" and result.error.retryable


def test_permanent_error_releases_seats_and_fails_without_retry(world: World) -> None:
    reference = world.submit()
    world.onebox.failures["seats_auto"] = [PermanentError("taken",
                                                          code="ORDER_SEAT_NOT_AVAILABLE")]
    assert isinstance(world.run(reference), Proceed)
    assert world.onebox.released == [1]  # the numbered seat already in the basket
    [result] = world.results()
    assert result.error is not None and result.error.code == "ORDER_SEAT_NOT_AVAILABLE"
    assert "confirm" not in world.onebox.calls


def test_unknown_basket_call_lists_and_releases_the_basket_then_starts_anew(world: World) -> None:
    reference = world.submit()
    world.onebox.done_then_raise["seats_auto"] = [
        OutcomeUnknownError("lost", code="CONNECTION_LOST", step="seats_auto")]
    decision = world.run(reference)
    assert isinstance(decision, RetryIn)
    assert sorted(world.onebox.released) == [1, 2, 3]  # the unknown call's seats too
    world.run(reference, attempt=2)
    assert world.onebox.calls.count("create") == 2
    assert world.results()[0].status == "confirmed"


def test_unknown_basket_call_of_unknown_content_waits_for_the_basket_to_expire(
        world: World) -> None:
    reference = world.submit()
    world.onebox.done_then_raise["seats"] = [OutcomeUnknownError("lost", step="seats")]
    world.onebox.failures["buyer_data"] = [OutcomeUnknownError("lost again")]
    world.run(reference)
    # The new basket finds the seat held (by our own abandoned basket, for all we know)
    world.onebox.failures["seats"] = [PermanentError("held", code="ORDER_SEAT_NOT_AVAILABLE")]
    decision = world.run(reference, attempt=2)
    assert isinstance(decision, RetryIn) and decision.delay == 8.0  # capped
    world.clock[0] += 602
    world.run(reference, attempt=3)
    assert world.results()[0].status == "confirmed"


def test_interrupted_seats_call_is_treated_as_unknown(world: World) -> None:
    reference = world.submit()
    world.run(reference, Stage.BASKET)
    # A worker died between sending a seats call and recording its answer
    world.services.ledger.record(reference, pending="seats", items_done=1)
    decision = world.run(reference, Stage.BASKET)
    assert isinstance(decision, RetryIn)
    entry = world.services.ledger.get(reference)
    assert entry is not None and entry.order_id is None and entry.pending is None


def test_lost_confirm_is_settled_by_reading_the_order(world: World) -> None:
    reference = world.submit()
    world.onebox.done_then_raise["confirm"] = [OutcomeUnknownError("lost", step="confirm")]
    assert isinstance(world.run(reference), RetryIn)
    world.run(reference, attempt=2)
    assert world.onebox.confirms == {reference: 1}
    assert world.onebox.calls[-1] == "get_order"
    assert world.onebox.calls.count("confirm") == 1  # read back, never sent blindly again
    assert world.results()[0].status == "confirmed"


def test_confirm_that_never_happened_is_sent_again_after_reading(world: World) -> None:
    reference = world.submit()
    world.onebox.failures["confirm"] = [OutcomeUnknownError("timeout", step="confirm")]
    world.run(reference)
    world.run(reference, attempt=2)
    assert world.onebox.calls[-2:] == ["get_order", "confirm"]
    assert world.onebox.confirms == {reference: 1}


def test_never_failed_while_a_confirm_may_have_happened(world: World) -> None:
    reference = world.submit()
    world.onebox.done_then_raise["confirm"] = [OutcomeUnknownError("lost", step="confirm")]
    world.run(reference)
    # Onebox is unreachable now: running out of attempts must not say "failed"
    world.onebox.failures["get_order"] = [TransientError("down")] * 20
    reasons = [world.run(reference) for _ in range(5)]
    assert all(isinstance(r, RetryIn) for r in reasons)
    assert reasons[-1].reason == "CONFIRM_UNSETTLED"
    world.onebox.failures["get_order"].clear()
    world.run(reference)
    assert world.results()[0].status == "confirmed"
    assert world.onebox.confirms == {reference: 1}


def test_waiting_for_a_lease_does_not_use_up_attempts(world: World) -> None:
    reference = world.submit()
    lease = world.services.leases.take(reference)
    assert lease is not None
    for _ in range(10):
        assert isinstance(world.run(reference), RetryIn)
    lease.release()
    world.onebox.failures["create"] = [TransientError("blip")]
    assert isinstance(world.run(reference), RetryIn)  # the first failure, not the eleventh
    assert isinstance(world.run(reference), Proceed)
    assert world.results()[0].status == "confirmed"


def test_expired_basket_starts_a_new_one(world: World) -> None:
    reference = world.submit()
    world.run(reference, Stage.BASKET)
    world.onebox.orders.clear()  # the basket expired at Onebox
    assert isinstance(world.run(reference, Stage.PRE_CONFIRMED), RetryIn)
    world.run(reference, attempt=2)
    assert world.onebox.calls.count("create") == 2
    assert world.results()[0].status == "confirmed"


def test_deadline_bounds_retries_in_time(world: World) -> None:
    reference = world.submit()
    world.clock[0] += 899  # submitted long ago
    world.onebox.failures["create"] = [TransientError("busy", retry_after=5.0)]
    assert isinstance(world.run(reference), Proceed)
    assert world.results()[0].status == "failed"


def test_a_held_lease_makes_the_second_worker_wait(world: World) -> None:
    reference = world.submit()
    lease = world.services.leases.take(reference)
    assert lease is not None
    assert world.run(reference) == RetryIn(1.0, "another worker holds this intent")
    assert world.onebox.calls == []
    lease.release()
    assert isinstance(world.run(reference), Proceed)


def test_unknown_reference_is_refused(world: World) -> None:
    with pytest.raises(UnknownIntentError):
        world.run("never-admitted")


def test_admission_tells_duplicates_and_conflicts(world: World) -> None:
    reference = world.submit()
    ledger = world.services.ledger
    same = load_intent({"reference": reference,
                        "items": [{"seats": [{"id": 1, "session_id": 10}]},
                                  {"session_id": 20, "price_type_id": 3, "quantity": 2}],
                        "buyer": {"email": "a@example.com"}})
    assert ledger.admit(same) is Admission.DUPLICATE
    other = load_intent({**{"reference": reference, "buyer": {"email": "a@example.com"}},
                         "items": [{"session_id": 20, "price_type_id": 3, "quantity": 1}]})
    assert ledger.admit(other) is Admission.CONFLICT


def test_result_carries_reference_batch_metadata_and_times(world: World) -> None:
    reference = world.submit(batch="b-1", metadata={"order": 7})
    world.clock[0] += 3
    world.run(reference)
    [result] = world.results()
    assert (result.reference, result.batch, dict(result.metadata)) == (reference, "b-1",
                                                                       {"order": 7})
    assert result.finished_at is not None and result.submitted_at is not None
    assert result.finished_at - result.submitted_at >= timedelta(0)
    assert result.attempts >= 1


def test_failure_is_recorded_before_seats_are_released(world: World) -> None:
    # Given a purchase failing on its second item, and the worker dying while releasing
    reference = world.submit()
    world.onebox.failures["seats_auto"] = [PermanentError("taken",
                                                          code="ORDER_SEAT_NOT_AVAILABLE")]
    world.onebox.failures["release"] = [RuntimeError("worker killed")]  # type: ignore[list-item]
    with pytest.raises(RuntimeError):
        world.run(reference)
    # When the redelivered message runs again (the seats are free by now)
    world.run(reference)
    # Then it stays failed: it never resumes and buys the basket with a seat missing
    assert "pre_confirm" not in world.onebox.calls and "confirm" not in world.onebox.calls
    [result] = world.results()
    assert result.status == "failed"


def test_giving_up_on_a_sent_confirm_fences_the_order_before_saying_failed(
        world: World) -> None:
    reference = world.submit()
    world.onebox.failures["confirm"] = [OutcomeUnknownError("timeout", step="confirm")]
    world.run(reference)
    world.clock[0] += 10_000  # past the deadline: the next failure gives up
    world.onebox.failures["confirm"] = [TransientError("busy", step="confirm")]
    world.run(reference)
    # The order was read, its seats released (the fence: Onebox releases no
    # confirmed order's seats), then failed
    assert world.onebox.calls[-3:] == ["confirm", "get_order", "release"]
    assert world.onebox.confirms == {}
    [result] = world.results()
    assert result.status == "failed" and result.error is not None
    assert result.error.code == "TRANSIENT" and "nothing was bought" in result.error.message


def test_a_late_confirm_caught_by_the_fence_is_reported_confirmed(world: World) -> None:
    reference = world.submit()
    world.onebox.failures["confirm"] = [OutcomeUnknownError("timeout", step="confirm")]
    world.run(reference)
    world.clock[0] += 10_000
    world.onebox.failures["confirm"] = [TransientError("busy", step="confirm")]
    # The first confirm lands at Onebox just before the fence
    landed_id = next(iter(world.onebox.orders))
    real_release = world.onebox.release_seats

    def late_confirm_then_release(order_id: str, item_ids: Sequence[int]) -> Order:
        world.onebox.orders[landed_id] = replace(world.onebox.orders[landed_id],
                                                 status="CONFIRM")
        raise PermanentError("order is confirmed", code="DIST0004")

    world.onebox.release_seats = late_confirm_then_release  # type: ignore[method-assign]
    world.run(reference)
    world.onebox.release_seats = real_release  # type: ignore[method-assign]
    assert world.results()[0].status == "confirmed"


def test_an_unreadable_entry_does_not_stop_the_sweep(world: World) -> None:
    from fulfilment import recovery
    from fulfilment.topology import Topology

    broken, fine = world.submit("broken-1"), world.submit("fine-1")
    world.services.ledger.redis.hset(world.services.ledger._keys.ledger(broken), "intent", "{")
    world.clock[0] += 10_000
    dispatched: list[str] = []
    assert recovery.sweep(world.services, dispatched.append) == [fine]
    assert dispatched == [fine]
    topology = Topology.for_keys(world.services.ledger._keys)
    from fulfilment.results import consume_failures

    [failure] = list(consume_failures(world.connection, topology, timeout=0.01,
                                      idle_timeout=0.05))
    assert failure["errors"] == {"reference": [broken]}


def test_waiting_for_not_found_to_be_conclusive_does_not_use_up_attempts(
        world: World) -> None:
    # Given a confirm that may have been sent, then an order Onebox cannot find
    reference = world.submit()
    world.onebox.failures["confirm"] = [OutcomeUnknownError("timeout", step="confirm")]
    world.run(reference)
    world.onebox.orders.clear()
    # When it is read again and again before its basket's expiry has passed
    for _ in range(20):
        decision = world.run(reference)
        assert isinstance(decision, RetryIn) and decision.reason == "ORDER_NOT_FOUND"
    # Then, once it has, a 404 still proves nothing (Onebox may answer 404 for an
    # order this channel may not read): never bought again, and in the end unsettled
    world.clock[0] += 700
    decisions = [world.run(reference) for _ in range(6)]
    assert isinstance(decisions[-1], Proceed)
    assert {d.reason for d in decisions[:-1] if isinstance(d, RetryIn)} == {"CONFIRM_UNREADABLE"}
    [result] = world.results()
    assert result.status == "unsettled" and result.order_code
    assert result.error is not None and "ORDER_NOT_FOUND" in result.error.message
    assert world.onebox.calls.count("create") == 1


# --- trust: what a lost write, a late answer or another Onebox answer must not break ---
def test_no_write_recreates_an_entry_that_is_gone(world: World) -> None:
    # Given a worker holding the task of an intent whose ledger entry was lost
    reference = world.submit()
    world.run(reference, Stage.BASKET)
    key = world.services.ledger._keys.ledger(reference)
    world.services.ledger.redis.delete(key)
    # When it runs, and when anything tries to record progress
    with pytest.raises(UnknownIntentError):
        world.run(reference)
    with pytest.raises(UnknownIntentError):
        world.services.ledger.record(reference, items_done=1)
    with pytest.raises(UnknownIntentError):
        world.services.ledger.count_attempt(reference)
    # Then the entry stays gone (the task goes to the failures route)
    assert not world.services.ledger.redis.exists(key)


def test_retention_is_refreshed_by_progress(world: World) -> None:
    reference = world.submit()
    key = world.services.ledger._keys.ledger(reference)
    world.services.ledger.redis.expire(key, 5)
    world.services.ledger.record(reference, items_done=0)
    assert world.services.ledger.redis.ttl(key) > 3000


def test_a_status_conflict_on_a_confirmed_order_is_read_and_reported_confirmed(
        world: World) -> None:
    # Given an order Onebox confirmed whose "confirm sent" mark the ledger lost
    reference = world.submit()
    world.run(reference, Stage.PRE_CONFIRMED)
    [order_id] = world.onebox.orders
    world.onebox.confirm(order_id, reference)
    # When the flow confirms again and Onebox answers DIST0004
    decision = world.run(reference)
    # Then it reads the order by code and reports it confirmed, bought once
    assert isinstance(decision, Proceed)
    assert world.onebox.calls[-2:] == ["confirm", "get_order"]
    assert world.results()[0].status == "confirmed"
    assert world.onebox.confirms == {reference: 1}


def test_a_pre_confirm_sent_again_meeting_a_status_conflict_starts_a_new_basket(
        world: World) -> None:
    # Given a pre-confirm Onebox did but whose code was never recorded (the answer
    # lost with the worker), sent again: Onebox answers DIST0004
    reference = world.submit()
    world.run(reference, Stage.BASKET)
    [first] = world.onebox.orders
    world.onebox.pre_confirm(first)
    world.onebox.failures["pre_confirm"] = [
        PermanentError("status does not allow it", code="DIST0004", step="pre_confirm")]
    # When the flow meets it: no confirm was ever sent, so nothing can be bought
    decision = world.run(reference)
    assert isinstance(decision, RetryIn)
    # Then the order is released by id and a new basket bought, never "unsettled"
    assert sorted(world.onebox.released) == [1, 2, 3]
    assert world.onebox.orders[first].status == "BASKET"
    assert isinstance(world.run(reference), Proceed)
    [result] = world.results()
    assert result.status == "confirmed"
    assert world.onebox.calls.count("create") == 2 and world.onebox.confirms == {reference: 1}


def test_a_refused_release_is_no_fence_and_the_deadline_says_unsettled(world: World) -> None:
    # Given a confirm of unknown outcome, Onebox unreadable and refusing releases
    reference = world.submit()
    world.onebox.failures["confirm"] = [OutcomeUnknownError("timeout", step="confirm")]
    world.run(reference)
    world.onebox.refuse_release = True
    world.onebox.failures["get_order"] = [TransientError("down", step="get_order")] * 50
    # When retries run out before the deadline: no "failed", keep asking
    for _ in range(6):
        decision = world.run(reference)
        assert isinstance(decision, RetryIn)
    assert world.results() == []
    # And past the deadline: an "unsettled" result with the order code
    world.clock[0] += 1_000
    assert isinstance(world.run(reference), Proceed)
    [unsettled] = world.results()
    assert unsettled.status == "unsettled" and unsettled.order_code
    # Then once Onebox answers, the operator settles it: a late confirm landed
    from fulfilment.flow import settle

    world.onebox.failures["get_order"].clear()
    [order_id] = world.onebox.orders
    world.onebox.orders[order_id] = replace(world.onebox.orders[order_id], status="CONFIRM")
    settled = settle(world.services, reference)
    assert settled is not None and settled.status == "confirmed"
    [published] = world.results()
    assert published.status == "confirmed" and published.result_id == unsettled.result_id
    assert settle(world.services, reference) == settled  # settling twice changes nothing


def test_settle_says_failed_once_the_order_is_fenced(world: World) -> None:
    from fulfilment.flow import settle

    reference = world.submit()
    world.onebox.failures["confirm"] = [OutcomeUnknownError("timeout", step="confirm")]
    world.run(reference)
    world.onebox.failures["get_order"] = [TransientError("down", step="get_order")] * 50
    world.onebox.refuse_release = True
    world.clock[0] += 1_000
    world.run(reference)
    assert world.results()[0].status == "unsettled"
    world.onebox.failures["get_order"].clear()
    world.onebox.refuse_release = False
    settled = settle(world.services, reference)
    assert settled is not None and settled.status == "failed"
    assert world.results()[0].status == "failed"
    assert world.onebox.confirms == {}


def run_until_done(world: World, reference: str, runs: int = 12) -> list[Any]:
    """Run the intent until it has an outcome (or ``runs`` times); every decision."""
    decisions = []
    for _ in range(runs):
        decisions.append(world.run(reference))
        if isinstance(decisions[-1], Proceed):
            break
    return decisions


def refuse_order_reads(world: World, times: int = 5) -> None:
    """The orders-management read answers 403, as it may for a channel not allowed it."""
    world.onebox.failures["get_order"] = [
        AuthRefusedError("forbidden", code="FORBIDDEN_RESOURCE", status=403,
                         step="get_order", retry_after=5.0)] * times


def test_a_refused_order_read_is_replaced_by_a_fence_and_a_new_basket(world: World) -> None:
    # Given a confirm of unknown outcome, and the orders-management read refused (403)
    reference = world.submit()
    world.onebox.failures["confirm"] = [OutcomeUnknownError("timeout", step="confirm")]
    world.run(reference)
    refuse_order_reads(world)
    # When the flow resumes: it fences the order by releasing it, and starts again
    assert isinstance(world.run(reference), RetryIn)
    assert world.onebox.calls[-2:] == ["get_order", "release"]
    assert isinstance(world.run(reference), Proceed)
    # Then it is bought once, on a new basket
    assert world.results()[0].status == "confirmed"
    assert world.onebox.confirms == {reference: 1}
    assert world.onebox.calls.count("create") == 2


def test_an_unknown_seats_outcome_always_records_the_orphan_wait(world: World) -> None:
    # The listing and the release work, but the lost call may still land later
    reference = world.submit()
    world.onebox.done_then_raise["seats"] = [OutcomeUnknownError("lost", step="seats")]
    assert isinstance(world.run(reference, Stage.BASKET), RetryIn)
    entry = world.services.ledger.get(reference)
    assert entry is not None and entry.orphan_expires is not None
    assert entry.orphan_expires > world.clock[0] + 600


def test_a_long_basket_hands_over_with_its_progress_instead_of_starting_over(
        world: World) -> None:
    # Given a basket of 20 items whose calls take 10 s each (a slow Onebox)
    items = [{"session_id": 20, "price_type_id": 3, "quantity": 1}] * 20
    reference = world.submit(items=items)
    real = world.onebox.add_seats_auto

    def slow(order_id: str, item: AutoItem) -> Order:
        world.clock[0] += 10
        return real(order_id, item)

    world.onebox.add_seats_auto = slow  # type: ignore[method-assign]
    # When a run nears the soft time limit, it hands over to a retry
    decision = world.run(reference, Stage.BASKET)
    assert decision == RetryIn(0.0, "HANDED_OVER")
    entry = world.services.ledger.get(reference)
    assert entry is not None and 0 < entry.items_done < 20
    # Then the retry carries on from there: one basket, each item added once
    assert isinstance(world.run(reference, Stage.BASKET), Proceed)
    assert world.onebox.calls.count("seats_auto") == 20
    assert world.onebox.calls.count("create") == 1


def test_a_worker_whose_lease_passed_on_cannot_write(world: World) -> None:
    reference = world.submit()
    lease = world.services.leases.take(reference)
    assert lease is not None
    world.services.ledger.redis.delete(lease.key)  # expired while its holder stalled
    assert world.services.leases.take(reference) is not None  # another worker has it
    from fulfilment.ledger import LeaseLostError

    with world.services.ledger.fenced(lease.key, lease.token), pytest.raises(LeaseLostError):
        world.services.ledger.record(reference, items_done=1)


def test_the_sweep_takes_its_lock_and_keeps_what_it_could_not_read(world: World) -> None:
    import redis

    from fulfilment import recovery

    reference = world.submit()
    world.clock[0] += 10_000
    ledger = world.services.ledger
    # Another sweep holds the lock: this one does nothing
    lock = ledger.redis.lock(ledger._keys.sweep_lock, timeout=60)
    assert lock.acquire(blocking=False)
    dispatched: list[str] = []
    assert recovery.sweep(world.services, dispatched.append) == []
    lock.release()
    # A passing Redis error while reading the entry drops nothing
    real_get = ledger.get

    def timing_out(reference: str) -> Any:
        raise redis.TimeoutError("slow")

    ledger.get = timing_out  # type: ignore[method-assign]
    with pytest.raises(redis.TimeoutError):
        recovery.sweep(world.services, dispatched.append)
    ledger.get = real_get  # type: ignore[method-assign]
    assert ledger.stuck(world.clock[0]) == [reference]
    assert recovery.sweep(world.services, dispatched.append) == [reference]


def test_a_lagging_read_is_asked_again_never_confirmed_twice(world: World) -> None:
    # Given a confirm that went through but whose answer was lost, and a read by
    # code that lags behind and still shows the order pre-confirmed
    reference = world.submit()
    world.onebox.done_then_raise["confirm"] = [OutcomeUnknownError("lost", step="confirm")]
    world.run(reference)
    world.onebox.stale_reads = 2
    # When the flow sends confirm again (the read said PRE_CONFIRM) and Onebox refuses
    decision = world.run(reference)
    assert isinstance(decision, RetryIn) and decision.reason == "ORDER_STATUS_STALE"
    # Then it asks again, and reports it confirmed once the read catches up
    assert isinstance(world.run(reference), Proceed)
    assert world.results()[0].status == "confirmed"
    assert world.onebox.confirms == {reference: 1}


def test_a_refused_read_and_a_refused_fence_is_waited_out_then_unsettled(
        world: World) -> None:
    # Given a confirm that landed but whose answer was lost, an order Onebox will
    # not let us read (403) and, being confirmed, will not release
    reference = world.submit()
    world.onebox.done_then_raise["confirm"] = [OutcomeUnknownError("lost", step="confirm")]
    world.run(reference)
    refuse_order_reads(world, times=50)
    # Then the refusal is asked again (it may pass) within the attempts, and the
    # purchase ends unsettled, never failed, never bought again
    decisions = run_until_done(world, reference)
    assert len(decisions) >= 4, decisions  # waited, not "unsettled" at the first refusal
    assert all(d.delay >= 5.0 for d in decisions if isinstance(d, RetryIn))
    [result] = world.results()
    assert result.status == "unsettled" and result.order_code
    assert result.error is not None and "FORBIDDEN_RESOURCE" in result.error.message
    assert world.onebox.confirms == {reference: 1}
    assert world.onebox.calls.count("create") == 1


def test_seats_our_abandoned_basket_still_holds_are_released_not_waited_for(
        world: World) -> None:
    # Given a seats call of unknown outcome that landed (late) in the basket we
    # abandoned, after we had listed and released it
    reference = world.submit()
    world.onebox.failures["seats"] = [OutcomeUnknownError("lost", step="seats")]
    world.run(reference, Stage.BASKET)
    [abandoned, *_] = world.onebox.orders
    world.onebox.add_seats(abandoned, [SeatRef(id=1, session_id=10)])  # the late landing
    # When the new basket finds the seat held past the abandoned basket's expiry
    # by our count (the late landing restarted it)
    world.clock[0] += 602
    world.onebox.failures["seats"] = [PermanentError("held", code="ORDER_SEAT_NOT_AVAILABLE")]
    decision = world.run(reference, Stage.BASKET)
    # Then the abandoned basket's items are released and the seat asked for again at once
    assert isinstance(decision, RetryIn) and decision.delay < 1.0
    assert world.onebox.orders[abandoned].items == ()
    assert isinstance(world.run(reference), Proceed)
    assert world.results()[0].status == "confirmed"


def test_an_order_read_back_in_basket_after_a_confirm_starts_a_new_basket(
        world: World) -> None:
    # Given a confirm of unknown outcome (a 500: Onebox did nothing, as it happens)
    reference = world.submit()
    world.onebox.failures["confirm"] = [OutcomeUnknownError("failed", status=500,
                                                            step="confirm")]
    world.run(reference)
    # When the read is throttled: it is asked again later, nothing is released
    world.onebox.failures["get_order"] = [TransientError("throttled", status=429)]
    assert isinstance(world.run(reference), RetryIn)
    assert "release" not in world.onebox.calls
    # And when the order is then read back in BASKET, emptied (a release whose
    # answer was lost did go through)
    [order_id] = world.onebox.orders
    world.onebox.orders[order_id] = replace(world.onebox.orders[order_id], status="BASKET",
                                            items=())
    assert isinstance(world.run(reference), RetryIn)
    # Then the purchase starts again on a new basket rather than pre-confirming an empty one
    assert isinstance(world.run(reference), Proceed)
    assert world.results()[0].status == "confirmed"
    assert world.onebox.calls.count("create") == 2


def test_calls_the_guard_held_back_use_up_no_attempts(world: World) -> None:
    from fulfilment.errors import CircuitOpenError, RateLimitedError

    reference = world.submit()
    # Held back by the open breaker more often than max_attempts (5) allows failures
    for attempt in range(1, 9):
        world.onebox.failures["create"] = [CircuitOpenError("open", step="create",
                                                            retry_after=3.0)]
        assert world.run(reference, attempt=attempt) == RetryIn(3.0, "CIRCUIT_OPEN")
    # A seats call the rate limit held back was never sent: the basket is kept
    world.onebox.failures["seats"] = [RateLimitedError("no slot", step="seats", retry_after=2.0)]
    assert world.run(reference, attempt=9) == RetryIn(2.0, "RATE_LIMITED")
    assert isinstance(world.run(reference, attempt=10), Proceed)
    assert world.onebox.calls.count("create") == 9 and world.onebox.released == []
    [result] = world.results()
    assert result.status == "confirmed"


def test_a_fence_that_worked_after_a_lost_release_starts_a_new_basket(world: World) -> None:
    # Given a confirm of unknown outcome (a 500: nothing done, as it happens), reads
    # refused (403), and a first release Onebox did but whose answer was lost
    reference = world.submit()
    world.onebox.failures["confirm"] = [OutcomeUnknownError("failed", status=500,
                                                            step="confirm")]
    world.run(reference)
    refuse_order_reads(world, times=50)
    world.onebox.done_then_raise["release"] = [
        OutcomeUnknownError("timed out", code="READ_TIMEOUT", step="release")]
    # When the flow settles it: the next release finds the items gone (DIST0005),
    # and the order, listed by setting its buyer again, back in BASKET
    decisions = run_until_done(world, reference)
    # Then the fence is no failure: a new basket, bought once
    [result] = world.results()
    assert result.status == "confirmed", (result.error, decisions)
    assert world.onebox.confirms == {reference: 1}
    assert world.onebox.calls.count("create") == 2


def test_a_token_refused_for_a_moment_after_a_lost_confirm_is_no_verdict(
        world: World) -> None:
    # Given a confirm that landed but whose answer was lost, then the token endpoint
    # refusing the channel (401) for the read and the fence alike
    reference = world.submit()
    world.onebox.done_then_raise["confirm"] = [OutcomeUnknownError("lost", step="confirm")]
    world.run(reference)
    blip = AuthRefusedError("refused", code="invalid_client", status=401, step="token",
                            retry_after=5.0)
    world.onebox.failures["get_order"] = [blip] * 3
    world.onebox.failures["release"] = [blip] * 3
    # Then it is waited out, never "unsettled" at once: confirmed once auth is back
    decisions = run_until_done(world, reference)
    assert [type(d) for d in decisions] == [RetryIn] * 3 + [Proceed]
    assert world.results()[0].status == "confirmed"
    assert world.onebox.confirms == {reference: 1}


def test_a_read_in_an_unknown_status_is_no_proof(world: World) -> None:
    # Given a confirm of unknown outcome, and a read showing a status we do not know
    reference = world.submit()
    world.onebox.failures["confirm"] = [OutcomeUnknownError("timeout", step="confirm")]
    world.run(reference)
    [order_id] = world.onebox.orders
    world.onebox.orders[order_id] = replace(world.onebox.orders[order_id], status="CANCELLED")
    # Then it is neither bought again nor failed: unsettled
    run_until_done(world, reference)
    [result] = world.results()
    assert result.status == "unsettled" and world.onebox.calls.count("create") == 1


def test_a_refused_confirm_keeps_no_mark_so_an_expired_basket_is_bought_again(
        world: World) -> None:
    # Given a confirm Onebox refused for now (503: it did nothing), then the basket
    # expiring before the retry (a worker restarted, say)
    reference = world.submit()
    world.onebox.failures["confirm"] = [TransientError("busy", status=503, step="confirm")]
    assert isinstance(world.run(reference), RetryIn)
    entry = world.services.ledger.get(reference)
    assert entry is not None and not entry.confirm_sent  # no confirm may have landed
    world.onebox.orders.clear()
    world.clock[0] += 700
    # Then the retry's confirm meets "not found", and with no confirm ever done the
    # purchase starts anew: bought once, never "unsettled"
    run_until_done(world, reference)
    [result] = world.results()
    assert result.status == "confirmed", result.error
    assert world.onebox.calls.count("create") == 2


def test_a_release_answered_but_not_done_is_waited_out_as_our_own_hold(world: World) -> None:
    # Given a pre-confirm done by Onebox whose answer was lost, and Onebox answering
    # a release outside BASKET without doing it
    reference = world.submit()
    world.onebox.done_then_raise["pre_confirm"] = [
        OutcomeUnknownError("lost", code="CONNECTION_LOST", step="pre_confirm")]
    world.onebox.ignore_release = True
    # When the flow restarts on a new basket, releasing the old one
    assert isinstance(world.run(reference), RetryIn)
    if "release" not in world.onebox.calls:
        world.run(reference, Stage.BASKET, attempt=2)  # the interrupted call is met
    [abandoned, *_] = world.onebox.orders
    assert "release" in world.onebox.calls
    assert world.onebox.orders[abandoned].items  # the release did not take
    # Then the old order is remembered as ours, holding seats until it expires: a
    # seat it holds is waited for, not reported unavailable
    entry = world.services.ledger.get(reference)
    assert entry is not None and abandoned in entry.orphans
    assert entry.orphan_expires is not None


def test_a_seat_held_by_an_abandoned_basket_gone_meanwhile_is_asked_for_again(
        world: World) -> None:
    # Given an intent whose abandoned basket's wait is over, and Onebox answering a
    # seat of that basket unavailable, once: it expired, but was not yet swept
    reference = world.submit()
    world.services.ledger.record(reference, orphans=["f" * 32],
                                 orphan_expires=world.clock[0] - 1.0)
    world.onebox.failures["seats"] = [PermanentError(
        "seat held", code="ORDER_SEAT_NOT_AVAILABLE", status=409, step="seats")]
    # When it runs
    run_until_done(world, reference)
    # Then the abandoned basket is found gone, and the seat asked for again: bought
    [result] = world.results()
    assert result.status == "confirmed", result.error
    assert world.onebox.calls.count("seats") == 2
