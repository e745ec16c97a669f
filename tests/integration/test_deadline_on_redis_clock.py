"""An intent's retry deadline is counted from its admission, on Redis's clock.

A producer's clock may be off by minutes: the deadline is never its
``submitted_at`` against a worker's clock. On a real Redis (its ``TIME``, its
Lua), with a producer process whose clock is 16 minutes slow, every path that
admits (submit, submit_many and so bulk files, the Redis intake list) records
the admission on Redis's clock, and one 503 then is just a retry.
"""

from __future__ import annotations

import json
import time
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from kombu import Connection

import fulfilment.ledger
from fulfilment.config import Settings
from fulfilment.errors import TransientError
from fulfilment.flow import Proceed, RetryIn, Services, Stage, advance
from fulfilment.intake import Intake
from fulfilment.keys import Keys
from fulfilment.lease import Leases
from fulfilment.ledger import Ledger
from fulfilment.producer import Producer
from fulfilment.results import ResultPublisher, consume_results
from fulfilment.retry import RetryPolicy
from fulfilment.topology import Topology
from schemas.intent import load_intent
from tests.unit.test_flow import FakeOnebox

pytestmark = pytest.mark.integration

#: How slow the producer's clock is: more than the default 15-minute deadline.
SLOW = 16 * 60.0
DEADLINE = 900.0


def intent(reference: str) -> dict[str, Any]:
    return {"reference": reference, "buyer": {"email": "ana@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]}


class World:
    def __init__(self, client: redis.Redis, prefix: str, connection: Connection) -> None:
        self.redis = client
        self.keys = Keys(prefix)
        self.connection = connection
        self.topology = Topology.for_keys(self.keys)
        self.onebox = FakeOnebox()
        # The worker: this machine's clock, Redis's for admission times.
        self.services = Services(
            settings=Settings.defaults().with_overrides(key_prefix=prefix),
            client=self.onebox,  # type: ignore[arg-type]
            ledger=Ledger(client, self.keys, 3600),
            publisher=ResultPublisher(connection, self.topology),
            leases=Leases(client, self.keys, 60),
            policy=RetryPolicy(max_attempts=5, base=1.0, cap=8.0, deadline=DEADLINE,
                               jitter=False))

    def slow_producer(self, monkeypatch: pytest.MonkeyPatch) -> Producer:
        """A producer whose process clock is ``SLOW`` behind (the ledger reads it)."""
        slow = types.SimpleNamespace(time=lambda: time.time() - SLOW)
        monkeypatch.setattr(fulfilment.ledger, "time", slow)
        producer = Producer(Ledger(self.redis, self.keys, 3600), lambda _: None, max_quantity=50)
        monkeypatch.undo()
        return producer

    def redis_now(self) -> float:
        seconds, micros = self.redis.time()
        return float(seconds) + float(micros) / 1e6

    def fails_once_with_503(self, reference: str) -> Any:
        self.onebox.failures["create"] = [TransientError("unavailable", status=503,
                                                         code="HTTP_503", step="create")]
        return advance(self.services, reference, Stage.PUBLISHED)

    def results(self) -> list[Any]:
        return list(consume_results(self.connection, self.topology, timeout=0.01,
                                    idle_timeout=0.05))


@pytest.fixture
def world(redis_client: redis.Redis, prefix: str) -> Iterator[World]:
    with Connection("memory://localhost/", transport_options={"polling_interval": 0.01}) as conn:
        yield World(redis_client, prefix, conn)


def test_every_admission_path_records_redis_clock_not_the_producers(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a producer process whose clock is 16 minutes slow
    producer = world.slow_producer(monkeypatch)
    before = world.redis_now()
    # When it admits through each path: one intent, a stream (bulk files use it), the
    # Redis intake list
    producer.submit(intent("one"))
    list(producer.submit_many([intent("many-1"), intent("many-2")], batch="b1"))
    world.redis.lpush(world.keys.intake, json.dumps(intent("listed")))
    publisher = ResultPublisher(world.connection, world.topology)
    assert Intake(world.redis, world.keys, producer, publisher).drain().accepted == 1
    after = world.redis_now()
    # Then each entry's admission time is Redis's, while submitted_at keeps the producer's
    for reference in ("one", "many-1", "many-2", "listed"):
        entry = world.services.ledger.get(reference)
        assert entry is not None and entry.admitted_at is not None
        assert before - 1 <= entry.admitted_at <= after + 1
        assert entry.submitted_at.timestamp() < before - SLOW + 60


def test_a_producer_16_minutes_slow_does_not_make_one_503_fail_the_intent(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an intent from a producer 16 minutes slow (submitted_at 16 minutes ago)
    world.slow_producer(monkeypatch).submit(intent("slow-1"))
    # When Onebox answers one 503
    decision = world.fails_once_with_503("slow-1")
    # Then it is retried, not failed: the deadline is counted from admission
    assert isinstance(decision, RetryIn), decision
    assert world.results() == []
    assert isinstance(advance(world.services, "slow-1", Stage.PUBLISHED), Proceed)
    assert [r.status for r in world.results()] == ["confirmed"]


def test_the_deadline_still_bites_when_admission_was_long_ago_on_redis_clock(
        world: World) -> None:
    # Given an intent admitted 16 minutes ago by Redis's clock (submitted_at just now)
    world.services.ledger.admit(load_intent(intent("old-1")))
    world.redis.hset(world.keys.ledger("old-1"), "admitted_at", repr(world.redis_now() - SLOW))
    # When Onebox answers one 503, then it fails: past the deadline
    assert isinstance(world.fails_once_with_503("old-1"), Proceed)
    assert [r.status for r in world.results()] == ["failed"]


@pytest.mark.parametrize(("submitted_ago", "fails"), [(60.0, False), (SLOW, True)])
def test_an_entry_admitted_before_admission_times_were_kept_falls_back_to_submitted_at(
        world: World, submitted_ago: float, fails: bool) -> None:
    # Given an entry as an earlier version wrote it: no admitted_at
    submitted = datetime.now(UTC) - timedelta(seconds=submitted_ago)
    world.services.ledger.admit(load_intent(intent("legacy-1")), submitted)
    world.redis.hdel(world.keys.ledger("legacy-1"), "admitted_at")
    entry = world.services.ledger.get("legacy-1")
    assert entry is not None and entry.admitted_at is None
    # When Onebox answers one 503: its submitted_at, read on Redis's clock, decides
    decision = world.fails_once_with_503("legacy-1")
    assert isinstance(decision, Proceed if fails else RetryIn), decision
