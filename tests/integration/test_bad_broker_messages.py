"""Bad input on every queue of a real worker: each goes to the failures queue with its
reason, the worker keeps going (the same process, never restarted), and a good intent after
them is confirmed."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Exchange, Queue

from fulfilment.harness.cluster import Cluster
from fulfilment.harness.processes import wait_for
from fulfilment.results import FAILURE_PAYLOAD_LIMIT
from fulfilment.wiring import broker_connection
from tests.deployment import deployment

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    with deployment(tmp_path, redis_url, prefix) as running:
        yield running


def intent(reference: str, **extra: Any) -> dict[str, Any]:
    return {"reference": reference, "buyer": {"email": "ana@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}], **extra}


def test_bad_task_messages_and_bad_intake_messages_go_to_the_failures_queue(
        cluster: Cluster, redis_client: redis.Redis) -> None:
    from tasks import submit

    worker = cluster.start_worker(concurrency=1, beat=True)
    wait_for(lambda: "ready" in worker.output(), timeout=60, what="the worker to be ready")
    task_queue = cluster.keys.task_queue
    # Given, on the task queue: an item that is not a broker message at all (it stopped
    # kombu 5.7's worker), a body that is not JSON, a text body, an unknown task, a message
    # without a task name, and a known task whose body is not [args, kwargs, embed] (it
    # stopped the worker too)
    redis_client.lpush(f"{cluster.settings.key_prefix}:broker:{task_queue}", "not a message")
    exchange = Exchange(task_queue, type="direct")
    queue = Queue(task_queue, exchange, routing_key=task_queue)
    with broker_connection(cluster.settings) as connection, connection.Producer() as producer:
        def send(body: Any, **options: Any) -> None:
            producer.publish(body, exchange=exchange, routing_key=task_queue, declare=[queue],
                             **options)

        send("{not json", content_type="application/json", content_encoding="utf-8",
             serializer=None)
        send("hello", content_type="text/plain", content_encoding="utf-8")
        send([["x"], {}, {}], serializer="json",
             headers={"task": "fulfilment.no_such_task", "id": str(uuid.uuid4())})
        send({"a": 1}, serializer="json")
        send([1, 2], serializer="json",
             headers={"task": "fulfilment.basket", "id": str(uuid.uuid4())})
    # And on the Redis-list intake: not JSON, not an intent, too large, a schema version
    # from the future
    redis_client.lpush(cluster.keys.intake, "not json", json.dumps({"hello": "world"}),
                       "x" * (FAILURE_PAYLOAD_LIMIT + 100),
                       json.dumps(intent("future-1", schema_version=2)))
    # When a good intent follows them
    submit(intent("after-bad-1"))
    # Then every bad one is on the failures queue with its reason
    failures = cluster.collect_failures(10, timeout=60)
    reasons = sorted(failure["reason"] for failure in failures)
    assert reasons == sorted([
        "not a broker message (JSONDecodeError)",
        "task message body cannot be decoded (DecodeError)",
        "task message body cannot be decoded (ContentDisallowed)",
        "unknown task 'fulfilment.no_such_task'",
        "not a task message (no task name)",
        "task message body is not [args, kwargs, embed]",
        *["invalid purchase intent"] * 4]), reasons
    big = next(f for f in failures if f.get("payload_truncated"))
    assert len(big["payload"]) == FAILURE_PAYLOAD_LIMIT
    assert any("schema_version" in json.dumps(f["errors"]) for f in failures)
    # And the good one is bought by the same worker process, never restarted
    assert cluster.collect({"after-bad-1"})["after-bad-1"].status == "confirmed"
    assert worker.alive() and "Unrecoverable error" not in worker.output()
    # And no payload reached the log (the buyer's data could be in one)
    assert "not a message" not in worker.output() and "{not json" not in worker.output()
