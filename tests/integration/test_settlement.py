"""Unsettled intents settle by themselves, end to end, and have a route of their own.

A real worker with celery beat, the sandbox as a process over HTTP, real Redis
(ledger and broker). A confirm Onebox did but whose answer was lost, with the
orders-management read refused (403), ends ``unsettled``; beat reads it again
on its schedule (``FULFILMENT_SETTLE_FIRST`` of a second here), and once the
sandbox answers reads again the final outcome follows with the same
``result_id``: no operator, no webhook. Shops' queues bound to one route each
show who gets what: a failures-only binding never sees ``unsettled``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Queue

from fulfilment.harness.cluster import Cluster
from fulfilment.harness.processes import wait_for
from fulfilment.keys import Keys
from fulfilment.results import ResultPublisher, consume_results
from fulfilment.topology import QUORUM, Topology, is_amqp
from fulfilment.unsettled import UnsettledIndex
from fulfilment.wiring import broker_connection
from schemas.result import OrderResult, ResultError, result_id_for
from tests.deployment import deployment
from tests.integration.test_operator_commands import fulfilment

pytestmark = pytest.mark.integration

ROUTES = ("result.failed", "result.unsettled", "result.confirmed")


def shop_queues(topology: Topology, prefix: str, amqp: bool) -> dict[str, Queue]:
    """A shop's queue per route, each bound to that route only (declared on use)."""
    return {route: Queue(f"{prefix}.shop.{route}", topology.results_exchange,
                         routing_key=route, durable=True,
                         queue_arguments=dict(QUORUM) if amqp else None)
            for route in ROUTES}


def bind(connection: Any, queues: dict[str, Queue]) -> None:
    channel = connection.channel()
    try:
        for queue in queues.values():
            queue.bind(channel).declare()
    finally:
        channel.close()


def held(connection: Any, queue: Queue) -> int:
    """Messages ready on ``queue``, without taking any (as ``Cluster.queued`` counts)."""
    channel: Any = connection.channel()
    try:
        if not is_amqp(connection.as_uri()):
            return int(channel._size(queue.name))
        return int(channel.queue_declare(queue=queue.name, passive=True).message_count)
    finally:
        channel.close()


def drained(connection: Any, queue: Queue) -> list[str]:
    """The statuses of the results on ``queue``, each taken and acknowledged."""
    statuses = []
    with connection.SimpleQueue(queue) as simple:
        for _ in range(held(connection, queue)):
            message = simple.get(block=True, timeout=10)
            statuses.append(message.payload["status"])
            message.ack()
    return statuses


@pytest.fixture
def cluster(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    # Reads of an unsettled intent a second after, then 2, 4 s...; beat every second;
    # two attempts, so a refused read ends the purchase unsettled at once.
    with deployment(tmp_path, redis_url, prefix, settle_first=1.0, sweep_interval=1.0,
                    intake_interval=1.0, retry_max_attempts=2) as running:
        yield running


def next_result(cluster: Cluster, reference: str, *, timeout: float) -> OrderResult:
    """The next result for ``reference`` on the results queue (others are kept)."""
    seen = len(cluster.results.get(reference, []))
    deadline = time.monotonic() + timeout
    with broker_connection(cluster.settings) as connection:
        while len(cluster.results.get(reference, [])) <= seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no new result for {reference}\n{cluster.worker_logs()}")
            for result in consume_results(connection, cluster.topology, timeout=0.2,
                                          idle_timeout=min(remaining, 1.0)):
                cluster.results.setdefault(result.reference, []).append(result)
    return cluster.results[reference][seen]


def test_an_unsettled_intent_settles_by_itself_once_onebox_answers_reads_again(
        cluster: Cluster, redis_client: Any) -> None:
    from tasks import submit

    # Given a shop's queues bound to one route each, a confirm whose answer is
    # lost, and Onebox refusing to show orders (403), as for a token without the
    # orders scope
    with broker_connection(cluster.settings) as connection:
        shop = shop_queues(cluster.topology, cluster.settings.key_prefix, cluster.on_rabbitmq)
        bind(connection, shop)
    cluster.sandbox.admin.set_faults({"endpoints": {"confirm": {"script": ["lost_response"]}}})
    cluster.sandbox.admin.configure(orders_mgmt_read="403")
    cluster.start_worker(beat=True)
    reference = "settle-1"
    submit({"reference": reference, "batch": "settle-b", "buyer": {"email": "ana@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]})
    # When the purchase ends: unsettled, with the order code
    unsettled = next_result(cluster, reference, timeout=60)
    assert unsettled.status == "unsettled" and unsettled.order_code, unsettled
    # And beat has read it again on its schedule while Onebox still refuses
    index = UnsettledIndex(redis_client, Keys(cluster.settings.key_prefix))
    wait_for(lambda: (found := index.get(reference)) is not None and found.checks >= 1,
             timeout=30, what="a scheduled read of the unsettled intent")
    listed = fulfilment(cluster, "unsettled", "--json")
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert listed.returncode == 0 and row["reference"] == reference, listed.stderr
    assert row["order_code"] == unsettled.order_code and "(HTTP 403)" in row["last_answer"]
    assert "ana@example.com" not in listed.stdout
    assert cluster.sandbox.admin.audit()["confirmed"][reference] == [unsettled.order_code]
    # When Onebox answers reads again, with nobody on call
    cluster.sandbox.admin.configure(orders_mgmt_read="ok")
    # Then the final outcome follows by itself, with the same result_id
    final = next_result(cluster, reference, timeout=60)
    assert final.status == "confirmed" and final.result_id == unsettled.result_id
    assert final.order_code == unsettled.order_code
    wait_for(lambda: index.waiting().count == 0, timeout=10, what="the index to empty")
    # And each shop queue got what its route says: never "unsettled" on result.failed
    with broker_connection(cluster.settings) as connection:
        got = {route: drained(connection, queue) for route, queue in shop.items()}
    assert got == {"result.failed": [], "result.unsettled": ["unsettled"],
                   "result.confirmed": ["confirmed"]}
    assert cluster.sandbox.admin.audit()["confirmed"][reference] == [unsettled.order_code]


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_failures_only_binding_never_receives_an_unsettled_result(
        broker: str, redis_url: str, prefix: str, request: pytest.FixtureRequest) -> None:
    # Given a shop's queue bound to result.failed only, and the results queue (result.#)
    url = redis_url if broker == "redis" else str(request.getfixturevalue("rabbitmq"))
    from fulfilment.config import Settings

    settings = Settings.defaults().with_overrides(redis_url=redis_url, broker_url=url,
                                                  key_prefix=prefix)
    topology = Topology.for_keys(Keys(prefix), url)
    shop = shop_queues(topology, prefix, is_amqp(url))
    with broker_connection(settings) as connection:
        bind(connection, shop)
        try:
            # When one result of each status is published
            publisher = ResultPublisher(connection, topology)
            for status in ("unsettled", "failed", "confirmed"):
                publisher.publish(OrderResult(
                    result_id=result_id_for(f"r-{status}"), reference=f"r-{status}",
                    status=status, order_code="C1" if status != "failed" else None,
                    error=None if status == "confirmed"
                    else ResultError(code="X", message="x", step="confirm", retryable=False)))
            # Then each route's queue holds its own status only; the results queue all three
            got = {route: drained(connection, queue) for route, queue in shop.items()}
            assert got == {"result.failed": ["failed"], "result.unsettled": ["unsettled"],
                           "result.confirmed": ["confirmed"]}
            assert sorted(drained(connection, topology.results_queue)) == \
                ["confirmed", "failed", "unsettled"]
        finally:
            channel: Any = connection.channel()
            for queue in [*shop.values(), topology.results_queue]:
                try:
                    channel.queue_delete(queue.name)
                except connection.channel_errors:
                    channel = connection.channel()
