"""A shop's callback endpoint down for a while: purchases go on, and once it is back it
gets every outcome, signed, each result once at least and one distinct outcome per result.

Real worker process (with beat), the sandbox as a process, real Redis (ledger and broker),
and a real HTTP endpoint on loopback that refuses connections, then answers 503, then
comes back. ``FULFILMENT_TEST_CALLBACK_DOWN`` sets how long it is down (seconds; CI keeps
it short, a demonstration run uses 60).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fulfilment.callbacks import RESULT_ID_HEADER, SIGNATURE_HEADER, backlog, verify
from fulfilment.harness.callback_endpoint import CallbackEndpoint, callback_endpoint
from fulfilment.harness.cluster import Cluster
from fulfilment.harness.processes import wait_for
from fulfilment.health import check_health
from tests.deployment import deployment

pytestmark = pytest.mark.integration

SECRET = "e2e-callback-secret-0123456789"
DOWN = float(os.environ.get("FULFILMENT_TEST_CALLBACK_DOWN", "12"))
INTENTS = 6


@pytest.fixture
def endpoint() -> Iterator[CallbackEndpoint]:
    with callback_endpoint() as running:
        yield running


@pytest.fixture
def cluster(redis_url: str, prefix: str, tmp_path: Path,
            endpoint: CallbackEndpoint) -> Iterator[Cluster]:
    with deployment(tmp_path, redis_url, prefix, callback_url=endpoint.url,
                    callback_secret=SECRET, callback_allow="127.0.0.1",
                    callback_max_delay=2.0, callback_interval=0.5,
                    callback_timeout=2.0) as running:
        yield running


def intent(reference: str) -> dict[str, Any]:
    return {"reference": reference, "shop": "shop-a",
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}],
            "buyer": {"email": f"{reference}@example.com"}}


def test_an_endpoint_down_gets_every_outcome_once_back_and_purchases_went_on(
        cluster: Cluster, endpoint: CallbackEndpoint, redis_client: redis.Redis) -> None:
    from tasks import submit_many

    # Given a worker running beat, and the shop's endpoint refusing connections
    endpoint.down("closed")
    went_down = time.monotonic()
    cluster.start_worker(concurrency=2, beat=True)
    # When intents are bought while it is down
    references = {f"cb-{i}" for i in range(INTENTS)}
    submissions = list(submit_many([intent(r) for r in sorted(references)]))
    assert {s.status for s in submissions} == {"accepted"}, submissions
    # Then every purchase finishes and is on the results queue, the endpoint still down
    results = cluster.collect(references, timeout=120)
    assert cluster.assert_exactly_once(references) == {"confirmed": INTENTS}
    assert endpoint.mode == "closed" and endpoint.snapshot() == []
    finished_down = time.monotonic() - went_down
    # And the callbacks wait in Redis, the endpoint is seen failing (health, backlog)
    keys = cluster.keys
    wait_for(lambda: backlog(redis_client, keys, time.time()).failing, timeout=30,
             what="the endpoint seen failing")
    halfway = went_down + DOWN / 2
    wait_for(lambda: time.monotonic() >= halfway, timeout=DOWN, what="half the down time")
    endpoint.down("503")  # answering, but 503: the other kind of down
    wait_for(lambda: endpoint.refused > 0, timeout=DOWN + 10, what="a 503 answered")
    health = check_health(cluster.settings, onebox=False)
    callbacks = next(c for c in health.checks if c.name == "callbacks")
    assert callbacks.data["pending"] == INTENTS, callbacks
    assert list(callbacks.data["failing"]) == [f"http://127.0.0.1:{endpoint.port}"], callbacks
    wait_for(lambda: time.monotonic() >= went_down + DOWN, timeout=DOWN, what="the down time")
    # When it is back
    endpoint.up()
    back = time.monotonic()
    expected = {r.result_id: r for r in results.values()}

    def delivered() -> bool:
        ids = {got.headers[RESULT_ID_HEADER] for got in endpoint.snapshot()}
        return ids >= expected.keys()

    wait_for(delivered, timeout=60, what="every outcome delivered to the endpoint")
    caught_up = time.monotonic() - back
    # Then each was delivered signed, with its own result and one distinct outcome per result
    received = endpoint.snapshot()
    by_result: dict[str, set[str]] = {}
    for got in received:
        assert verify(SECRET, got.headers[SIGNATURE_HEADER], got.body, tolerance=600)
        body = json.loads(got.body)
        assert body["result_id"] == got.headers[RESULT_ID_HEADER]
        assert body["result"] == json.loads(json.dumps(body["result"]))
        by_result.setdefault(body["result_id"], set()).add(body["status"])
        assert body["result"]["order_code"] == expected[body["result_id"]].order_code
    assert by_result.keys() == expected.keys()
    assert all(statuses == {"confirmed"} for statuses in by_result.values()), by_result
    # And nothing is left waiting; the endpoint is no longer held
    wait_for(lambda: backlog(redis_client, keys, time.time()).pending == 0, timeout=10,
             what="the outbox empty")
    assert not backlog(redis_client, keys, time.time()).failing
    print("\n" + next(line for line in health.lines() if line.startswith("callbacks")))
    print(f"callbacks: endpoint down {DOWN:.0f} s ({endpoint.refused} tries answered 503); "
          f"{INTENTS} purchases finished {finished_down:.1f} s after it went down; "
          f"all {len(expected)} outcomes delivered {caught_up:.1f} s after it came back "
          f"({len(received)} POSTs received)")
