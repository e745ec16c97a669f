"""The Redis-list intake: every bad message goes to the failures queue with its reason, the
drain goes on, nothing stays in the processing list, and the drain time is recorded."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from kombu import Connection

from fulfilment.intake import MAX_DRAINERS, Intake, last_drained
from fulfilment.keys import Keys
from fulfilment.ledger import Ledger
from fulfilment.producer import Producer
from fulfilment.results import FAILURE_PAYLOAD_LIMIT, ResultPublisher, consume_failures
from fulfilment.topology import Topology


def intent(reference: str, **extra: Any) -> dict[str, Any]:
    return {"reference": reference, "buyer": {"email": "ana@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}], **extra}


class World:
    def __init__(self, connection: Connection) -> None:
        self.keys = Keys(f"unit-{uuid.uuid4().hex[:8]}")
        self.redis = fakeredis.FakeRedis()
        self.topology = Topology.for_keys(self.keys)
        self.connection = connection
        self.dispatched: list[str] = []
        producer = Producer(Ledger(self.redis, self.keys, 3600), self.dispatched.append,
                            max_quantity=50)
        self.intake = Intake(self.redis, self.keys, producer,
                             ResultPublisher(connection, self.topology), clock=lambda: 1234.5)

    def push(self, *messages: str | bytes) -> None:
        self.redis.lpush(self.keys.intake, *messages)

    def failures(self) -> list[dict[str, Any]]:
        return list(consume_failures(self.connection, self.topology, timeout=0.01,
                                     idle_timeout=0.1))


@pytest.fixture
def world() -> Iterator[World]:
    with Connection("memory://localhost/", transport_options={"polling_interval": 0.01}) as c:
        yield World(c)


def test_each_bad_message_is_refused_with_its_reason_and_the_good_one_is_taken(
        world: World) -> None:
    world.push(b"not json", b"\xff\xfe not utf-8", json.dumps([1, 2]),
               json.dumps({"hello": "world"}),
               json.dumps(intent("v2", schema_version=2)),
               json.dumps(intent("big", metadata={"k": "x" * 70_000})),
               "x" * (FAILURE_PAYLOAD_LIMIT + 10),
               json.dumps(intent("good-1")))
    report = world.intake.drain()
    assert (report.accepted, report.refused) == (1, 7)
    assert world.dispatched == ["good-1"]
    failures = world.failures()
    assert len(failures) == 7
    assert all(f["reason"] == "invalid purchase intent" for f in failures)
    reasons = json.dumps([f["errors"] for f in failures])
    for expected in ("not valid JSON", "not an object", "schema_version", "more than 65536",
                     "Unknown field"):
        assert expected in reasons, expected
    cut = [f for f in failures if f.get("payload_truncated")]
    assert len(cut) == 2 and all(len(f["payload"]) == FAILURE_PAYLOAD_LIMIT for f in cut)
    assert world.redis.llen(world.keys.intake) == 0
    assert world.redis.llen(world.keys.intake_processing) == 0


def test_a_reused_reference_is_refused_as_a_conflict(world: World) -> None:
    world.push(json.dumps(intent("dup-1")))
    world.intake.drain()
    world.push(json.dumps(intent("dup-1", delivery_method="EMAIL")))
    report = world.intake.drain()
    assert report.refused == 1
    [failure] = world.failures()
    assert "already used for a different purchase" in failure["reason"]
    assert "reference" in failure["errors"]


def test_a_message_that_cannot_be_parsed_for_any_reason_does_not_stall_the_intake(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a parser that breaks on one message (a bug, not a refusal)
    from fulfilment.producer import parse_intent as real

    def parse(raw: Any, *, max_quantity: int) -> Any:
        if isinstance(raw, bytes) and b"boom" in raw:
            raise RecursionError("deep")
        return real(raw, max_quantity=max_quantity)

    monkeypatch.setattr("fulfilment.producer.parse_intent", parse)
    world.push(json.dumps(intent("boom")), json.dumps(intent("fine-1")))
    report = world.intake.drain()
    assert (report.accepted, report.refused) == (1, 1)
    assert [f["reason"] for f in world.failures()] == ["unreadable message: RecursionError"]
    assert world.redis.llen(world.keys.intake_processing) == 0


def test_a_drain_records_when_it_ran(world: World) -> None:
    assert last_drained(world.redis, world.keys) is None
    world.intake.drain()
    assert last_drained(world.redis, world.keys) == 1234.5


def test_a_drain_that_finds_as_many_drainers_at_work_as_allowed_records_nothing(
        world: World) -> None:
    for n in range(MAX_DRAINERS):
        world.redis.zadd(world.keys.intake_drainers, {f"other-{n}": 2 * 10**13})  # far ahead
    world.push(json.dumps(intent("waits-1")))
    assert world.intake.drain().total == 0
    assert last_drained(world.redis, world.keys) is None
    assert world.redis.llen(world.keys.intake) == 1
