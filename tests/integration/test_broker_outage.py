"""A broker outage reads as one warning and one line; a failed dispatch goes out when it is back.

Each test runs on a Redis broker (a redis-server of its own; the ledger stays
on the machine's Redis) and on RabbitMQ (a vhost of its own). Every process
reaches the broker through ``BrokerProxy``: cutting it is, to them, a broker
that died and refuses connections; restoring it, the broker started again.
The machine's broker serves other tests meanwhile, so it is never stopped.

The worker runs as the Procfile runs it (threads pool, mingle, gossip and
heartbeats on), with celery beat as a process of its own. The recovery sweep
is set to wait 10 minutes, so an intent whose dispatch failed during the
outage can only get its outcome within the test's deadline if it is sent
again when the broker is back.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu.exceptions import OperationalError

from fulfilment.harness.cluster import Cluster, env_for
from fulfilment.harness.processes import Child, RedisServer, wait_for
from fulfilment.keys import Keys
from fulfilment.results import ResultPublisher
from fulfilment.topology import Topology
from fulfilment.wiring import broker_connection
from schemas.result import CONFIRMED, OrderResult, result_id_for
from tests import services
from tests.deployment import BROKERS, deployment
from tests.integration.outage import BrokerProxy

pytestmark = pytest.mark.integration

#: How long the broker stays away: the scenario, not a wait for anything.
OUTAGE_SECONDS = 8.0
#: Far below the sweep's 10 minutes, far above the seconds a resent dispatch takes.
OUTCOME_DEADLINE = 60.0
#: A log line at WARNING or above, in the text format (``tasks.logcontext``).
_LOUD = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ", re.MULTILINE)


@pytest.fixture(params=BROKERS)
def proxy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerProxy]:
    """A proxy in front of a broker of this test's own."""
    with contextlib.ExitStack() as stack:
        if request.param == "redis":
            services.require("redis-server", shutil.which("redis-server") is not None)
            server = RedisServer(tmp_path / "broker", services.free_port(), appendfsync=None)
            stack.callback(server.stop)
            url = server.url
        else:
            url = stack.enter_context(services.rabbitmq_vhost())
        running = BrokerProxy(url)
        stack.callback(running.close)
        yield running


@pytest.fixture
def cluster(proxy: BrokerProxy, redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    with deployment(tmp_path, redis_url, prefix, broker_url=proxy.url,
                    stuck_after=600, sweep_interval=600) as running:
        yield running


def intent(reference: str) -> dict[str, Any]:
    return {"reference": reference,
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}],
            "buyer": {"email": f"{reference}@example.com"}}


def start_worker(cluster: Cluster) -> Child:
    """As the Procfile starts it (four threads instead of sixteen: two cores, many tests)."""
    worker = Child([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-l", "INFO",
                    "-P", "threads", "--concurrency", "4",
                    "-n", f"outage-{cluster.settings.key_prefix}@%h"],
                   cluster.tmp / "worker.log", env_for(cluster.settings))
    cluster.workers.append(worker)
    return worker


def under_way(worker: Child, reference: str) -> bool:
    return any(f"ref={reference} " in line and "basket opened" in line
               for line in worker.output().splitlines())


def assert_told_once(name: str, log: str) -> None:
    """One line at WARNING or above (the loss; the end's too where only warnings are
    shown), one line saying it is back, no traceback."""
    loud = [line for line in log.splitlines()
            if _LOUD.match(line) and "broker connection restored" not in line]
    assert len(loud) == 1 and "broker connection lost" in loud[0], \
        f"{name}: {len(loud)} lines at WARNING or above:\n" + "\n".join(loud)[-6000:]
    assert log.count("broker connection restored") == 1, f"{name}:\n{log[-6000:]}"
    assert "Traceback" not in log, f"{name} logged a traceback:\n{log[-6000:]}"


def test_an_outage_is_one_warning_and_a_failed_dispatch_goes_out_when_the_broker_is_back(
        cluster: Cluster, proxy: BrokerProxy) -> None:
    from tasks import submit, submit_many

    worker = start_worker(cluster)
    beat = cluster.start_beat()
    wait_for(lambda: " ready." in worker.output(), timeout=60, what="the worker to be ready")
    # Given purchases under way (each Onebox call takes 300 ms)
    cluster.sandbox.admin.set_faults({"endpoints": {"*": {"latency_ms": 300}}})
    in_flight = {"outage-flight-1", "outage-flight-2"}
    assert {s.status for s in submit_many([intent(r) for r in sorted(in_flight)])} == {"accepted"}
    wait_for(lambda: all(under_way(worker, r) for r in in_flight), timeout=60,
             what="the purchases to be under way")
    worker_mark, beat_mark = len(worker.output()), len(beat.output())

    # When the broker goes away, and an intent is submitted meanwhile
    proxy.cut()
    cut_at = time.monotonic()
    during = "outage-during"
    with contextlib.suppress(OperationalError):  # admitted; its dispatch fails
        submit(intent(during))
    from tasks import runtime

    entries = runtime.services().ledger
    assert entries.get(during) is not None, "the intent was not admitted"

    def baskets_done_and_outage_held() -> bool:
        done = all((e := entries.get(r)) is not None and e.buyer_set for r in in_flight)
        return done and time.monotonic() - cut_at >= OUTAGE_SECONDS

    wait_for(baskets_done_and_outage_held, timeout=120, what="the outage to run its course")
    # ... and comes back
    proxy.restore()
    back_at = time.monotonic()

    # Then the intent submitted during the outage gets its outcome soon (no 10-minute sweep)
    references = {*in_flight, during}
    cluster.collect(references, timeout=OUTCOME_DEADLINE)
    print(f"\noutcome of the intent submitted during the outage "
          f"{time.monotonic() - back_at:.1f} s after the broker came back "
          f"({cluster.settings.effective_broker_url.split(':')[0]})")
    # And nothing is lost or bought twice
    assert cluster.assert_exactly_once(references) == {"confirmed": len(references)}
    # And each process told the outage once when it began and once when it ended
    for name, child, mark in (("worker", worker, worker_mark), ("beat", beat, beat_mark)):
        wait_for(lambda c=child: "broker connection restored" in c.output(),  # type: ignore[misc]
                 timeout=30, what=f"the {name} to say the broker is back")
        assert_told_once(name, child.output()[mark:])
    assert worker.alive() and beat.alive()


def result(reference: str) -> OrderResult:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return OrderResult(result_id=result_id_for(reference), reference=reference,
                       status=CONFIRMED, order_code="CODE1", order_id="1",
                       submitted_at=now, finished_at=now)


def test_the_results_command_tells_an_outage_once(proxy: BrokerProxy, tmp_path: Path,
                                                  prefix: str, redis_url: str) -> None:
    with deployment(tmp_path, redis_url, prefix, broker_url=proxy.url) as cluster:
        settings = cluster.settings
        out = tmp_path / "results.jsonl"
        reader = Child([sys.executable, "-m", "tasks.commands", "results", "--jsonl", str(out)],
                       tmp_path / "results.log", env_for(settings))
        cluster.workers.append(reader)
        topology = Topology.for_keys(Keys(settings.key_prefix), settings.effective_broker_url)

        def publish(reference: str) -> None:
            with broker_connection(settings) as connection:
                ResultPublisher(connection, topology).publish(result(reference))

        def rows() -> list[dict[str, Any]]:
            assert reader.alive(), f"fulfilment results exited:\n{reader.output()}"
            return ([json.loads(line) for line in out.read_text().splitlines()]
                    if out.exists() else [])

        # Given the reader running, one result read
        publish("before-1")
        wait_for(lambda: len(rows()) == 1, timeout=30, what="the first result")
        mark = len(reader.output())
        # When the broker goes away for a while, comes back, and a result is published
        proxy.cut()
        cut_at = time.monotonic()
        wait_for(lambda: time.monotonic() - cut_at >= OUTAGE_SECONDS and
                 len(reader.output()) > mark, timeout=60, what="the outage to run its course")
        proxy.restore()
        publish("after-2")
        # Then it is read, and the reader told the outage once, and its end once
        wait_for(lambda: len(rows()) == 2, timeout=60, what="the second result")
        wait_for(lambda: "broker connection restored" in reader.output(), timeout=30,
                 what="the reader to say the broker is back")
        assert_told_once("fulfilment results", reader.output()[mark:])
