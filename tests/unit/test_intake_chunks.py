"""The Redis-list intake's chunks: each leaves its drainer's processing list only once
taken in, a dead drainer's chunk is taken again once its lease lapses, and several drain
at once, never more than ``MAX_DRAINERS`` (the scripts on fakeredis and on a real Redis)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from kombu import Connection
from kombu.exceptions import OperationalError

from fulfilment.intake import MAX_DRAINERS, Intake, taken_count
from fulfilment.keys import Keys
from fulfilment.ledger import Ledger
from fulfilment.producer import Producer, Submission
from fulfilment.results import ResultPublisher
from fulfilment.topology import Topology
from tests.conftest import LedgerStore

FAR_AHEAD = 2 * 10**13  # a lease lapsing in the year 2600 (ms)


def intent(reference: str) -> str:
    return json.dumps({"reference": reference, "buyer": {"email": "ana@example.com"},
                       "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]})


class World:
    def __init__(self, store: LedgerStore, connection: Connection) -> None:
        self.redis = store.client
        self.keys = Keys(store.prefix)
        self.ledger = Ledger(self.redis, self.keys, 3600)
        self.dispatched: list[str] = []
        self.producer = Producer(self.ledger, self.dispatched.append, max_quantity=50,
                                 dispatch_many=self.dispatched.extend)
        self.publisher = ResultPublisher(connection, Topology.for_keys(self.keys))

    def intake(self, producer: Producer | None = None, **options: Any) -> Intake:
        return Intake(self.redis, self.keys, producer or self.producer, self.publisher,
                      **options)

    def push(self, references: Sequence[str]) -> None:
        self.redis.lpush(self.keys.intake, *(intent(r) for r in references))

    def held(self, drainer: str) -> list[str]:
        return [json.loads(m)["reference"]
                for m in self.redis.lrange(self.keys.intake_taken(drainer), 0, -1)]

    def waiting(self) -> list[str]:
        """The intake, oldest first."""
        return [json.loads(m)["reference"] for m in self.redis.lrange(self.keys.intake, 0, -1)
                ][::-1]


@pytest.fixture
def world(ledger_store: LedgerStore) -> Iterator[World]:
    with Connection("memory://localhost/") as connection:
        yield World(ledger_store, connection)


class Chunks(Producer):
    """The producer, recording each chunk it is given; ``fail_at`` raises on that chunk."""

    def __init__(self, world: World, fail_at: int | None = None) -> None:
        super().__init__(world.ledger, world.dispatched.append, max_quantity=50,
                         dispatch_many=world.dispatched.extend)
        self.world, self.fail_at = world, fail_at
        self.chunks: list[list[str]] = []
        self.held_meanwhile: list[int] = []

    def take_in(self, messages: Sequence[str | bytes]) -> list[Submission]:
        self.chunks.append([json.loads(m)["reference"] for m in messages])
        self.held_meanwhile.append(taken_count(self.world.redis, self.world.keys))
        if len(self.chunks) == self.fail_at:
            raise ConnectionError("Redis went away")
        return super().take_in(messages)


def test_a_long_list_is_taken_in_chunks_oldest_first_each_held_until_taken_in(
        world: World) -> None:
    references = [f"c-{n:03d}" for n in range(25)]
    world.push(references)
    producer = Chunks(world)
    report = world.intake(producer, chunk=10).drain()
    assert report.accepted == 25
    assert producer.chunks == [references[:10], references[10:20], references[20:]]
    # While a chunk was being taken in, it (and only it) was in a processing list
    assert producer.held_meanwhile == [10, 10, 5]
    assert world.dispatched == references  # one fan-out per chunk, in order
    assert not list(world.redis.scan_iter(f"{world.keys.intake}:processing:*"))
    assert world.redis.zcard(world.keys.intake_drainers) == 0


def test_a_chunk_that_fails_goes_back_to_the_oldest_end_of_the_list(world: World) -> None:
    references = [f"f-{n:02d}" for n in range(25)]
    world.push(references)
    with pytest.raises(ConnectionError):
        world.intake(Chunks(world, fail_at=2), chunk=10).drain()
    # The first chunk was taken in; the second is back where it was, before the third
    assert world.waiting() == references[10:]
    assert world.ledger.get("f-00") is not None and world.ledger.get("f-10") is None
    report = world.intake(chunk=10).drain()
    assert (report.accepted, report.duplicates) == (15, 0)


def test_a_dead_drainers_chunk_is_taken_again_once_its_lease_has_lapsed(world: World) -> None:
    # Given two drainers that died holding a chunk each: one lease lapsed, one still running
    world.redis.rpush(world.keys.intake_taken("dead"), intent("d-2"), intent("d-1"))
    world.redis.rpush(world.keys.intake_taken("alive"), intent("a-1"))
    world.redis.zadd(world.keys.intake_drainers, {"dead": 1000, "alive": FAR_AHEAD})
    world.push(["n-1"])
    # When a drain runs
    report = world.intake().drain()
    # Then the lapsed one's chunk is taken in (before the newer message), the other's left
    assert report.accepted == 3
    assert world.dispatched == ["d-1", "d-2", "n-1"]
    assert world.held("dead") == [] and world.held("alive") == ["a-1"]
    assert world.redis.zrange(world.keys.intake_drainers, 0, -1) == [b"alive"]


def test_the_processing_list_of_the_one_drainer_before_is_taken_again_once_its_lock_is_gone(
        world: World) -> None:
    world.redis.rpush(world.keys.intake_processing, intent("old-1"))
    world.redis.set(world.keys.intake_lock, "an old drainer at work")
    assert world.intake().drain().total == 0
    world.redis.delete(world.keys.intake_lock)
    assert world.intake().drain().accepted == 1
    assert world.redis.llen(world.keys.intake_processing) == 0


def test_a_long_list_asks_for_helpers_and_never_more_than_the_bound(world: World) -> None:
    world.push([f"h-{n:03d}" for n in range(35)])
    # Given one drainer at work already, whose place counts
    world.redis.zadd(world.keys.intake_drainers, {"busy": FAR_AHEAD})
    sent: list[list[str]] = []
    outsiders: list[int] = []

    def send_helpers(drainers: list[str]) -> None:
        sent.append(drainers)
        outsiders.append(world.intake(chunk=10).drain().total)  # every place taken now

    # When a drain finds 35 waiting (4 chunks of 10)
    report = world.intake(chunk=10, budget=0).drain(send_helpers=send_helpers)
    # Then it asks for helpers, as many as the places left, and another drain stays out
    assert report.helpers == MAX_DRAINERS - 2
    [helpers] = sent
    assert len(helpers) == MAX_DRAINERS - 2
    assert outsiders == [0]
    # And with the places full again, a helper still takes its reserved place
    world.redis.zadd(world.keys.intake_drainers, {"busy-2": FAR_AHEAD})
    assert world.intake(chunk=10).drain().total == 0
    assert world.intake(chunk=10).drain(drainer=helpers[0]).accepted == 35


def test_a_short_list_asks_for_no_helper(world: World) -> None:
    world.push([f"s-{n}" for n in range(10)])
    sent: list[list[str]] = []
    assert world.intake(chunk=10).drain(send_helpers=sent.append).accepted == 10
    assert sent == []


def test_a_drain_goes_on_alone_when_the_broker_refuses_its_helpers(world: World) -> None:
    world.push([f"b-{n:02d}" for n in range(25)])

    def refused(drainers: list[str]) -> None:
        raise OperationalError("[Errno 111] Connection refused")

    report = world.intake(chunk=10).drain(send_helpers=refused)
    assert (report.accepted, report.helpers) == (25, 0)

