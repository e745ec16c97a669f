"""What Flower and ``celery events`` see: a failed purchase tells itself apart.

Task events are what Flower and ``celery events`` show. Each stage task of a
purchase succeeds as a Celery task even when the purchase fails (failing is an
outcome, recorded and published, not a crash), so the chain's last task
returns the outcome: ``confirmed: <order code>`` or ``failed: <error code>``.
Here a real worker with task events on (``-E``) buys one intent and fails
another, and a real event receiver in this process reads the
``task-succeeded`` events of their ``fulfilment.confirm`` tasks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fulfilment.harness.cluster import Cluster, env_for
from fulfilment.harness.processes import Child, wait_for, worker_args
from schemas.intent import SeatRef
from tests.deployment import deployment

pytestmark = pytest.mark.integration


class Events:
    """A Celery event receiver on a thread of its own, keeping every event it sees."""

    def __init__(self) -> None:
        from tasks import app

        self.seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._connection = app.connection_for_read()
        self.receiver = app.events.Receiver(self._connection, handlers={"*": self._keep})
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self.error: BaseException | None = None
        self._thread.start()

    def _keep(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.seen.append(event)

    def _run(self) -> None:
        try:
            self.receiver.capture(limit=None, timeout=None, wakeup=True)
        except BaseException as exc:  # shown by the test, not lost in a thread
            self.error = exc

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        assert self.error is None, self.error
        with self._lock:
            return [event for event in self.seen if event["type"] == kind]

    def close(self) -> None:
        self.receiver.should_stop = True
        self._thread.join(timeout=10)
        self._connection.close()


@pytest.fixture
def cluster(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    with deployment(tmp_path, redis_url, prefix, "--basket-ttl", "3", retry_deadline=60) \
            as running:
        yield running


def test_the_last_task_says_confirmed_or_failed_in_its_succeeded_event(
        cluster: Cluster, redis_client: redis.Redis) -> None:
    # Given seat 5 sold at the box office
    cluster.sell_at_box_office(SeatRef(id=5, session_id=1001))
    # and a worker with task events on, whose events this process receives
    events = Events()
    try:
        name = f"events-{cluster.settings.key_prefix}"
        args = [arg for arg in worker_args([queue.name for queue in cluster.topology.consumed],
                                           f"{name}@%h")
                if arg != "--without-heartbeat"] + ["-E"]
        cluster.workers.append(Child(args, cluster.tmp / "worker.log",
                                     env_for(cluster.settings)))
        # (a heartbeat of that worker proves the receiver is listening)
        wait_for(lambda: [e for e in events.of_type("worker-heartbeat")
                          if e["hostname"].startswith(name)],
                 timeout=60, what="a heartbeat event of the worker")

        # When one intent is bought and another wants the sold seat
        from tasks import submit_many

        buyer = {"email": "events@example.com", "phone": "+34 600 000 000"}
        submitted = list(submit_many([
            {"reference": "ev-ok", "items": [{"seats": [{"id": 7, "session_id": 1001}]}],
             "buyer": buyer},
            {"reference": "ev-sold", "items": [{"seats": [{"id": 5, "session_id": 1001}]}],
             "buyer": buyer},
        ]))
        assert {s.status for s in submitted} == {"accepted"}
        results = cluster.collect({"ev-ok", "ev-sold"})

        # Then the last task's (confirm's) task-succeeded event says which is which
        def publish_results() -> dict[str, str] | None:
            received = {e["uuid"]: e for e in events.of_type("task-received")
                        if e["name"] == "fulfilment.confirm"}
            found = {received[e["uuid"]]["args"]: e["result"]
                     for e in events.of_type("task-succeeded") if e["uuid"] in received}
            return found if len(found) == 2 else None

        found = wait_for(publish_results, timeout=30, what="the confirm tasks' events")
    finally:
        events.close()
    assert results["ev-ok"].status == "confirmed" and results["ev-sold"].status == "failed"
    assert found == {"('ev-ok',)": repr(f"confirmed: {results['ev-ok'].order_code}"),
                     "('ev-sold',)": repr("failed: ORDER_SEAT_NOT_AVAILABLE")}
    # and no event carries the buyer
    assert not [e for e in events.seen if "events@example.com" in repr(e)
                or "600 000 000" in repr(e)]
