"""Lanes and fair shares end to end: real Redis, real worker processes, the sandbox at 20 ms.

- a live intent overtakes a bulk file queued before it (both brokers);
- two shops' uploads progress together, and the broker never holds more than
  the in-flight bound of bulk messages (both brokers);
- a worker killed while the broker loses what it held loses no intent: the
  waiting ones stay in Redis, the released ones are resumed (Redis broker).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import redis

from fulfilment.harness.cluster import Cluster
from fulfilment.harness.processes import wait_for
from fulfilment.release import waiting
from schemas.result import OrderResult
from tests.deployment import deployment

pytestmark = pytest.mark.integration

LATENCY_MS = 20
#: Bound of the bulk in flight in the fair-share and kill tests (small beside the files).
BOUND = 4




def intent(reference: str, **extra: Any) -> dict[str, Any]:
    return {"reference": reference, "buyer": {"email": f"{reference}@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}], **extra}


def submit_bulk(references: list[str], **extra: Any) -> None:
    from tasks import submit_many

    answers = list(submit_many([intent(r, **extra) for r in references]))
    assert {(a.status, a.lane) for a in answers} == {("accepted", "bulk")}, answers[:3]


def outcomes_so_far(cluster: Cluster, batch: str) -> int:
    from tasks import batch_status

    return batch_status(batch).outcomes


def finished_before(results: dict[str, OrderResult], references: list[str],
                    moment: OrderResult) -> int:
    assert moment.finished_at is not None
    return sum(1 for r in references
               if (f := results[r].finished_at) is not None and f < moment.finished_at)


def test_a_live_intent_overtakes_a_bulk_file_queued_before_it(
        redis_url: str, broker_url: str, prefix: str, tmp_path: Path) -> None:
    # Given one worker (2 threads) and a bulk file of 150 intents all sent to the
    # broker (an in-flight bound above the file's size: only the lanes keep the
    # live intent ahead here, not flow control)
    with deployment(tmp_path, redis_url, prefix, broker_url=broker_url,
                    bulk_in_flight=1000, retry_deadline=300) as cluster:
        cluster.sandbox.admin.set_faults({"endpoints": {"*": {"latency_ms": LATENCY_MS}}})
        cluster.start_worker(concurrency=2, pool="threads")
        bulk = [f"bulk-{n}" for n in range(150)]
        submit_bulk(bulk, batch="file")
        wait_for(lambda: outcomes_so_far(cluster, "file") >= 4, timeout=60,
                 what="the bulk file under way")
        # When a checkout submits one intent (live: the default of submit)
        from tasks import submit

        checkout = submit(intent("checkout-1"))
        assert (checkout.status, checkout.lane) == ("accepted", "live")
        results = cluster.collect({*bulk, "checkout-1"}, timeout=300)
    # Then its outcome came while most of the file was still waiting
    ahead = finished_before(results, bulk, results["checkout-1"])
    assert ahead < len(bulk) // 3, f"{ahead} bulk outcomes came before the live one"
    assert results["checkout-1"].status == "confirmed"


def test_two_shops_uploads_progress_together_and_the_broker_stays_shallow(
        redis_url: str, broker_url: str, prefix: str, tmp_path: Path) -> None:
    # Given one worker (2 threads), at most 4 bulk intents in flight, and shop A's
    # upload of 120 under way
    with deployment(tmp_path, redis_url, prefix, broker_url=broker_url,
                    bulk_in_flight=BOUND, retry_deadline=300) as cluster:
        cluster.sandbox.admin.set_faults({"endpoints": {"*": {"latency_ms": LATENCY_MS}}})
        cluster.start_worker(concurrency=2, pool="threads")
        shop_a = [f"a-{n}" for n in range(120)]
        submit_bulk(shop_a, batch="shop-a-file", shop="shop-a")
        wait_for(lambda: outcomes_so_far(cluster, "shop-a-file") >= 4, timeout=60,
                 what="shop A's upload under way")
        # When shop B uploads 12 intents
        shop_b = [f"b-{n}" for n in range(12)]
        submit_bulk(shop_b, batch="shop-b-file", shop="shop-b")
        # Then, while both run, the broker holds no more than the bound of bulk messages
        depths: list[int] = []

        def shop_b_done() -> bool:
            depths.append(cluster.queued(cluster.keys.task_queue))
            return outcomes_so_far(cluster, "shop-b-file") >= len(shop_b)

        wait_for(shop_b_done, timeout=120, what="shop B's upload done", interval=0.2)
        results = cluster.collect({*shop_a, *shop_b}, timeout=300)
    assert max(depths) <= BOUND, depths
    # And shop B was done long before shop A: most of A's file came after B's last outcome
    last_b = max((results[r] for r in shop_b), key=lambda r: r.finished_at or 0)
    a_after = len(shop_a) - finished_before(results, shop_a, last_b)
    assert a_after > len(shop_a) // 2, f"only {a_after} of shop A's came after shop B's last"
    assert {results[r].shop for r in shop_b} == {"shop-b"}  # echoed in the result


def test_a_killed_worker_and_a_broker_that_lost_its_messages_lose_no_intent(
        redis_url: str, prefix: str, tmp_path: Path) -> None:
    # Given 40 bulk intents, at most 4 in flight, a worker at work
    with deployment(tmp_path, redis_url, prefix, bulk_in_flight=BOUND, retry_deadline=300,
                    visibility_timeout=20, task_soft_time_limit=8, task_time_limit=10,
                    stuck_after=4, sweep_interval=2, release_interval=1) as cluster:
        cluster.sandbox.admin.set_faults({"endpoints": {"*": {"latency_ms": LATENCY_MS}}})
        first = cluster.start_worker(concurrency=2, pool="threads")
        references = [f"k-{n}" for n in range(40)]
        submit_bulk(references, batch="kill")
        wait_for(lambda: outcomes_so_far(cluster, "kill") >= 6, timeout=60,
                 what="the upload under way")
        # When the worker is killed and the broker loses every message it held
        # (the released intents' chains, and the killed worker's unacknowledged ones)
        first.kill(signal.SIGKILL)
        first.process.wait(timeout=10)
        client = redis.Redis.from_url(redis_url)
        lost = [*(queue.name for queue in cluster.topology.consumed), "unacked"]
        broker_keys = [key for name in lost
                       for key in client.scan_iter(match=f"{prefix}:broker:{name}*")]
        if broker_keys:
            client.delete(*broker_keys)
        # And a new worker (with beat: the sweep and the release's safety net) takes over
        cluster.start_worker(concurrency=2, pool="threads", beat=True)
        results = cluster.collect(set(references), timeout=180)
        # Then every intent has exactly one outcome, and nothing is left waiting or in flight
        assert cluster.assert_exactly_once(set(references)) == {"confirmed": 40}
        assert len(results) == 40
        wait_for(lambda: waiting(client, cluster.keys).in_flight == 0, timeout=30,
                 what="the in-flight set emptied")
        assert waiting(client, cluster.keys).by_shop == {}
        client.close()
