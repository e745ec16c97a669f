"""The on-call commands against real Redis and the sandbox as a process: ``health``,
``status``, ``results --count`` (acknowledging its last message) and ``submit``'s header."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fulfilment.harness.cluster import Cluster, env_for
from fulfilment.harness.processes import wait_for
from fulfilment.health import check_health
from fulfilment.ledger import Ledger
from fulfilment.results import ResultPublisher
from fulfilment.topology import Topology
from fulfilment.wiring import broker_connection
from schemas.intent import load_intent
from schemas.result import OrderResult, result_id_for
from tests.deployment import deployment

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    # A short stuck threshold and sweep, so a stuck intent is seen and resumed in seconds.
    with deployment(tmp_path, redis_url, prefix, stuck_after=2.0, sweep_interval=1.0,
                    intake_interval=0.5) as running:
        yield running


def intent(reference: str) -> dict[str, Any]:
    return {"reference": reference, "buyer": {"email": "ana@example.com", "phone": "+34 600"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]}


def fulfilment(cluster: Cluster, *args: str, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ONEBOX_", "FULFILMENT_"))}
    return subprocess.run([sys.executable, "-m", "tasks.commands", *args], capture_output=True,
                          text=True, env={**clean, **env_for(cluster.settings), **(env or {})},
                          timeout=120, check=False)


def test_health_reports_a_stalled_intake_and_a_stuck_intent_until_beat_runs(
        cluster: Cluster, redis_client: redis.Redis) -> None:
    # Given no beat yet, and an intent admitted long ago whose task was lost
    ledger = Ledger(redis_client, cluster.keys, 3600, clock=lambda: time.time() - 600)
    ledger.admit(load_intent(intent("stuck-1")))
    # When the health command runs
    done = fulfilment(cluster, "health", "--json")
    report = json.loads(done.stdout)
    # Then it is degraded (exit 1): Redis, the broker and Onebox are fine; the intake was
    # never drained and one intent is stuck
    assert done.returncode == 1, done.stderr
    checks = report["checks"]
    assert report["status"] == "degraded"
    assert {name: checks[name]["status"] for name in checks} == {
        "redis": "ok", "broker": "ok", "onebox": "ok", "stuck": "degraded", "intake": "degraded",
        "unsettled": "ok"}
    assert checks["stuck"]["stuck"] == 1 and checks["stuck"]["oldest"][0]["reference"] == "stuck-1"
    assert checks["intake"]["last_drained_at"] is None
    assert set(checks["broker"]["queues"]) == {"purchase", "live", "continue", "maintenance",
                                               "results", "failures", "intake",
                                               "intake_processing"}
    assert checks["broker"]["bulk"] == {"waiting": {}, "in_flight": 0}
    human = fulfilment(cluster, "health")
    assert human.returncode == 1
    assert human.stdout.splitlines()[-1] == "health: degraded"
    assert "never drained" in human.stdout and "stuck-1" in human.stdout
    # When a worker with beat runs (the sweep resumes the intent, beat drains the intake)
    cluster.start_worker(beat=True)
    assert cluster.collect({"stuck-1"})["stuck-1"].status == "confirmed"
    # Then health is ok, exit 0
    wait_for(lambda: check_health(cluster.settings).healthy, timeout=60,
             what="health to be ok once beat runs")
    assert fulfilment(cluster, "health").returncode == 0


def test_health_is_unhealthy_when_onebox_refuses_the_key_or_redis_is_gone(
        cluster: Cluster) -> None:
    refused = fulfilment(cluster, "health", "--json", env={"ONEBOX_API_KEY": "wrong-key"})
    onebox = json.loads(refused.stdout)["checks"]["onebox"]
    assert refused.returncode == 1 and onebox["status"] == "unhealthy" and onebox["http"] == 401
    assert "wrong-key" not in refused.stdout
    gone = fulfilment(cluster, "health", "--json", "--no-onebox",
                      env={"FULFILMENT_REDIS_URL": "redis://127.0.0.1:1/0"})
    report = json.loads(gone.stdout)
    assert gone.returncode == 1 and report["status"] == "unhealthy"
    assert report["checks"]["redis"]["status"] == "unhealthy"
    assert report["checks"]["stuck"]["status"] == "skipped"


def test_status_follows_an_intent_to_its_outcome_without_buyer_data(cluster: Cluster) -> None:
    from tasks import submit

    cluster.start_worker()
    submit(intent("look-1"))
    result = cluster.collect({"look-1"})["look-1"]
    wait_for(lambda: json.loads(fulfilment(cluster, "status", "--json", "look-1").stdout)
             ["published"], timeout=30, what="the outcome to be published")
    done = fulfilment(cluster, "status", "look-1", "no-such-ref")
    assert done.returncode == 1
    assert "look-1: confirmed, published" in done.stdout
    assert f"code {result.order_code}" in done.stdout
    assert "no-such-ref: unknown" in done.stdout
    assert "ana@example.com" not in done.stdout and "+34 600" not in done.stdout


def test_results_count_one_three_times_reads_three_results(cluster: Cluster) -> None:
    topology = Topology.for_keys(cluster.keys, cluster.settings.effective_broker_url)
    with broker_connection(cluster.settings) as connection:
        publisher = ResultPublisher(connection, topology)
        for i in range(3):
            publisher.publish(OrderResult(result_id=result_id_for(f"r-{i}"), reference=f"r-{i}",
                                          status="confirmed", order_code=f"C{i}"))
    depths = check_health(cluster.settings, onebox=False).checks[1].data["queues"]
    assert depths["results"] == 3  # health counts what waits on each queue
    lines = [fulfilment(cluster, "results", "--count", "1", "--idle-timeout", "20").stdout
             for _ in range(3)]
    assert lines == [f"r-{i}: confirmed, order code C{i}\n" for i in range(3)]


def test_submit_says_where_it_sends_with_the_password_masked(cluster: Cluster,
                                                            tmp_path: Path) -> None:
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps(intent("where-1")) + "\n")
    broker = cluster.settings.effective_broker_url.replace("redis://", "redis://:s3cret@")
    done = fulfilment(cluster, "submit", str(source), "--batch", "where-b",
                      env={"FULFILMENT_BROKER_URL": broker})
    # The machine's Redis has no password: a password it does not need is refused or ignored
    lines = done.stdout.splitlines() + done.stderr.splitlines()
    header = next(line for line in lines if line.startswith("to broker "))
    assert "s3cret" not in done.stdout + done.stderr
    assert f"queue {cluster.keys.task_queue}" in header and ":***@" in header
