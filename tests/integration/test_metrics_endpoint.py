"""A real prefork worker serves its pool processes' metrics, summed, on its metrics port."""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from fulfilment.harness.cluster import Cluster
from fulfilment.harness.processes import free_port, wait_for
from schemas.intent import SeatRef
from tasks.metrics import metrics_directory
from tests.deployment import deployment

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def cluster(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    with deployment(tmp_path, redis_url, prefix, metrics_port=free_port(),
                    metrics_address="127.0.0.1") as running:
        yield running


def scrape(port: int) -> Samples | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def per_process(directory: Path, tmp_path: Path, name: str) -> dict[str, float]:
    """``name``'s total in each pool process's own file, read one file at a time."""
    found: dict[str, float] = defaultdict(float)
    for path in directory.glob("counter_*.db"):
        alone = Path(tempfile.mkdtemp(dir=tmp_path))
        shutil.copy(path, alone)
        registry = CollectorRegistry()
        # prometheus_client leaves this constructor unannotated.
        MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
        for family in registry.collect():
            for sample in family.samples:
                if sample.name == name:
                    found[path.stem] += sample.value
    return dict(found)


def intent(reference: str, item: dict[str, Any]) -> dict[str, Any]:
    return {"reference": reference, "items": [item],
            "buyer": {"email": f"{reference}@example.com"}}


def test_a_prefork_worker_serves_counts_that_add_up_across_its_pool_processes(
        cluster: Cluster, redis_client: redis.Redis, tmp_path: Path) -> None:
    from tasks import submit_many

    # Given seat 5 sold at the box office, and a prefork worker with two pool processes
    cluster.sell_at_box_office(SeatRef(id=5, session_id=1001))
    port = cluster.settings.metrics_port
    worker = cluster.start_worker(concurrency=2)
    quiet = wait_for(lambda: scrape(port), timeout=60, what="the worker's metrics port")
    assert quiet is not None  # wait_for returns only a truthy value
    # (before any pool process counted: the held-back panel reads 0, not "No data")
    assert quiet[("fulfilment_onebox_held_back_total",
                  frozenset({("reason", "circuit_open")}))] == 0
    assert total(quiet, "fulfilment_worker_info", deployment=cluster.settings.key_prefix,
                 pool="prefork") == 1
    # When eight intents are bought, one of them wanting the sold seat
    intents = [intent(f"m-{i}", {"session_id": 1002, "price_type_id": 3, "quantity": 1})
               for i in range(7)]
    intents.append(intent("m-sold", {"seats": [{"id": 5, "session_id": 1001}]}))
    submissions = list(submit_many(intents))
    assert {s.status for s in submissions} == {"accepted"}
    results = cluster.collect({s.reference for s in submissions if s.reference})
    assert sorted(r.status for r in results.values()) == ["confirmed"] * 7 + ["failed"]

    # Then one scrape of the port counts them all, whichever pool process bought them
    def settled() -> Samples | None:
        samples = scrape(port)
        done = samples is not None and \
            total(samples, "fulfilment_step_duration_seconds_count", step="confirm") >= 8 and \
            total(samples, "fulfilment_open_intents") == 0
        return samples if done else None

    samples = wait_for(settled, timeout=30, what="every confirm step counted, nothing open")
    assert samples is not None  # wait_for returns only a truthy value
    assert total(samples, "fulfilment_intents_total", status="confirmed") == 7
    assert total(samples, "fulfilment_intents_total", status="failed",
                 code="ORDER_SEAT_NOT_AVAILABLE") == 1
    assert total(samples, "fulfilment_onebox_calls_total", endpoint="confirm", status="200") == 7
    assert total(samples, "fulfilment_onebox_calls_total", endpoint="seats", status="409") == 1
    assert total(samples, "fulfilment_step_duration_seconds_count", step="basket") >= 8
    assert total(samples, "fulfilment_metrics_redis_up") == 1
    assert total(samples, "fulfilment_queue_messages", queue=cluster.keys.task_queue) == 0
    assert total(samples, "fulfilment_onebox_circuit_state", state="closed") == 1
    # And the scrape is the sum of the processes' own files, of two pool processes at work
    directory = metrics_directory(port)
    calls = per_process(directory, tmp_path, "fulfilment_onebox_calls_total")
    assert sum(calls.values()) == total(samples, "fulfilment_onebox_calls_total")
    pool = {name for name in calls if name != f"counter_{worker.pid}"}
    assert len(pool) == 2, calls
    outcomes = per_process(directory, tmp_path, "fulfilment_intents_total")
    assert sum(outcomes.values()) == 8
    # And a worker stopped cleanly takes its directory away
    worker.stop()
    assert not directory.exists()
