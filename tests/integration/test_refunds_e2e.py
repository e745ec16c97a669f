"""Refunds end to end: a real worker process, the sandbox over HTTP, real Redis.

One deployment for the module (Redis as the broker: the refund task rides the
continue queue every worker already serves, and the broker-specific paths are
the purchase tests' business). Each test buys what it refunds.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fulfilment.harness.cluster import Cluster, _child_env, env_for
from fulfilment.results import consume_refund_results
from fulfilment.wiring import broker_connection
from schemas.refund import RefundResult
from tests import services
from tests.deployment import deployment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    redis_url = services.redis_url()
    prefix = services.unique_prefix()
    tmp = tmp_path_factory.mktemp("refunds")
    try:
        with deployment(tmp, redis_url, prefix, retry_deadline=60, onebox_read_timeout=2.0,
                        lease_ttl=3.0) as running:
            running.start_worker()
            yield running
    finally:
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def buy(cluster: Cluster, reference: str, *seat_ids: int) -> tuple[str, list[str]]:
    """A confirmed purchase of these seats of session 1001: its order code and item ids."""
    from tasks import submit

    intent = {"reference": reference, "buyer": {"email": f"{reference}@example.com"},
              "items": [{"seats": [{"id": seat, "session_id": 1001} for seat in seat_ids]}]}
    assert submit(intent).status == "accepted"
    result = cluster.collect({reference})[reference]
    assert result.status == "confirmed" and result.order_code
    read = cluster.sandbox.admin.audit()["confirmed"][reference]
    assert read == [result.order_code]
    order = _order_items(cluster, result.order_code)
    return result.order_code, order


def _order_items(cluster: Cluster, code: str) -> list[str]:
    from fulfilment.onebox import build_client
    from fulfilment.wiring import redis_client

    client = build_client(cluster.settings, redis_client(cluster.settings))
    try:
        return [str(item.id) for item in client.get_order(code).items]
    finally:
        client.close()


def collect_refunds(cluster: Cluster, count: int, *, timeout: float = 60.0,
                    quiet: float = 1.0) -> list[RefundResult]:
    """Refund outcomes until ``count`` came, then ``quiet`` seconds more for any extra."""
    found: list[RefundResult] = []
    deadline = time.monotonic() + timeout
    with broker_connection(cluster.settings) as connection:
        while len(found) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{len(found)} of {count} refund outcomes\n"
                                     f"{cluster.worker_logs()}")
            found += consume_refund_results(connection, cluster.topology, timeout=0.2,
                                            idle_timeout=min(remaining, 2.0), limit=count)
        # Anything more would be a second outcome: none may come.
        found += consume_refund_results(connection, cluster.topology, timeout=0.2,
                                        idle_timeout=quiet)
    return found


def refunded_once(audit: dict[str, Any], code: str, items: list[str]) -> None:
    assert audit["refunded"].get(code) == dict.fromkeys(items, 1), audit["refunded"]
    assert audit["refunded_twice"] == 0


def test_a_refund_whose_answer_is_lost_is_read_back_and_refunds_once(cluster: Cluster) -> None:
    from tasks import refund

    # Given a confirmed purchase, and a sandbox that does the next refund but loses its
    # answer, and that would refund an item twice if asked twice (no 409 to hide it)
    code, items = buy(cluster, "lost-1", 101, 102)
    admin = cluster.sandbox.admin
    admin.configure(repeat_refund="again")
    admin.set_faults({"endpoints": {"refund": {"script": ["lost_response"]}}})
    calls_before = admin.audit()["requests"].get("refund", 0)
    try:
        # When the purchase is refunded
        submission = refund("lost-1")
        outcomes = collect_refunds(cluster, 1)
    finally:
        admin.configure(repeat_refund="conflict")
    # Then one refunded outcome, Onebox refunded each item once, and the refund was
    # sent once: the lost answer was read back, never sent again
    assert [(o.status, o.refund_id) for o in outcomes] == [("refunded", submission.refund_id)]
    assert outcomes[0].order_code == code and list(map(str, outcomes[0].items)) == items
    audit = admin.audit()
    refunded_once(audit, code, items)
    assert audit["faults"]["refund"] == {"lost_response": 1}
    assert audit["requests"]["refund"] - calls_before == 1
    assert "read back order" in "".join(w.output() for w in cluster.workers)
    # And the seats are on sale again
    seats = admin.inventory(1001)["seats"]
    assert (seats["101"], seats["102"]) == ("FREE", "FREE")


def test_a_refund_asked_for_twice_is_one_refund(cluster: Cluster, tmp_path: Path) -> None:
    from tasks import refund

    code, items = buy(cluster, "twice-1", 111, 112)
    admin = cluster.sandbox.admin
    conflicts_before = admin.audit()["refund_conflicts"]
    # When the same refund is asked for twice (same id), then once more with another id
    # from the command line, waiting for its outcome
    first = refund("twice-1", refund_id="twice-1-r1")
    second = refund("twice-1", refund_id="twice-1-r1")
    assert second.refund_id == first.refund_id
    done = subprocess.run(
        [sys.executable, "-m", "tasks.commands", "refund", "twice-1", "--id", "twice-1-r2",
         "--wait", "--wait-timeout", "60"],
        capture_output=True, text=True, env=_child_env(env_for(cluster.settings)), timeout=90,
        check=False)
    (tmp_path / "refund-cli.txt").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr + cluster.worker_logs()
    assert "refund twice-1-r2 of purchase twice-1 (whole order): accepted, queued" in done.stdout
    assert f"refunded: order {code}, items {', '.join(items)}" in done.stdout
    # Then one outcome per refund id, both refunded, and one refund at Onebox
    outcomes = collect_refunds(cluster, 2)
    assert sorted((o.refund_id, o.status) for o in outcomes) == [
        ("twice-1-r1", "refunded"), ("twice-1-r2", "refunded")]
    audit = admin.audit()
    refunded_once(audit, code, items)
    already = {o.refund_id: o.already_refunded for o in outcomes}
    # Whichever reached Onebox second was told "already refunded" (409): a success
    assert sorted(already.values()) == [False, True]
    assert audit["refund_conflicts"] - conflicts_before == 1


def test_a_purchase_that_failed_cannot_be_refunded(cluster: Cluster) -> None:
    from fulfilment.refunds import RefundRefusedError
    from tasks import refund

    with pytest.raises(RefundRefusedError, match="no purchase never-bought"):
        refund("never-bought")


def test_refund_messages_on_the_queue_are_validated(cluster: Cluster) -> None:
    from tasks.refunds import refund_task

    code, items = buy(cluster, "queued-1", 121)
    # Given a producer that puts refund requests on the queue itself: one bad, one good
    refund_task.apply_async(args=({"reference": "queued-1", "order_code": code},))
    refund_task.apply_async(args=({"order_code": code, "refund_id": "queued-1-r",
                                   "metadata": {"ticket": 5}},))
    # Then the bad one is on the failures queue with its reason, the good one refunded
    failure = cluster.collect_failures(1)[-1]
    assert failure["reason"] == "invalid refund request"
    assert "_schema" in failure["errors"]
    outcome, = collect_refunds(cluster, 1)
    assert (outcome.refund_id, outcome.status, outcome.metadata) == (
        "queued-1-r", "refunded", {"ticket": 5})
    refunded_once(cluster.sandbox.admin.audit(), code, items)
