"""The recovery sweep resumes refunds whose message was lost, as it does intents.

A refund admitted to its ledger entry whose message never reached a worker (the
producer died after admitting it, the broker lost it) is owed an outcome: the
sweep that celery beat runs (``tasks.maintenance.sweep``) dispatches it again once
it has made no progress for ``FULFILMENT_STUCK_AFTER``, under the sweep's lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from fulfilment import recovery
from fulfilment.config import Settings
from fulfilment.refunds import Finished, submit_refund, take_and_advance
from fulfilment.results import consume_failures
from fulfilment.topology import Topology
from schemas.refund import dump_refund, load_refund
from tests.conftest import LedgerStore
from tests.unit.test_flow import NOW, flow_services
from tests.unit.test_refunds import RefundOnebox, World


@pytest.fixture
def world(ledger_store: LedgerStore) -> Iterator[World]:
    """The refunds tests' world: their ledger, a scripted Onebox, an in-memory broker."""
    settings = Settings.defaults().with_overrides(key_prefix=ledger_store.prefix)
    clock = [NOW]
    onebox = RefundOnebox()
    with Connection("memory://localhost/", transport_options={"polling_interval": 0.01}) as conn:
        yield World(flow_services(settings, ledger_store.client, onebox, conn, clock), onebox,
                    conn, clock)


class Dispatched:
    """What a sweep handed on: intents by reference, refunds as their documents."""

    def __init__(self) -> None:
        self.intents: list[str] = []
        self.refunds: list[dict[str, Any]] = []

    def intent(self, reference: str) -> None:
        self.intents.append(reference)

    def refund(self, document: Any) -> None:
        self.refunds.append(dict(document))


def lost_refund(world: World, reference: str, refund_id: str) -> dict[str, Any]:
    """A refund of a purchase published confirmed, admitted, and its message lost before
    any worker took it."""
    world.services.ledger.mark_published(reference)
    submission = submit_refund(world.services, {"reference": reference, "refund_id": refund_id},
                               lambda document: None)
    assert submission.status == "accepted"
    return dump_refund(load_refund({"reference": reference, "refund_id": refund_id}))


def test_a_refund_whose_message_was_lost_is_resumed_once_it_is_stuck(
        world: World) -> None:
    # Given a confirmed purchase whose refund was admitted, and its message lost
    world.confirmed_purchase("ref-1", "CODE1", [11, 12])
    document = lost_refund(world, "ref-1", "r-lost")
    stuck_after = world.services.settings.stuck_after
    sent = Dispatched()
    # When the sweep runs before FULFILMENT_STUCK_AFTER has passed: nothing yet
    assert recovery.sweep_all(world.services, sent.intent, sent.refund) == recovery.Swept()
    # Then, once it has, the refund is dispatched again, once
    world.clock[0] += stuck_after + 1
    swept = recovery.sweep_all(world.services, sent.intent, sent.refund)
    assert swept == recovery.Swept([], ["r-lost"]) and sent.refunds == [document]
    # And the next sweep gives that dispatch time to work: not dispatched twice
    world.clock[0] += stuck_after / 2
    assert recovery.sweep_all(world.services, sent.intent, sent.refund).refunds == []
    # And the dispatched message brings it to one outcome; then it is owed nothing more
    decision = take_and_advance(world.services, load_refund(sent.refunds[0]))
    assert isinstance(decision, Finished) and decision.outcome.status == "refunded"
    assert world.onebox.refunds == {11: 1, 12: 1}
    world.clock[0] += 10 * stuck_after
    assert recovery.sweep_all(world.services, sent.intent, sent.refund).refunds == []
    assert sent.refunds == [document]


def test_a_refund_still_stuck_after_its_resumption_is_resumed_again(
        world: World) -> None:
    world.confirmed_purchase("ref-2", "CODE2", [21])
    document = lost_refund(world, "ref-2", "r-twice-lost")
    sent = Dispatched()
    stuck_after = world.services.settings.stuck_after
    # The resumed message is lost too: the sweep after the next stuck_after sends it again
    for _ in range(2):
        world.clock[0] += stuck_after + 1
        recovery.sweep_all(world.services, sent.intent, sent.refund)
    assert sent.refunds == [document, document]


def test_the_refunds_are_swept_under_the_sweeps_lock_with_the_intents(
        world: World) -> None:
    world.confirmed_purchase("ref-3", "CODE3", [31])
    lost_refund(world, "ref-3", "r-locked")
    world.clock[0] += world.services.settings.stuck_after + 1
    ledger = world.services.ledger
    lock = ledger.redis.lock(ledger.keys.sweep_lock, timeout=60)
    assert lock.acquire(blocking=False)
    sent = Dispatched()
    # Another sweep holds the lock: this one resumes nothing
    assert recovery.sweep_all(world.services, sent.intent, sent.refund) == recovery.Swept()
    lock.release()
    assert recovery.sweep_all(world.services, sent.intent, sent.refund).refunds == ["r-locked"]


def test_an_unreadable_refund_entry_goes_to_the_failures_queue_and_stops_nothing(
        world: World) -> None:
    world.confirmed_purchase("ref-4", "CODE4", [41])
    world.confirmed_purchase("ref-5", "CODE5", [51])
    lost_refund(world, "ref-4", "r-broken")
    lost_refund(world, "ref-5", "r-fine")
    ledger = world.services.ledger
    ledger.redis.hset(ledger.keys.refund("r-broken"), "request", "{")
    world.clock[0] += world.services.settings.stuck_after + 1
    sent = Dispatched()
    assert recovery.sweep_all(world.services, sent.intent, sent.refund).refunds == ["r-fine"]
    [failure] = list(consume_failures(world.connection, Topology.for_keys(ledger.keys),
                                      timeout=0.01, idle_timeout=0.05))
    assert failure["errors"] == {"refund_id": ["r-broken"]}
    assert world.store.stuck(world.clock[0] + 10_000) == ["r-fine"]


def test_the_beat_sweep_task_resumes_refunds(world: World,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import maintenance, runtime

    world.confirmed_purchase("ref-6", "CODE6", [61])
    document = lost_refund(world, "ref-6", "r-beat")
    world.clock[0] += world.services.settings.stuck_after + 1
    sent = Dispatched()
    monkeypatch.setattr(maintenance, "dispatch_refund", sent.refund)
    monkeypatch.setattr(maintenance, "resume", sent.intent)
    runtime.install(world.services)
    try:
        # What celery beat's "recovery-sweep" entry runs, called in this process
        assert maintenance.sweep() == 1
    finally:
        runtime.reset()
    assert sent.refunds == [document] and sent.intents == []
