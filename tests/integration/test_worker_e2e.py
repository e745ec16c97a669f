"""End to end: real Redis, real worker processes, the sandbox over loopback.

Every test runs twice: with Redis as the broker and with RabbitMQ (a vhost of
the run's own; the ledger is Redis either way).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fulfilment.errors import InvalidMessageError
from fulfilment.harness.cluster import Cluster, env_for
from schemas.intent import SeatRef
from tests import services
from tests.deployment import deployment

pytestmark = pytest.mark.integration




@pytest.fixture
def cluster(redis_url: str, broker_url: str, prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    # Short-lived baskets: an abandoned one lets go of its seats within seconds.
    with deployment(tmp_path, redis_url, prefix, "--basket-ttl", "3", retry_deadline=120,
                    onebox_read_timeout=2.0, lease_ttl=3.0, broker_url=broker_url) as running:
        yield running


def intent(reference: str, items: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"reference": reference, "items": items,
            "buyer": {"email": f"{reference}@example.com", "phone": "+34 600 000 000"}, **extra}


def numbered(*seat_ids: int, session: int = 1001) -> dict[str, Any]:
    return {"seats": [{"id": seat, "session_id": session} for seat in seat_ids]}


def auto(quantity: int, price_type: int = 3, session: int = 1002) -> dict[str, Any]:
    return {"session_id": session, "price_type_id": price_type, "quantity": quantity}


def submit_all(intents: list[dict[str, Any]]) -> set[str]:
    from tasks import submit_many

    submissions = list(submit_many(intents))
    assert {s.status for s in submissions} == {"accepted"}, submissions
    return {s.reference for s in submissions if s.reference}


def test_intents_are_confirmed_once_with_the_sandbox_codes(cluster: Cluster) -> None:
    # Given a worker and thirty intents, numbered and automatic
    cluster.start_worker()
    intents = [intent(f"e2e-{i}", [numbered(1000 + 2 * i, 1001 + 2 * i)] if i % 2 else [auto(2)],
                      batch="e2e", metadata={"i": i}) for i in range(30)]
    # When they are submitted
    references = submit_all(intents)
    results = cluster.collect(references)
    # Then each is confirmed once, under the code Onebox holds for its reference
    assert cluster.assert_exactly_once(references) == {"confirmed": 30}
    audit = cluster.sandbox.admin.audit()
    for reference, result in results.items():
        assert audit["confirmed"][reference] == [result.order_code]
        assert result.batch == "e2e" and result.order_id
        assert result.metadata == {"i": int(reference.split("-")[1])}
        assert result.submitted_at and result.finished_at and result.error is None
    # And the worker's log names each intent, never its buyer or the credentials
    logs = "".join(worker.output() for worker in cluster.workers)
    assert "ref=e2e-3 " in logs and "step=confirm" in logs
    for secret in ("@example.com", "600 000 000", cluster.settings.onebox_api_key):
        assert secret not in logs


def test_four_worker_processes_share_one_deployment(cluster: Cluster) -> None:
    # Given four worker processes on one broker, one ledger, one Onebox account
    for _ in range(4):
        cluster.start_worker(concurrency=2)
    # When eighty intents are submitted
    references = submit_all([intent(f"four-{i}", [auto(1)]) for i in range(80)])
    cluster.collect(references, timeout=180)
    # Then each is bought once, and every process took a share of the purchases
    assert cluster.assert_exactly_once(references) == {"confirmed": 80}
    finished = [worker.output().count("fulfilment.confirm[") for worker in cluster.workers]
    assert all(count > 0 for count in finished), finished

def test_the_sweep_resumes_an_intent_whose_message_was_lost(cluster: Cluster,
                                                            redis_client: redis.Redis) -> None:
    # Given an intent admitted to the ledger whose task never reached the broker
    # (its producer died in between), and a worker
    from fulfilment.wiring import build_ledger
    from schemas.intent import load_intent

    ledger = build_ledger(cluster.settings, redis_client)
    ledger.admit(load_intent(intent("orphan-1", [auto(1)])))
    cluster.start_worker()
    # When the sweep runs with a zero stuck-after
    env = {**services_env(), **env_for(cluster.settings), "FULFILMENT_STUCK_AFTER": "0.001"}
    done = subprocess.run([sys.executable, "-m", "tasks.commands", "sweep"], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"resumed": ["orphan-1"], "refunds": []}
    # Then the intent is bought
    assert cluster.collect({"orphan-1"})["orphan-1"].status == "confirmed"


def test_seat_already_sold_fails_and_releases_the_basket(cluster: Cluster,
                                                         redis_client: redis.Redis) -> None:
    # Given seat 5 already sold at the box office
    cluster.sell_at_box_office(SeatRef(id=5, session_id=1001))
    cluster.start_worker()
    # When an intent wants seat 6 (free), automatic seats, and seat 5 (sold)
    references = submit_all([intent("sold-1", [numbered(6), auto(2, price_type=4), numbered(5)])])
    result = cluster.collect(references)["sold-1"]
    # Then it fails with Onebox's reason and its basket's seats are free again
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.code == "ORDER_SEAT_NOT_AVAILABLE"
    assert result.error.step == "seats" and result.error.trace_id
    assert not result.error.retryable
    inventory = cluster.sandbox.admin.inventory(1001)
    assert inventory["seats"]["6"] == "FREE" and inventory["seats"]["5"] == "SOLD"
    assert cluster.sandbox.admin.inventory(1002)["capacity"]["4"]["held"] == 0
    cluster.assert_exactly_once(references)


@pytest.mark.parametrize("fault", ["error_500", "error_503", "throttle_429", "lost_response"])
def test_faults_on_every_step_still_confirm_each_intent_once(cluster: Cluster,
                                                             fault: str) -> None:
    # Given every endpoint failing its first calls in this way
    steps = ["token", "create", "seats", "seats_auto", "buyer_data", "pre_confirm", "confirm"]
    cluster.sandbox.admin.set_faults({"endpoints": {
        step: {"script": [fault, "ok", fault], "retry_after": 0.1} for step in steps}})
    cluster.start_worker()
    # When ten intents go through
    references = submit_all([intent(f"{fault}-{i}", [numbered(2000 + i), auto(1)])
                             for i in range(10)])
    cluster.collect(references)
    # Then each is confirmed, once
    assert cluster.assert_exactly_once(references) == {"confirmed": 10}
    faults = cluster.sandbox.admin.audit()["faults"]
    assert all(faults.get(step, {}).get(fault) for step in steps if step != "token"), faults


def test_a_bad_intent_is_refused_and_nothing_is_enqueued(cluster: Cluster,
                                                         redis_client: redis.Redis) -> None:
    from tasks import submit

    bad = intent("bad-1", [auto(0)])
    with pytest.raises(InvalidMessageError) as caught:
        submit(bad)
    assert "items" in caught.value.errors
    assert "quantity" in json.dumps(caught.value.errors)
    # Nothing in the ledger, nothing on the task queues
    assert not redis_client.exists(cluster.keys.ledger("bad-1"))
    assert cluster.queued(cluster.keys.task_queue) == 0
    assert cluster.queued(cluster.keys.continue_queue) == 0


def test_duplicate_submission_is_taken_once(cluster: Cluster) -> None:
    from tasks import submit

    cluster.start_worker()
    document = intent("dup-1", [auto(1)])
    assert submit(document).status == "accepted"
    assert submit(document).status == "duplicate"
    with pytest.raises(Exception, match="different purchase"):
        submit({**document, "items": [auto(2)]})
    cluster.collect({"dup-1"})
    cluster.assert_exactly_once({"dup-1"})


def test_plain_json_on_the_redis_list_is_taken_in(cluster: Cluster,
                                                  redis_client: redis.Redis) -> None:
    # Given a worker running beat (which drains the intake list)
    cluster.start_worker(beat=True)
    # When a producer in any language pushes JSON intents, one of them bad
    good = json.dumps(intent("list-1", [numbered(3001)]))
    redis_client.lpush(cluster.keys.intake, good, '{"reference": "list-2", "items": []}')
    # Then the good one is bought and the bad one goes to the failures queue with its reason
    result = cluster.collect({"list-1"})["list-1"]
    assert result.status == "confirmed"
    failure = cluster.collect_failures(1)[0]
    assert failure["reason"] == "invalid purchase intent"
    assert "items" in failure["errors"]
    assert redis_client.llen(cluster.keys.intake) == 0
    assert redis_client.llen(cluster.keys.intake_processing) == 0


def test_submit_and_results_commands(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_worker()
    source = tmp_path / "intents.jsonl"
    lines = [json.dumps(intent("cli-1", [auto(1)])), "not json",
             json.dumps(intent("cli-2", [numbered(4001)])),
             json.dumps(intent("cli-3", [auto(1)], buyer_extra=1))]
    source.write_text("\n".join(lines) + "\n")
    env = {**env_for(cluster.settings)}
    done = subprocess.run([sys.executable, "-m", "tasks.commands", "submit", str(source)],
                          capture_output=True, text=True, env={**services_env(), **env},
                          timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert "2 enqueued, 0 duplicates, 2 refused" in done.stdout
    assert "line 2" in done.stderr and "line 4: cli-3: refused" in done.stderr
    assert "buyer_extra" in done.stderr
    out = tmp_path / "results.jsonl"
    read = subprocess.run([sys.executable, "-m", "tasks.commands", "results", "--count", "2",
                           "--idle-timeout", "60", "--jsonl", str(out)],
                          capture_output=True, text=True, env={**services_env(), **env},
                          timeout=90, check=False)
    assert read.returncode == 0, read.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["reference"] for row in rows} == {"cli-1", "cli-2"}
    assert all(row["status"] == "confirmed" for row in rows)


def services_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("ONEBOX_", "FULFILMENT_"))}


_ = services  # the Redis fixture comes from tests/services via conftest


def test_a_bad_task_message_goes_to_the_failures_queue_and_the_worker_goes_on(
        cluster: Cluster) -> None:
    from tasks.purchase import basket

    cluster.start_worker()
    # Given task messages no producer of ours would send
    basket.apply_async(args=({"not": "a reference"},))
    basket.apply_async(args=("never-admitted",))
    # When a good intent follows them
    references = submit_all([intent("after-bad-1", [auto(1)])])
    # Then each bad one is on the failures queue with its reason, and the good one is bought
    reasons = sorted(f["reason"] for f in cluster.collect_failures(2))
    assert reasons == ["no ledger entry for reference never-admitted",
                       "task argument is not a reference"]
    assert cluster.collect(references)["after-bad-1"].status == "confirmed"


def test_a_killed_workers_intent_is_free_again_within_its_short_lease(
        cluster: Cluster, redis_client: redis.Redis) -> None:
    import os
    import signal

    from fulfilment.harness.processes import child_pids, wait_for

    # Given a worker in the middle of a slow seats call, holding the intent's lease
    worker = cluster.start_worker(concurrency=1)
    cluster.sandbox.admin.set_faults({"endpoints": {"seats": {"latency_ms": 1500}}})
    [reference] = submit_all([intent("killed-1", [numbered(2101)])])
    lease = cluster.keys.lease(reference)
    wait_for(lambda: redis_client.exists(lease), timeout=60, what="the worker to take the lease")
    # When its pool process is killed there (no release, no goodbye)
    for pid in child_pids(worker.pid):
        os.kill(pid, signal.SIGKILL)
    cluster.sandbox.admin.set_faults({})
    # Then its lease lapses within its short time to live (it was 180 s: the task's
    # time limit), and the redelivered task buys the intent once
    assert redis_client.pttl(lease) <= 3000
    result = cluster.collect({reference}, timeout=60)[reference]
    assert result.status == "confirmed"
    cluster.assert_exactly_once({reference})
