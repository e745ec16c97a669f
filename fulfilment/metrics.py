"""What a worker counts for Prometheus, and the few functions its call sites use.

Cost first: a purchase is ~10 ms of worker CPU, and every update here is a
plain counter or histogram update at its call site (about a microsecond; a
few more in multiprocess mode, where it lands in a memory-mapped file). No
update does I/O or talks to Redis. What only Redis knows (queue depths, open
intents, the fleet's circuit breaker) is read by ``RedisCollector`` when
Prometheus scrapes, in one pipelined round trip of O(1) commands, never per
order.

Serving (the HTTP endpoint, Celery's prefork pool) is ``tasks.metrics``; this
module knows nothing of Celery. Its metric objects are built on first use, in
the process that uses them, so that a prefork pool process builds them after
``use_multiprocess`` chose where they are kept.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import redis
import requests
from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric

from fulfilment.keys import Keys
from fulfilment.redis_text import text

if TYPE_CHECKING:
    from fulfilment.config import Settings
    from schemas.result import OrderResult

#: One run of a step's task: from a few ms (publish) to a whole basket of seats calls.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: One HTTP call to Onebox, up to the read timeout (15 s by default).
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)
#: A wait for a rate-limit slot, up to ONEBOX_RATE_LIMIT_MAX_WAIT (10 s by default).
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: ``fulfilment.onebox.guard``'s verdicts that hold a call back, by the reason counted.
#: (OPEN, PROBING and TOO_LONG there; a unit test keeps the two in step.)
HELD_BACK_REASONS = {1: "circuit_open", 2: "probing", 3: "rate_limited"}
#: The guard's breaker changes worth counting (its ``_REPORT`` script's answers).
BREAKER_CHANGES = frozenset({"opened", "reopened", "closed"})
#: The breaker's states as the collector reports them.
BREAKER_STATES = ("closed", "open", "half_open", "disabled")


class Metrics:
    """Every metric a worker process updates, in one registry (a test's own, or a fresh one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.outcomes = Counter(
            "fulfilment_intents", "Purchase outcomes this worker wrote to the ledger, by status "
            "(confirmed, failed, unsettled) and error code (empty when confirmed).",
            ["status", "code"], registry=r)
        self.step_seconds = Histogram(
            "fulfilment_step_duration_seconds", "Seconds one run of a step's task took "
            "(basket, pre_confirm, confirm, publish, ...), retried runs included, queueing "
            "excluded.", ["step"], buckets=STEP_BUCKETS, registry=r)
        self.onebox_calls = Counter(
            "fulfilment_onebox_calls", "HTTP calls sent to Onebox, by endpoint (the flow's "
            "step: token, create, seats, buyer_data, pre_confirm, confirm, release, get_order, "
            "...) and HTTP status, or timeout / connection_error when none came back.",
            ["endpoint", "status"], registry=r)
        self.onebox_seconds = Histogram(
            "fulfilment_onebox_call_duration_seconds", "Seconds one HTTP call to Onebox took, "
            "by endpoint (the rate limit's wait excluded).", ["endpoint"],
            buckets=CALL_BUCKETS, registry=r)
        self.retries = Counter(
            "fulfilment_retries", "Step retries scheduled, by reason: the error code that "
            "caused it (HTTP_503, READ_TIMEOUT, CIRCUIT_OPEN, RATE_LIMITED, ...), the flow's own "
            "reason, or the class of a Redis or broker error Celery retried.",
            ["reason"], registry=r)
        self.held_back = Counter(
            "fulfilment_onebox_held_back", "Onebox calls the fleet's guard stopped before "
            "sending: circuit_open, probing (another worker probes), rate_limited (no slot "
            "within ONEBOX_RATE_LIMIT_MAX_WAIT).", ["reason"], registry=r)
        self.rate_wait = Histogram(
            "fulfilment_onebox_rate_limit_wait_seconds", "Seconds a call waited for its slot "
            "under ONEBOX_RATE_LIMIT (only calls that waited).", buckets=WAIT_BUCKETS,
            registry=r)
        self.breaker_changes = Counter(
            "fulfilment_onebox_circuit_changes", "Changes of the fleet's circuit breaker made "
            "by this worker: opened, reopened (the probe failed), closed (the probe "
            "succeeded).", ["change"], registry=r)


class _Current:
    """This process's ``Metrics``, or None until first use."""

    lock = threading.Lock()
    metrics: Metrics | None = None


def current() -> Metrics:
    """This process's metrics, built on first use (see the module docstring)."""
    found = _Current.metrics
    if found is None:
        return _build()
    return found


def _build() -> Metrics:
    with _Current.lock:
        if _Current.metrics is None:
            _Current.metrics = Metrics()
        return _Current.metrics


def install(metrics: Metrics | None) -> None:
    """Use these metrics from now on (tests); None: build afresh on next use."""
    with _Current.lock:
        _Current.metrics = metrics


def use_multiprocess(directory: Path) -> None:
    """Keep this process's metrics, and its future children's, in files under ``directory``.

    For a prefork pool: each pool process writes its own files and the parent
    serves their sum (``prometheus_client``'s multiprocess mode). The directory
    is wiped first: files of a worker that ran before would add to this one's.
    ``prometheus_client`` picks its mode when first imported, from
    ``PROMETHEUS_MULTIPROC_DIR``; here it is chosen again, before any value of
    ours exists, so the worker needs no variable set by a start-up script.
    """
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    install(None)  # built anew, in each pool process, on first use


# --- the call sites' updates ------------------------------------------------------
def outcome_written(outcome: OrderResult, stands: OrderResult) -> OrderResult:
    """Count ``outcome`` if it is the one that stands (the ledger keeps the first only)."""
    if stands.finished_at == outcome.finished_at and stands.status == outcome.status:
        code = outcome.error.code if outcome.error is not None else ""
        current().outcomes.labels(outcome.status, code).inc()
    return stands


class _Decision(Protocol):
    """``fulfilment.flow``'s decision: ``RetryIn`` has a ``reason``, ``Proceed`` none."""


D = TypeVar("D", bound=_Decision)


def decided(decision: D) -> D:
    """Count a retry the flow scheduled (a ``RetryIn``), by its reason."""
    reason = getattr(decision, "reason", None)
    if reason is not None:
        current().retries.labels(reason).inc()
    return decision


def retried(reason: str) -> None:
    """Count a retry the flow did not decide (Celery's own, for a Redis or broker error)."""
    current().retries.labels(reason).inc()


def step_ran(step: str, seconds: float) -> None:
    current().step_seconds.labels(step).observe(seconds)


def onebox_call(endpoint: str,
                call: Callable[[], requests.Response]) -> Callable[[], requests.Response]:
    """``call``, counted and timed when it is sent (a call the guard stops never is)."""

    def sent() -> requests.Response:
        start = time.perf_counter()
        try:
            response = call()
        except requests.Timeout:
            _called(endpoint, "timeout", start)
            raise
        except requests.ConnectionError:
            _called(endpoint, "connection_error", start)
            raise
        except Exception:
            _called(endpoint, "error", start)
            raise
        _called(endpoint, str(response.status_code), start)
        return response

    return sent


def _called(endpoint: str, status: str, start: float) -> None:
    metrics = current()
    metrics.onebox_seconds.labels(endpoint).observe(time.perf_counter() - start)
    metrics.onebox_calls.labels(endpoint, status).inc()


def guard_verdict(verdict: int, seconds: float) -> None:
    """The guard's answer to one call: held back (by reason), or a wait for its slot."""
    reason = HELD_BACK_REASONS.get(verdict)
    if reason is not None:
        current().held_back.labels(reason).inc()
    elif seconds > 0:
        current().rate_wait.observe(seconds)


def breaker_changed(change: str) -> None:
    if change in BREAKER_CHANGES:
        current().breaker_changes.labels(change).inc()


# --- read from Redis at scrape time --------------------------------------------------
class RedisCollector:
    """Fleet-wide gauges read from Redis when Prometheus scrapes, never per order.

    One pipelined round trip of O(1) commands, whatever the backlog: LLEN of
    each queue's lists (kombu keeps one per priority step), HLEN of the
    broker's unacknowledged messages, ZCARD and the first member of the
    ledger's open set (as ``fulfilment.recovery`` reads it), the breaker's
    hash (as ``OneboxGuard.state``) and Redis's clock. No SCAN. Every worker
    reports the same values: take ``max`` across workers, not ``sum``.
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, breaker_key: str | None,
                 broker: redis.Redis | None = None, broker_prefix: str = "",
                 priority_steps: Iterable[int] = (0, 3, 6, 9)) -> None:
        self._redis = client
        self._keys = keys
        self._breaker_key = breaker_key
        self._broker = broker
        self._broker_prefix = broker_prefix
        self._steps = tuple(priority_steps)
        self.queues = (keys.task_queue, keys.continue_queue, keys.maintenance_queue,
                       keys.results_queue, keys.failures_queue)

    @classmethod
    def for_settings(cls, settings: Settings, *, timeout: float = 2.0) -> RedisCollector:
        """Its own clients with short timeouts: a scrape must fail fast, not hang."""
        from fulfilment.onebox.guard import GuardConfig, scope_for  # the guard imports us
        from fulfilment.wiring import transport_options

        def client(url: str) -> redis.Redis:
            return redis.Redis.from_url(url, socket_timeout=timeout,
                                        socket_connect_timeout=timeout)

        keys = Keys(settings.key_prefix)
        ledger = client(settings.redis_url)
        broker_url = settings.effective_broker_url
        broker: redis.Redis | None = None
        if broker_url.startswith(("redis://", "rediss://")):
            broker = ledger if broker_url == settings.redis_url else client(broker_url)
        breaker = keys.onebox_guard(scope_for(settings), "breaker") \
            if GuardConfig.from_settings(settings).breaker_failures else None
        prefix = str(transport_options(settings).get("global_keyprefix", ""))
        return cls(ledger, keys, breaker_key=breaker, broker=broker, broker_prefix=prefix)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fulfilment_metrics_redis_up", "1 when this scrape could read "
                               "Redis for the fleet-wide gauges below, 0 when not.")
        try:
            families = self._read()
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> list[Metric]:
        keys = self._keys
        pipe = self._redis.pipeline(transaction=False)
        pipe.llen(keys.intake)
        pipe.llen(keys.intake_processing)
        pipe.zcard(keys.open_intents)
        pipe.zrange(keys.open_intents, 0, 0, withscores=True)
        pipe.time()
        if self._breaker_key is not None:
            pipe.hgetall(self._breaker_key)
        answers = pipe.execute()
        intake, processing, open_count, oldest, (seconds, micros) = answers[:5]
        now = float(seconds) + float(micros) / 1_000_000
        queue = GaugeMetricFamily(
            "fulfilment_queue_messages", "Messages waiting on a queue: the broker's queues "
            "(Redis broker only) and the Redis-list intake (<prefix>:intake, and "
            ":intake:processing, taken but not yet admitted).", labels=["queue"])
        queue.add_metric([keys.intake], float(intake))
        queue.add_metric([keys.intake_processing], float(processing))
        families: list[Metric] = [queue]
        if self._broker is not None:
            depths, unacked = self._broker_depths()
            for name, depth in depths.items():
                queue.add_metric([name], float(depth))
            families.append(GaugeMetricFamily(
                "fulfilment_broker_unacked_messages", "Messages delivered to workers and not "
                "yet acknowledged: running, prefetched, or waiting out a retry's countdown.",
                value=float(unacked)))
        families.append(GaugeMetricFamily(
            "fulfilment_open_intents", "Admitted intents without a published outcome (the "
            "ledger's open set, which the recovery sweep walks).", value=float(open_count)))
        idle = max(now - float(oldest[0][1]), 0.0) if oldest else 0.0
        families.append(GaugeMetricFamily(
            "fulfilment_oldest_open_intent_idle_seconds", "Seconds since the open intent that "
            "has gone longest without progress last progressed (0 when none is open); the "
            "recovery sweep resumes it past FULFILMENT_STUCK_AFTER.", value=idle))
        state = "disabled"
        if self._breaker_key is not None:
            breaker = {text(k): text(v) for k, v in answers[5].items()}
            state = "closed"
            if "open_until" in breaker:
                state = "open" if float(breaker["open_until"]) > now * 1_000_000 else "half_open"
        circuit = GaugeMetricFamily(
            "fulfilment_onebox_circuit_state", "The fleet's circuit breaker toward Onebox: 1 "
            "for the state it is in (closed, open, half_open: cool-down over, one probe "
            "allowed; disabled: ONEBOX_BREAKER_FAILURES=0), 0 for the others.",
            labels=["state"])
        for name in BREAKER_STATES:
            circuit.add_metric([name], 1.0 if name == state else 0.0)
        families.append(circuit)
        return families

    def _broker_depths(self) -> tuple[dict[str, int], int]:
        """Ready messages per queue (summed over kombu's priority lists), and unacked ones."""
        assert self._broker is not None
        prefix = self._broker_prefix
        pipe = self._broker.pipeline(transaction=False)
        for name in self.queues:
            for step in self._steps:
                pipe.llen(f"{prefix}{name}" if step == 0 else f"{prefix}{name}\x06\x16{step}")
        pipe.hlen(f"{prefix}unacked")
        answers = pipe.execute()
        per_queue = len(self._steps)
        depths = {name: sum(int(n) for n in answers[i * per_queue:(i + 1) * per_queue])
                  for i, name in enumerate(self.queues)}
        return depths, int(answers[-1])


__all__ = ["Metrics", "RedisCollector", "breaker_changed", "current", "decided",
           "guard_verdict", "install", "onebox_call", "outcome_written", "retried", "step_ran",
           "use_multiprocess"]
