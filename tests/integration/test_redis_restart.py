"""A worker rides out Redis restarts with tasks in flight, with no supervisor to restart it.

Redis of the test's own (append-only file, so a restart keeps the ledger and
the queues), the sandbox answering slowly so that purchases are mid-way when
Redis goes, one prefork worker started exactly as the Procfile starts it, and
celery beat for the recovery sweep. Each round submits two intents, waits
until both are being bought (late-acknowledged messages unacknowledged, the
queue empty, so the worker is also blocked in BRPOP for more), and restarts
Redis. The worker must be the same living process at the end, and every
intent must have exactly one outcome.

This is the situation that kills Celery 5.7 / kombu 5.7 workers: when Redis
goes, the pub/sub socket (remote control, gossip) may report the loss first;
closing the task channel then fails in its pending BRPOP read and leaves the
channel half closed; ``Connection.collect()`` drops the transport's client;
the second close tries to restore the unacknowledged messages, must rebuild a
Redis pool from the transport's client, and raises
``AttributeError: 'NoneType' object has no attribute 'hostname'``, which the
consumer does not treat as a connection error: "Unrecoverable error".
Setting ``worker_cancel_long_running_tasks_on_connection_loss`` to False does
not avoid it (the crash is in the close, before any cancel); our transport
(``fulfilment.redis_transport``) does.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fulfilment.config import Settings
from fulfilment.harness.cluster import Cluster, env_for
from fulfilment.harness.processes import Child, RedisServer, SandboxProcess, wait_for
from tasks import app as celery_app
from tasks.app import configure
from tests.services import free_port, require, unique_prefix

pytestmark = pytest.mark.integration

ROUNDS = 3
IN_FLIGHT = 2  # fewer than the worker's four processes: the queue is empty, BRPOP pending


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[Cluster, RedisServer]]:
    require("redis-server", shutil.which("redis-server") is not None)
    server = RedisServer(tmp_path / "redis", free_port())
    sandbox = SandboxProcess(tmp_path / "sandbox.log", "--basket-ttl", "60")
    # Every Onebox call takes 300 ms: a purchase is several calls, so it is
    # still under way when Redis is restarted.
    sandbox.admin.set_faults({"endpoints": {"*": {"latency_ms": 300}}})
    settings = Settings.from_env({"FULFILMENT_REQUIRE_DURABLE_REDIS": "false"}).with_overrides(
        onebox_api_url=sandbox.url, redis_url=server.url, broker_url=server.url,
        key_prefix=unique_prefix("restart"), onebox_read_timeout=5.0,
        retry_base_delay=0.05, retry_max_delay=1.0, retry_deadline=600, retry_max_attempts=30,
        visibility_timeout=20, task_soft_time_limit=8, task_time_limit=10,
        stuck_after=10, sweep_interval=3,
    )
    configure(settings)  # this process is the producer
    cluster = Cluster(settings, sandbox, tmp_path)
    try:
        yield cluster, server
    finally:
        cluster.stop()
        server.stop()
        celery_app.close()


def process_env(settings: Settings) -> dict[str, str]:
    # This Redis fsyncs every second, not on every write; the durability
    # start-up check is not what this test is about.
    return {**env_for(settings), "FULFILMENT_REQUIRE_DURABLE_REDIS": "false"}


def start_worker(cluster: Cluster) -> Child:
    """One worker, as the Procfile runs it (prefork, four processes), and no supervisor."""
    worker = Child([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-l", "INFO",
                    "-P", "prefork", "--concurrency", "4"],
                   cluster.tmp / "worker.log", process_env(cluster.settings))
    cluster.workers.append(worker)
    return worker


def start_beat(cluster: Cluster) -> Child:
    """The recovery sweep: a restart between BRPOP and the broker's unacked write loses a task."""
    beat = Child([sys.executable, "-m", "celery", "-A", "tasks", "beat", "-l", "INFO",
                  "-s", str(cluster.tmp / "beat-schedule")],
                 cluster.tmp / "beat.log", process_env(cluster.settings))
    cluster.workers.append(beat)
    return beat


def intent(reference: str) -> dict[str, Any]:
    return {"reference": reference,
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}],
            "buyer": {"email": f"{reference}@example.com"}}


def under_way(worker: Child, reference: str) -> bool:
    """The worker has opened this intent's basket (its purchase is in a pool process)."""
    return any(f"ref={reference} " in line and "basket opened" in line
               for line in worker.output().splitlines())


def test_a_worker_survives_redis_restarts_with_tasks_in_flight(
        deployment: tuple[Cluster, RedisServer]) -> None:
    from tasks import submit_many

    cluster, server = deployment
    worker = start_worker(cluster)
    start_beat(cluster)

    def alive(condition: bool) -> bool:
        if not worker.alive():
            raise AssertionError(f"the worker exited (code {worker.process.returncode}):\n"
                                 f"{worker.output()[-8000:]}")
        return condition

    wait_for(lambda: alive("ready." in worker.output()), timeout=60, what="the worker")
    references: set[str] = set()
    for round_ in range(ROUNDS):
        # Given purchases under way and the queue empty
        batch = [f"restart-{round_}-{i}" for i in range(IN_FLIGHT)]
        submissions = list(submit_many([intent(reference) for reference in batch]))
        assert {s.status for s in submissions} == {"accepted"}, submissions
        references |= set(batch)
        wait_for(lambda b=batch: alive(all(under_way(worker, r) for r in b)),  # type: ignore[misc]
                 timeout=60, what=f"{batch} under way")
        # (after an outage the worker says "broker connection restored", not "Connected to")
        connected = worker.output().count("broker connection restored")
        # When Redis is stopped and started again
        server.restart()
        # Then the worker loses its connection, gets it back, and stays alive
        wait_for(lambda c=connected: alive(  # type: ignore[misc]
            worker.output().count("broker connection restored") > c),
                 timeout=60, what="the worker to reconnect")

    # And every intent gets exactly one outcome, from the same worker process
    cluster.collect(references, timeout=180)
    assert worker.alive(), f"the worker exited:\n{worker.output()[-8000:]}"
    assert cluster.assert_exactly_once(references) == {"confirmed": len(references)}
    assert "Unrecoverable error" not in worker.output()
