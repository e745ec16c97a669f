"""Refunds as plain functions: fakeredis (and real Redis) ledger, a scripted Onebox, no worker."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from kombu import Connection
from marshmallow import ValidationError

from fulfilment.config import Settings
from fulfilment.errors import (
    AlreadyRefundedError,
    InvalidMessageError,
    OutcomeUnknownError,
    PermanentError,
    TransientError,
)
from fulfilment.flow import Services
from fulfilment.ledger import Admission as PurchaseAdmission
from fulfilment.refunds import (
    SENT,
    Admission,
    Finished,
    RefundConflictError,
    RefundLedger,
    RefundRefusedError,
    RetryLater,
    advance_refund,
    submit_refund,
    take_and_advance,
)
from fulfilment.results import consume_refund_results
from fulfilment.topology import Topology
from schemas.intent import load_intent
from schemas.onebox import ITEM_REFUNDED, Order, OrderItem
from schemas.refund import RefundResult, dump_refund, load_refund, refund_result_id
from schemas.result import CONFIRMED, FAILED, OrderResult, ResultError, result_id_for
from tests.conftest import LedgerStore
from tests.unit.test_flow import NOW, FakeOnebox, flow_services


@dataclass
class RefundOnebox(FakeOnebox):
    """Confirmed orders by code whose items can be refunded, as Onebox's orders-mgmt API."""

    #: Item refunds done, by item id (more than 1 would be a double refund).
    refunds: dict[int, int] = field(default_factory=dict)

    def add_confirmed(self, code: str, item_ids: Sequence[int]) -> None:
        self.orders[code] = Order(id=f"id-{code}", status="CONFIRM", code=code,
                                  items=tuple(OrderItem(id=i, state="SOLD") for i in item_ids))

    def get_order(self, code: str) -> Order:
        return self._step("get_order", lambda: self.orders[code])

    def refund(self, code: str, item_ids: Sequence[int] | None = None, *,
               surcharges: bool = True) -> Order:
        def act() -> Order:
            order = self.orders[code]
            wanted = list(item_ids or [item.id for item in order.items])
            if any(item.state == ITEM_REFUNDED for item in order.items if item.id in wanted):
                raise AlreadyRefundedError("already refunded", status=409, step="refund")
            for item_id in wanted:
                self.refunds[item_id] = self.refunds.get(item_id, 0) + 1
            order = replace(order, items=tuple(
                replace(item, state=ITEM_REFUNDED) if item.id in wanted else item
                for item in order.items))
            self.orders[code] = order
            return order
        return self._step("refund", act)


@dataclass
class World:
    services: Services
    onebox: RefundOnebox
    connection: Connection
    clock: list[float]
    dispatched: list[dict[str, Any]] = field(default_factory=list)

    @property
    def store(self) -> RefundLedger:
        return RefundLedger.of(self.services)

    def confirmed_purchase(self, reference: str, code: str, item_ids: Sequence[int]) -> None:
        """A purchase the worker confirmed: its entry as the flow leaves it."""
        ledger = self.services.ledger
        intent = load_intent({"reference": reference, "buyer": {"email": "a@example.com"},
                              "items": [{"session_id": 20, "price_type_id": 3,
                                         "quantity": len(item_ids)}]})
        assert ledger.admit(intent) is PurchaseAdmission.NEW
        ledger.record(reference, code=code, item_ids=list(item_ids), order_id=f"id-{code}")
        ledger.finish(reference, OrderResult(result_id=result_id_for(reference),
                                             reference=reference, status=CONFIRMED,
                                             order_code=code, order_id=f"id-{code}"))
        self.onebox.add_confirmed(code, item_ids)

    def submit(self, **document: Any) -> str:
        return submit_refund(self.services, document, self.dispatch).refund_id

    def dispatch(self, document: Mapping[str, Any]) -> None:
        self.dispatched.append(dict(document))

    def run(self, refund_id: str) -> Any:
        return advance_refund(self.services, refund_id)

    def run_until_done(self, refund_id: str, runs: int = 12) -> RefundResult:
        for _ in range(runs):
            decision = self.run(refund_id)
            if isinstance(decision, Finished):
                return decision.outcome
            self.clock[0] += decision.delay
        raise AssertionError(f"no outcome after {runs} runs")

    def results(self) -> list[RefundResult]:
        topology = Topology.for_keys(self.services.ledger.keys)
        return list(consume_refund_results(self.connection, topology, timeout=0.01,
                                           idle_timeout=0.05))


@pytest.fixture
def world(ledger_store: LedgerStore) -> Iterator[World]:
    settings = Settings.defaults().with_overrides(key_prefix=ledger_store.prefix)
    clock = [NOW]
    onebox = RefundOnebox()
    with Connection("memory://localhost/", transport_options={"polling_interval": 0.01}) as conn:
        services = flow_services(settings, ledger_store.client, onebox, conn, clock)
        yield World(services, onebox, conn, clock)


def done_then_lost(world: World, step: str) -> None:
    """The next ``step`` call is done by Onebox, and its answer never arrives."""
    world.onebox.done_then_raise[step] = [
        OutcomeUnknownError("connection lost after the request was sent", step=step)]


# --- the happy paths ---------------------------------------------------------------------

def test_a_purchase_is_refunded_once_and_one_refunded_result_is_published(world: World) -> None:
    world.confirmed_purchase("ref-1", "CODE1", [11, 12])
    refund_id = world.submit(reference="ref-1")
    assert world.dispatched == [dump_refund(load_refund({"reference": "ref-1"}))]
    outcome = world.run_until_done(refund_id)
    assert outcome.status == "refunded" and outcome.order_code == "CODE1"
    assert outcome.items == (11, 12) and not outcome.already_refunded
    assert outcome.result_id == refund_result_id(refund_id)
    assert world.onebox.refunds == {11: 1, 12: 1}
    assert world.results() == [outcome]
    # Run again (a redelivered message): nothing sent, nothing published twice
    assert world.run(refund_id) == Finished(outcome)
    assert world.onebox.calls.count("refund") == 1
    assert world.results() == []
    assert world.store.stuck(NOW + 10_000) == []


def test_some_items_of_an_order_by_code(world: World) -> None:
    world.onebox.add_confirmed("CODE2", [21, 22, 23])
    refund_id = world.submit(order_code="CODE2", items=[23, 21], reason="event moved",
                             metadata={"ticket": 7})
    outcome = world.run_until_done(refund_id)
    assert outcome.items == (21, 23) and outcome.metadata == {"ticket": 7}
    assert world.onebox.refunds == {21: 1, 23: 1}


# --- exactly once -------------------------------------------------------------------------

def test_a_lost_answer_is_read_back_and_never_sent_again(world: World) -> None:
    world.confirmed_purchase("ref-1", "CODE1", [11, 12])
    refund_id = world.submit(reference="ref-1")
    done_then_lost(world, "refund")
    # The first run's answer is lost: the refund stays marked sent
    decision = world.run(refund_id)
    assert isinstance(decision, RetryLater) and decision.reason == "OUTCOME_UNKNOWN"
    entry = world.store.get(refund_id)
    assert entry is not None and entry.state == SENT and entry.outcome is None
    # The next reads the order back: refunded, so nothing is sent again
    outcome = world.run_until_done(refund_id)
    assert outcome.status == "refunded" and outcome.items == (11, 12)
    assert world.onebox.calls[-2:] == ["refund", "get_order"]
    assert world.onebox.calls.count("refund") == 1  # read back, never sent again
    assert world.onebox.refunds == {11: 1, 12: 1}
    assert [r.status for r in world.results()] == ["refunded"]


def test_a_lost_call_that_was_not_done_is_sent_again_after_reading(world: World) -> None:
    world.onebox.add_confirmed("CODE3", [31])
    refund_id = world.submit(order_code="CODE3")
    world.onebox.failures["refund"] = [OutcomeUnknownError("timed out", step="refund")]
    assert isinstance(world.run(refund_id), RetryLater)
    outcome = world.run_until_done(refund_id)
    assert outcome.status == "refunded"
    assert world.onebox.calls[-3:] == ["refund", "get_order", "refund"]
    assert world.onebox.refunds == {31: 1}


def test_a_sent_refund_whose_order_cannot_be_read_is_sent_again_and_409_is_success(
        world: World) -> None:
    world.onebox.add_confirmed("CODE3", [31])
    refund_id = world.submit(order_code="CODE3")
    done_then_lost(world, "refund")
    assert isinstance(world.run(refund_id), RetryLater)
    world.onebox.failures["get_order"] = [PermanentError("not found", code="ORDER_NOT_FOUND",
                                                         status=404, step="get_order")] * 2
    outcome = world.run_until_done(refund_id)
    assert outcome.status == "refunded" and outcome.already_refunded
    assert world.onebox.refunds == {31: 1}


def test_a_409_for_one_of_several_items_is_no_success_while_the_order_cannot_be_read(
        world: World) -> None:
    # Given item 11 of an order refunded earlier
    world.confirmed_purchase("ref-1", "CODE1", [11, 12])
    world.run_until_done(world.submit(reference="ref-1", items=[11]))
    # When the whole order is refunded and Onebox answers 409 but refuses every read
    whole = world.submit(reference="ref-1")
    world.onebox.failures["get_order"] = [PermanentError("not found", code="ORDER_NOT_FOUND",
                                                         status=404, step="get_order")] * 3
    decisions = [world.run(whole) for _ in range(3)]
    # Then it waits (item 12 was never refunded), and once the order reads, refunds the rest
    assert all(isinstance(d, RetryLater) for d in decisions), decisions
    outcome = world.run_until_done(whole)
    assert outcome.status == "refunded" and outcome.items == (11, 12)
    assert world.onebox.refunds == {11: 1, 12: 1}


def test_the_same_refund_twice_is_one_refund_with_one_outcome(world: World) -> None:
    world.confirmed_purchase("ref-1", "CODE1", [11, 12])
    first = world.submit(reference="ref-1", refund_id="r-1")
    assert world.submit(reference="ref-1", refund_id="r-1") == first  # in flight: dispatched again
    outcome = world.run_until_done(first)
    submission = submit_refund(world.services, {"reference": "ref-1", "refund_id": "r-1"},
                               world.dispatch)
    assert submission.status == "duplicate" and submission.outcome == outcome
    assert len(world.dispatched) == 2
    # The same refund without an id: derived from target and items, also the same each time
    assert world.submit(reference="ref-1") == world.submit(reference="ref-1")
    assert world.onebox.refunds == {11: 1, 12: 1}
    assert [r.refund_id for r in world.results()] == ["r-1"]


def test_a_second_refund_of_a_refunded_order_is_success_already_refunded(world: World) -> None:
    world.confirmed_purchase("ref-1", "CODE1", [11, 12])
    world.run_until_done(world.submit(reference="ref-1", refund_id="r-1"))
    second = world.run_until_done(world.submit(reference="ref-1", refund_id="r-2"))
    assert second.status == "refunded" and second.already_refunded
    assert second.items == (11, 12)
    assert world.onebox.refunds == {11: 1, 12: 1}


def test_a_whole_refund_after_a_partial_one_refunds_only_the_rest(world: World) -> None:
    world.confirmed_purchase("ref-1", "CODE1", [11, 12, 13])
    world.run_until_done(world.submit(reference="ref-1", items=[12]))
    whole = world.run_until_done(world.submit(reference="ref-1"))
    assert whole.status == "refunded" and whole.items == (11, 12, 13)
    assert world.onebox.refunds == {11: 1, 12: 1, 13: 1}


def test_the_same_id_for_another_refund_is_a_conflict(world: World) -> None:
    world.confirmed_purchase("ref-1", "CODE1", [11, 12])
    world.submit(reference="ref-1", refund_id="r-1")
    with pytest.raises(RefundConflictError):
        world.submit(reference="ref-1", refund_id="r-1", items=[11])
    with pytest.raises(RefundConflictError):
        take_and_advance(world.services, load_refund({"order_code": "X", "refund_id": "r-1"}))
    # Reason and metadata do not make another refund
    assert world.store.admit(load_refund({"reference": "ref-1", "refund_id": "r-1",
                                          "reason": "other words"})) is Admission.DUPLICATE


# --- refusals and failures ------------------------------------------------------------------

def test_only_a_confirmed_purchase_can_be_refunded(world: World) -> None:
    ledger = world.services.ledger
    with pytest.raises(RefundRefusedError, match="no purchase ref-x") as caught:
        world.submit(reference="ref-x")
    assert caught.value.code == "UNKNOWN_PURCHASE"
    intent = load_intent({"reference": "ref-f", "buyer": {"email": "a@example.com"},
                          "items": [{"session_id": 20, "price_type_id": 3, "quantity": 1}]})
    ledger.admit(intent)
    with pytest.raises(RefundRefusedError, match="no outcome yet"):
        world.submit(reference="ref-f")
    ledger.finish("ref-f", OrderResult(result_id=result_id_for("ref-f"), reference="ref-f",
                                       status=FAILED, error=ResultError(code="X", message="x")))
    with pytest.raises(RefundRefusedError, match="was not confirmed") as caught:
        world.submit(reference="ref-f")
    assert caught.value.code == "PURCHASE_NOT_CONFIRMED"
    world.confirmed_purchase("ref-1", "CODE1", [11, 12])
    with pytest.raises(RefundRefusedError, match=r"items \[99\] are not in"):
        world.submit(reference="ref-1", items=[11, 99])
    # Nothing of these was recorded or queued
    assert world.dispatched == [] and world.store.stuck(NOW + 10_000) == []


def test_a_refused_message_from_the_queue_fails_with_the_reason(world: World) -> None:
    # Given a message naming a purchase that never was (no producer check on the queue)
    outcome = take_and_advance(world.services, load_refund({"reference": "ghost"}))
    assert isinstance(outcome, Finished)
    assert outcome.outcome.status == "failed"
    assert outcome.outcome.error is not None
    assert outcome.outcome.error.code == "UNKNOWN_PURCHASE"
    assert world.onebox.calls == []


def test_onebox_refusing_fails_the_refund_and_a_refusal_keeps_no_sent_mark(world: World) -> None:
    world.onebox.add_confirmed("CODE4", [41])
    refund_id = world.submit(order_code="CODE4")
    world.onebox.failures["refund"] = [TransientError("busy", status=503, retry_after=2.0)]
    decision = world.run(refund_id)
    assert isinstance(decision, RetryLater) and decision.delay == 2.0
    entry = world.store.get(refund_id)
    assert entry is not None and entry.state == "recorded"
    world.onebox.failures["refund"] = [PermanentError("bad", code="DIST0005", status=400,
                                                      step="refund")]
    outcome = world.run_until_done(refund_id)
    assert outcome.status == "failed" and outcome.error is not None
    assert outcome.error.code == "DIST0005"
    assert world.onebox.refunds == {}


def test_giving_up_on_a_sent_refund_reads_it_before_saying_failed(world: World) -> None:
    world.onebox.add_confirmed("CODE5", [51])
    refund_id = world.submit(order_code="CODE5")
    # Every answer lost, but the first call was done: the read settles it as refunded
    done_then_lost(world, "refund")
    world.onebox.failures["get_order"] = [TransientError("down", step="get_order")] * 4
    outcome = world.run_until_done(refund_id, runs=8)
    assert outcome.status == "refunded"
    assert world.onebox.refunds == {51: 1}


def test_a_held_lease_makes_another_worker_wait(world: World) -> None:
    world.onebox.add_confirmed("CODE6", [61])
    refund_id = world.submit(order_code="CODE6")
    lease = world.store.take_lease(world.services, refund_id)
    assert lease is not None
    assert world.run(refund_id) == RetryLater(1.0, "another worker holds this refund")
    lease.release()
    assert isinstance(world.run(refund_id), Finished)


# --- the contract -----------------------------------------------------------------------------

def test_requests_are_validated() -> None:
    with pytest.raises(ValidationError) as caught:
        load_refund({"reference": "r", "order_code": "C"})
    assert "_schema" in caught.value.messages
    with pytest.raises(ValidationError):
        load_refund({})
    with pytest.raises(ValidationError) as caught:
        load_refund({"reference": "r", "surplus": 1})
    assert set(caught.value.messages) == {"surplus"}
    with pytest.raises(ValidationError) as caught:
        load_refund({"reference": "r", "items": [1, 1]})
    assert set(caught.value.messages) == {"items"}
    request = load_refund({"reference": "r", "items": [3, 1]})
    assert request.items == (1, 3) and request.id.startswith("refund-")
    assert load_refund(dump_refund(request)) == request


def test_an_invalid_request_is_refused_before_anything_is_recorded(world: World) -> None:
    with pytest.raises(InvalidMessageError) as caught:
        world.submit(reference="bad ref")
    assert "reference" in caught.value.errors
