"""Metrics: each call site's update, the Redis collector on fakeredis, serving, the dashboard.

Every test counts into a registry of its own (``fresh`` installs it), so no
test sees another's counts.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
import requests
from prometheus_client import CollectorRegistry, generate_latest

from fulfilment import metrics
from fulfilment.config import Settings
from fulfilment.errors import CircuitOpenError, TransientError
from fulfilment.flow import Proceed, RetryIn
from fulfilment.harness.processes import free_port
from fulfilment.keys import Keys
from fulfilment.metrics_collector import RedisCollector
from fulfilment.onebox import guard as guard_module
from fulfilment.onebox.guard import GuardConfig, guarded
from schemas.result import OrderResult, ResultError
from tests.unit.test_flow import World, world  # noqa: F401  (the flow's fixture)
from tests.unit.test_onebox_guard import Fleet

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"


@pytest.fixture
def fresh() -> Iterator[metrics.Metrics]:
    """This test's own metrics, in a registry of its own, installed for the call sites."""
    mine = metrics.Metrics(CollectorRegistry())
    metrics.install(mine)
    yield mine
    metrics.install(None)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def result(status: str, code: str | None = None, at: int = 0) -> OrderResult:
    error = ResultError(code=code, message="m", step="seats") if code else None
    return OrderResult(result_id="r", reference="ref", status=status, error=error,
                       order_code="C" if status == "confirmed" else None,
                       finished_at=datetime(2026, 1, 1, 0, 0, at, tzinfo=UTC))


# --- the call sites -----------------------------------------------------------------
def test_an_outcome_is_counted_by_status_and_code_once_it_stands(
        fresh: metrics.Metrics) -> None:
    ours = result("failed", "ORDER_SEAT_NOT_AVAILABLE")
    assert metrics.outcome_written(ours, ours) is ours
    metrics.outcome_written(result("confirmed"), result("confirmed"))
    # An outcome the ledger refused (another stood already) is not counted
    metrics.outcome_written(result("confirmed", at=5), ours)
    r = fresh.registry
    assert value(r, "fulfilment_intents_total", status="failed",
                 code="ORDER_SEAT_NOT_AVAILABLE") == 1
    assert value(r, "fulfilment_intents_total", status="confirmed", code="") == 1


def test_a_purchase_counts_its_outcome_and_a_retry_its_reason(
        fresh: metrics.Metrics, world: World) -> None:  # noqa: F811
    # Given a purchase whose seats call fails once, then one that goes through
    world.onebox.failures["seats"] = [TransientError("busy", code="HTTP_503", status=503)]
    reference = world.submit()
    # When it runs until it proceeds
    first = world.run(reference)
    assert isinstance(first, RetryIn)
    world.clock[0] += first.delay
    assert isinstance(world.run(reference), Proceed)
    # Then one retry by its code, and one confirmed outcome
    r = fresh.registry
    assert value(r, "fulfilment_retries_total", reason="HTTP_503") == 1
    assert value(r, "fulfilment_intents_total", status="confirmed", code="") == 1


def test_decided_counts_retries_only(fresh: metrics.Metrics) -> None:
    proceed = Proceed()
    assert metrics.decided(proceed) is proceed
    metrics.decided(RetryIn(1.0, "CIRCUIT_OPEN"))
    metrics.retried("ConnectionError")
    samples = {s.labels["reason"]: s.value for f in fresh.registry.collect()
               for s in f.samples if s.name == "fulfilment_retries_total"}
    assert samples == {"CIRCUIT_OPEN": 1, "ConnectionError": 1}


def answer(status: int) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    return response


def test_onebox_calls_are_counted_by_endpoint_and_status_and_timed(
        fresh: metrics.Metrics) -> None:
    guarded(None, "confirm", lambda: answer(200))
    guarded(None, "confirm", lambda: answer(503))

    def times_out() -> requests.Response:
        raise requests.ReadTimeout("slow")

    with pytest.raises(requests.ReadTimeout):
        guarded(None, "seats", times_out)
    r = fresh.registry
    assert value(r, "fulfilment_onebox_calls_total", endpoint="confirm", status="200") == 1
    assert value(r, "fulfilment_onebox_calls_total", endpoint="confirm", status="503") == 1
    assert value(r, "fulfilment_onebox_calls_total", endpoint="seats", status="timeout") == 1
    assert value(r, "fulfilment_onebox_call_duration_seconds_count", endpoint="confirm") == 2


def test_held_back_reasons_follow_the_guards_verdicts() -> None:
    assert metrics.HELD_BACK_REASONS == {guard_module.OPEN: "circuit_open",
                                         guard_module.PROBING: "probing",
                                         guard_module.TOO_LONG: "rate_limited"}


def test_the_guard_counts_what_it_holds_back_and_its_breaker_changes(
        fresh: metrics.Metrics) -> None:
    # Given a fleet whose breaker opens after five failures
    fleet = Fleet(GuardConfig(breaker_failures=5, breaker_window=10, breaker_cooldown=15))
    guard = fleet.guard()
    for _ in range(5):  # as the client sends: through ``guarded``
        guarded(guard, "create", fleet.answer(503))
    # When a call comes while it is open, and another after the cool-down (the probe)
    with pytest.raises(CircuitOpenError):
        guarded(guard, "create", fleet.answer(200))
    fleet.now += 16
    guarded(guard, "create", fleet.answer(200))
    # Then one call held back, the breaker opened once and closed once, and every
    # call that was sent counted (five 503s, the probe's 200); the held one not
    r = fresh.registry
    assert value(r, "fulfilment_onebox_held_back_total", reason="circuit_open") == 1
    assert value(r, "fulfilment_onebox_circuit_changes_total", change="opened") == 1
    assert value(r, "fulfilment_onebox_circuit_changes_total", change="closed") == 1
    assert value(r, "fulfilment_onebox_calls_total", endpoint="create", status="503") == 5
    assert value(r, "fulfilment_onebox_calls_total", endpoint="create", status="200") == 1


def test_rate_limit_waits_are_observed_only_when_a_call_waited(
        fresh: metrics.Metrics) -> None:
    fleet = Fleet(GuardConfig(rate_limit=10, max_wait=1, breaker_failures=0))
    guard = fleet.guard()
    for _ in range(3):  # at once: waits 0, 0.1, 0.2
        guard.send("create", fleet.answer(200))
    r = fresh.registry
    assert value(r, "fulfilment_onebox_rate_limit_wait_seconds_count") == 2
    assert value(r, "fulfilment_onebox_rate_limit_wait_seconds_sum") == pytest.approx(0.3)


def test_the_celery_signals_time_steps_and_count_celerys_own_retries(
        fresh: metrics.Metrics) -> None:
    from tasks import metrics as serving

    task: Any = SimpleNamespace(name="fulfilment.basket")
    serving._task_starts(task_id="t1")
    serving._task_ends(task_id="t1", task=task)
    serving._task_ends(task_id="never-started", task=task)  # no start: nothing observed
    serving._task_retried(reason=SimpleNamespace(exc=ConnectionError("gone")))
    serving._task_retried(reason=SimpleNamespace(exc=None))  # the flow's: counted there
    r = fresh.registry
    assert value(r, "fulfilment_step_duration_seconds_count", step="basket") == 1
    assert value(r, "fulfilment_retries_total", reason="ConnectionError") == 1
    assert sum(s.value for f in r.collect() for s in f.samples
               if s.name == "fulfilment_retries_total") == 1


def test_labels_known_beforehand_read_0_before_their_first_event() -> None:
    # The dashboard's breaker and held-back panels: 0, not "No data", on a quiet fleet
    registry = metrics.Metrics(CollectorRegistry()).registry
    for reason in ("circuit_open", "probing", "rate_limited"):
        assert registry.get_sample_value("fulfilment_onebox_held_back_total",
                                         {"reason": reason}) == 0
    for change in ("opened", "reopened", "closed"):
        assert registry.get_sample_value("fulfilment_onebox_circuit_changes_total",
                                         {"change": change}) == 0
    assert registry.get_sample_value("fulfilment_intents_total",
                                     {"status": "confirmed", "code": ""}) == 0


# --- the counters are a leaf ----------------------------------------------------------
OURS = ("fulfilment", "schemas", "tasks", "bench", "tests")


def test_the_counters_module_imports_nothing_of_ours() -> None:
    """The flow, the ledger and the guard import it: it imports none of them (no circle)."""
    imported: list[str] = []
    for node in ast.walk(ast.parse(Path(metrics.__file__).read_text())):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # type-checking-only imports count too
            imported.append("." * node.level + (node.module or ""))
    assert [name for name in imported
            if name.startswith(".") or name.split(".")[0] in OURS] == []
    # And at run time, in an interpreter of its own
    done = subprocess.run(
        [sys.executable, "-c", "import sys, fulfilment.metrics; print(sorted(m for m in "
         f"sys.modules if m.split('.')[0] in {OURS!r}))"],
        capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "['fulfilment', 'fulfilment.metrics']"


# --- read from Redis at scrape time ---------------------------------------------------
def collector(client: fakeredis.FakeRedis, *, breaker: bool = True) -> RedisCollector:
    keys = Keys("unit")
    return RedisCollector(client, keys,
                                  breaker_key=keys.onebox_guard("acct", "breaker")
                                  if breaker else None,
                                  broker=client, broker_prefix="unit:broker:")


def scraped(source: RedisCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                      float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in source.collect() for s in family.samples}


def test_the_collector_reads_queues_open_intents_and_the_breaker() -> None:
    client = fakeredis.FakeRedis()
    keys = Keys("unit")
    now = float(client.time()[0])
    client.rpush("unit:broker:unit.purchase", "a", "b")
    client.rpush("unit:broker:unit.purchase\x06\x169", "c")  # kombu's priority 9 list
    client.rpush("unit:broker:unit.purchase.continue", "d")
    client.hset("unit:broker:unacked", mapping={"t1": "x", "t2": "y", "t3": "z"})
    client.rpush(keys.intake, "i")
    client.zadd(keys.open_intents, {"old": now - 120, "new": now - 1})
    client.hset(keys.onebox_guard("acct", "breaker"), "open_until", (now + 30) * 1_000_000)
    got = scraped(collector(client))
    assert got[("fulfilment_metrics_redis_up", ())] == 1
    assert got[("fulfilment_queue_messages", (("queue", "unit.purchase"),))] == 3
    assert got[("fulfilment_queue_messages", (("queue", "unit.purchase.continue"),))] == 1
    assert got[("fulfilment_queue_messages", (("queue", "unit:intake"),))] == 1
    assert got[("fulfilment_broker_unacked_messages", ())] == 3
    assert got[("fulfilment_open_intents", ())] == 2
    assert got[("fulfilment_oldest_open_intent_idle_seconds", ())] == pytest.approx(120, abs=2)
    states = {labels[0][1]: v for (name, labels), v in got.items()
              if name == "fulfilment_onebox_circuit_state"}
    assert states == {"closed": 0, "open": 1, "half_open": 0, "disabled": 0}


def test_the_collector_says_closed_half_open_and_disabled() -> None:
    client = fakeredis.FakeRedis()
    breaker = Keys("unit").onebox_guard("acct", "breaker")

    def state(source: RedisCollector) -> str:
        [name] = [labels[0][1] for (metric, labels), v in scraped(source).items()
                  if metric == "fulfilment_onebox_circuit_state" and v == 1]
        return name

    assert state(collector(client)) == "closed"
    client.hset(breaker, "open_until", (float(client.time()[0]) - 1) * 1_000_000)
    assert state(collector(client)) == "half_open"
    assert state(collector(client, breaker=False)) == "disabled"
    assert scraped(collector(client))[("fulfilment_oldest_open_intent_idle_seconds", ())] == 0


def test_without_redis_a_scrape_says_so_rather_than_failing() -> None:
    settings = Settings.defaults().with_overrides(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    got = scraped(RedisCollector.for_settings(settings, timeout=0.5))
    assert got == {("fulfilment_metrics_redis_up", ()): 0}


def test_the_collector_reads_the_guards_breaker_key_and_the_brokers_prefix() -> None:
    settings = Settings.defaults().with_overrides(key_prefix="unit-x")
    source = RedisCollector.for_settings(settings)
    assert source._breaker_key == Keys("unit-x").onebox_guard(guard_module.scope_for(settings),
                                                              "breaker")
    assert source._broker_prefix == "unit-x:broker:"
    off = RedisCollector.for_settings(settings.with_overrides(onebox_breaker_failures=0))
    assert off._breaker_key is None


# --- serving and multiprocess mode ----------------------------------------------------
def test_a_worker_serves_its_metrics_over_http_and_a_taken_port_only_warns(
        fresh: metrics.Metrics, caplog: pytest.LogCaptureFixture) -> None:
    from tasks import metrics as serving

    port = free_port()
    settings = Settings.defaults().with_overrides(
        metrics_port=port, metrics_address="127.0.0.1",
        redis_url=f"redis://127.0.0.1:{free_port()}/0")
    running = serving.serve(settings, multiprocess=False, info=worker_info())
    assert running is not None
    try:
        metrics.retried("ConnectionError")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
        assert 'fulfilment_retries_total{reason="ConnectionError"} 1.0' in text
        assert "fulfilment_metrics_redis_up 0.0" in text
        assert 'fulfilment_onebox_held_back_total{reason="circuit_open"} 0.0' in text
        assert 'fulfilment_worker_info{deployment="shop-a",node="worker1@host",pool="thread"} 1.0' \
            in text
        # A second worker on the same port serves nothing, and says so
        assert serving.serve(settings, multiprocess=False) is None
        assert "serves no metrics" in caplog.text
    finally:
        running.server.shutdown()
        running.server.server_close()


def test_a_metrics_address_that_does_not_resolve_is_named_not_the_port(
        caplog: pytest.LogCaptureFixture) -> None:
    from tasks import metrics as serving

    settings = Settings.defaults().with_overrides(
        metrics_port=free_port(), metrics_address="no-such-host.invalid")
    assert serving.serve(settings, multiprocess=False) is None
    assert "FULFILMENT_METRICS_ADDRESS='no-such-host.invalid' does not resolve" in caplog.text
    assert "FULFILMENT_METRICS_PORT" not in caplog.text


def test_multiprocess_mode_sums_the_processes_and_wipes_a_previous_run(tmp_path: Path) -> None:
    # In a process of its own: multiprocess mode changes prometheus_client for good.
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"stale")  # a previous worker's file
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector
        from fulfilment import metrics

        directory = Path({str(directory)!r})
        metrics.use_multiprocess(directory)
        assert not (directory / "counter_1.db").exists()
        children = []
        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                metrics.retried("ConnectionError")
                os._exit(0)
            children.append(pid)
        for pid in children:
            assert os.waitpid(pid, 0)[1] == 0
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(directory))
        print(registry.get_sample_value("fulfilment_retries_total",
                                        {{"reason": "ConnectionError"}}))
        print(len(list(directory.glob("counter_*.db"))))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2.0", "2"]


def test_an_exiting_pool_process_is_marked_dead(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import metrics as serving

    # Given its live-gauge file and its counters in the worker's directory
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    (tmp_path / "gauge_livesum_4242.db").write_bytes(b"")
    (tmp_path / "counter_4242.db").write_bytes(b"")
    # When it exits
    serving._process_exits(pid=4242)
    # Then its live gauges go, its counts stay (a counter never goes back)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_4242.db"]


# --- the dashboard ------------------------------------------------------------------
def exposed_names() -> set[str]:
    """Every sample name a worker's scrape can hold (families expanded by their type)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""]}
    names: set[str] = set()
    families = [*metrics.Metrics(CollectorRegistry()).registry.collect(),
                *collector(fakeredis.FakeRedis()).collect(), *worker_info().collect()]
    for family in families:
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def worker_info() -> Any:
    from tasks.metrics import WorkerInfo

    return WorkerInfo("worker1@host", "shop-a", "thread")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                yield node["expr"]
            for child in node.values():
                yield from walk(child)
        elif isinstance(node, list):
            for child in node:
                yield from walk(child)

    return list(walk(dashboard()))


def test_every_metric_the_dashboard_queries_exists() -> None:
    exprs = dashboard_exprs()
    queried = {name for expr in exprs for name in re.findall(r"\bfulfilment_[a-z0-9_]+", expr)}
    assert len(exprs) >= 10 and queried
    assert queried <= exposed_names(), queried - exposed_names()


def test_every_dashboard_expression_is_scoped_to_one_deployments_workers() -> None:
    """Two deployments on one Prometheus never add up: every series is picked by $instance,
    whose values are the chosen $deployment's workers (fulfilment_worker_info)."""
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert "fulfilment_worker_info," in variables["deployment"]["definition"]
    assert 'fulfilment_worker_info{deployment="$deployment"}' in \
        variables["instance"]["definition"]
    assert variables["instance"]["includeAll"] and variables["instance"]["multi"]
    for expr in dashboard_exprs():
        selectors = re.findall(r"\bfulfilment_[a-z0-9_]+(\{[^}]*\})?", expr)
        assert selectors and all('instance=~"$instance"' in s for s in selectors), expr


def test_the_worker_info_names_the_node_and_the_deployment() -> None:
    [family] = list(worker_info().collect())
    [sample] = family.samples
    assert sample.labels == {"node": "worker1@host", "deployment": "shop-a", "pool": "thread"}
    assert sample.value == 1


def test_every_metric_has_help_and_the_prefix() -> None:
    text = generate_latest(metrics.Metrics(CollectorRegistry()).registry).decode()
    families = [*metrics.Metrics(CollectorRegistry()).registry.collect(),
                *collector(fakeredis.FakeRedis()).collect(), *worker_info().collect()]
    for family in families:
        assert family.name.startswith("fulfilment_") and len(family.documentation) > 20
    assert "# HELP fulfilment_intents_total" in text
