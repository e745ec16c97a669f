"""The intake for any language, end to end: real Redis, real workers and beat, the sandbox.

A long Redis list is taken in by several drainers at once, and every plain JSON intent
published to the RabbitMQ intake queue by a plain AMQP client is taken in the same way:
each valid intent gets one outcome, each invalid message one failure with its reason.
A chunk of the queue is acknowledged only once it is taken in.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import amqp
import pytest
import redis
from kombu import Connection

from fulfilment.harness.cluster import Cluster
from fulfilment.harness.intents import auto_seat_intents
from fulfilment.harness.processes import wait_for
from fulfilment.intake import Intake
from fulfilment.intake_queue import QueueIntake
from fulfilment.keys import Keys
from fulfilment.ledger import Ledger
from fulfilment.producer import Producer, Submission
from fulfilment.results import ResultPublisher, consume_failures
from fulfilment.topology import QUORUM, Topology
from fulfilment.wiring import broker_connection
from tests.deployment import deployment

pytestmark = pytest.mark.integration


def messages(tag: str, valid: int, invalid: int) -> tuple[list[str], list[str], set[str]]:
    """Plain JSON messages, one invalid in every few; the invalid ones, the valid references."""
    good = [json.dumps(d) for d in auto_seat_intents(tag, valid)]
    bad = [json.dumps({"reference": f"{tag}-bad-{n}", "items": []}) if n % 2
           else f"{tag} not json {n}" for n in range(invalid)]
    mixed = list(good)
    step = len(good) // (invalid + 1)
    for n, message in enumerate(bad):
        mixed.insert((n + 1) * step + n, message)
    return mixed, bad, {d["reference"] for d in auto_seat_intents(tag, valid)}


def check_outcomes(cluster: Cluster, valid: set[str], bad: Sequence[str]) -> None:
    """Each valid intent: one outcome, confirmed; each invalid message: one failure."""
    cluster.collect(valid, timeout=400)
    statuses = cluster.assert_exactly_once(valid)
    assert statuses == Counter({"confirmed": len(valid)})
    failures: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    with broker_connection(cluster.settings) as connection:
        # Read to the end each time (each acknowledged), then 2 s more: none comes twice
        while len(failures) < len(bad) and time.monotonic() < deadline:
            failures += consume_failures(connection, cluster.topology, timeout=0.2,
                                         idle_timeout=2.0)
    assert Counter(f["payload"] for f in failures) == Counter(bad)
    reasons = {f["reason"] for f in failures}
    assert reasons == {"invalid purchase intent"}, reasons


class Drainers:
    """Samples, from a thread, how many drainers hold a chunk at once."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.most = 0
        self._client, self._keys = client, keys
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        pattern = f"{self._keys.intake}:processing:*"
        while not self._stop.is_set():
            holding = sum(1 for key in self._client.scan_iter(pattern, count=1000)
                          if self._client.llen(key))
            self.most = max(self.most, holding)
            self._stop.wait(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def cluster(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    with deployment(tmp_path, redis_url, prefix, intake_interval=0.5) as running:
        yield running


def test_a_long_list_is_taken_in_by_several_drainers_each_intent_once(
        cluster: Cluster, redis_client: redis.Redis) -> None:
    # Given two workers and beat
    workers = [cluster.start_worker(concurrency=8, pool="threads") for _ in range(2)]
    for worker in workers:
        wait_for(lambda w=worker: "ready." in w.output(), timeout=60,  # type: ignore[misc]
                 what="a worker")
    sampling = Drainers(redis_client, cluster.keys)
    # When a backend pushes a few thousand plain JSON intents at once, some invalid
    mixed, bad, valid = messages("long", 2_200, 200)
    pipe = redis_client.pipeline(transaction=False)
    for start in range(0, len(mixed), 500):
        pipe.lpush(cluster.keys.intake, *mixed[start:start + 500])
    pipe.execute()
    cluster.start_beat()
    try:
        # Then the list is taken in by more than one drainer at once
        wait_for(lambda: redis_client.llen(cluster.keys.intake) == 0, timeout=120,
                 what="the intake list to be taken")
        wait_for(lambda: redis_client.zcard(cluster.keys.intake_drainers) == 0, timeout=60,
                 what="the drainers to finish")
    finally:
        sampling.stop()
    assert sampling.most >= 2, sampling.most
    assert not list(redis_client.scan_iter(f"{cluster.keys.intake}:processing*"))
    # And each valid intent has one outcome, each invalid message one failure
    check_outcomes(cluster, valid, bad)



def publish_plainly(url: str, queue: str, bodies: Sequence[str]) -> None:
    """As any AMQP client would: declare the queue as documented, publish with confirms."""
    connection = Connection(url)
    info: Any = connection.info()
    with amqp.Connection(f"{info['hostname']}:{info['port']}", userid=info["userid"],
                         password=info["password"], virtual_host=info["virtual_host"],
                         confirm_publish=True) as plain:
        channel = plain.channel()
        channel.queue_declare(queue, durable=True, auto_delete=False, arguments=QUORUM)
        for body in bodies:
            channel.basic_publish(amqp.Message(body, delivery_mode=2,
                                               content_type="application/json"),
                                  exchange="", routing_key=queue)
    connection.release()


def test_plain_json_published_to_the_rabbitmq_intake_queue_is_taken_in(
        redis_url: str, prefix: str, tmp_path: Path, rabbitmq: str) -> None:
    with deployment(tmp_path, redis_url, prefix, broker_url=rabbitmq,
                    intake_interval=0.5) as cluster:
        # Given a worker and beat on RabbitMQ
        worker = cluster.start_worker(concurrency=8, pool="threads")
        wait_for(lambda: "ready." in worker.output(), timeout=60, what="the worker")
        cluster.start_beat()
        # When a plain AMQP client publishes plain JSON intents to the intake queue
        mixed, bad, valid = messages("amqp", 1_100, 40)
        publish_plainly(rabbitmq, cluster.keys.intake_queue, mixed)
        # Then each valid one has one outcome, each invalid one failure, and nothing is left
        check_outcomes(cluster, valid, bad)
        wait_for(lambda: cluster.queued(cluster.keys.intake_queue) == 0, timeout=30,
                 what="the intake queue to be empty")


class FailingOnce(Producer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def take_in(self, messages: Sequence[str | bytes]) -> list[Submission]:
        self.calls += 1
        if self.calls == 1:
            raise redis.ConnectionError("Redis went away mid-chunk")
        return super().take_in(messages)


def test_a_chunk_of_the_intake_queue_is_acknowledged_only_once_taken_in(
        redis_client: redis.Redis, prefix: str, rabbitmq: str) -> None:
    keys = Keys(prefix)
    topology = Topology.for_keys(keys, rabbitmq)
    mixed, _, valid = messages("ack", 30, 0)
    publish_plainly(rabbitmq, keys.intake_queue, mixed)
    dispatched: list[str] = []
    producer = FailingOnce(Ledger(redis_client, keys, 3600), dispatched.append,
                           max_quantity=50, dispatch_many=dispatched.extend)
    with Connection(rabbitmq) as connection:
        intake = Intake(redis_client, keys, producer,
                        ResultPublisher(connection, topology))

        def ready() -> int:
            channel: Any = connection.channel()
            try:
                return int(channel.queue_declare(keys.intake_queue, passive=True).message_count)
            finally:
                channel.close()

        # When a drainer takes the chunk and fails before it is admitted
        with pytest.raises(redis.ConnectionError), QueueIntake(connection, topology) as queue:
            intake.drain(queue=queue)
        # Then every message is back on the queue
        wait_for(lambda: ready() == len(mixed), timeout=10, what="the chunk back on the queue")
        assert dispatched == []
        # And the next drain takes it in, and only then is it gone
        with QueueIntake(connection, topology) as queue:
            report = intake.drain(queue=queue)
        assert report.accepted == len(valid)
        assert set(dispatched) == valid
        assert ready() == 0
        channel: Any = connection.channel()
        channel.queue_delete(keys.intake_queue)
