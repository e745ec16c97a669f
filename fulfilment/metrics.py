"""What a worker counts for Prometheus, and the few functions its call sites use.

Cost first: a purchase is ~10 ms of worker CPU, and every update here is a
plain counter or histogram update at its call site (about a microsecond; a
few more in multiprocess mode, where it lands in a memory-mapped file). No
update does I/O or talks to Redis. What only Redis knows (queue depths, open
intents, the fleet's circuit breaker) is read by
``fulfilment.metrics_collector`` when Prometheus scrapes, never per order.

A leaf: the flow, the ledger and the Onebox guard import it, and it imports
nothing of ours (a unit test keeps it so). Serving (the HTTP endpoint,
Celery's prefork pool) is ``tasks.metrics``; this module knows nothing of
Celery. Its metric objects are built on first use, in the process that uses
them, so that a prefork pool process builds them after ``use_multiprocess``
chose where they are kept. Labels whose values are known beforehand start at
0, so that a dashboard reads 0 rather than "No data" before the first event.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar

import requests
from prometheus_client import CollectorRegistry, Counter, Histogram, values

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
        self.session_cap_waits = Counter(
            "fulfilment_session_cap_waits", "Basket starts held back by FULFILMENT_SESSION_CAP "
            "(a session the intent needs is at its cap): first (the intent joined the line: "
            "intents held back) or again (it asked again, still in line).", ["wait"],
            registry=r)
        self.callbacks_delivered = Counter(
            "fulfilment_callbacks_delivered", "Outcomes POSTed to a shop's callback URL and "
            "answered 2xx (fulfilment.callbacks).", registry=r)
        self.callback_failures = Counter(
            "fulfilment_callback_failures", "Callback tries that failed, by reason: timeout, "
            "connection_error, refused (an address FULFILMENT_CALLBACK_ALLOW does not allow), "
            "or http_<status>. Each is tried again with backoff.", ["reason"], registry=r)
        self.callbacks_dropped = Counter(
            "fulfilment_callbacks_dropped", "Callbacks given up on, by reason: expired (not "
            "delivered within FULFILMENT_CALLBACK_FOR), no_url (the shop's URL was removed).",
            ["reason"], registry=r)
        # At 0 before their first event: a panel reads 0, not "No data".
        for reason in ("timeout", "connection_error", "refused"):
            self.callback_failures.labels(reason)
        for reason in ("expired", "no_url"):
            self.callbacks_dropped.labels(reason)
        self.outcomes.labels("confirmed", "")
        for reason in HELD_BACK_REASONS.values():
            self.held_back.labels(reason)
        for change in sorted(BREAKER_CHANGES):
            self.breaker_changes.labels(change)
        for wait in ("first", "again"):
            self.session_cap_waits.labels(wait)


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
class _Error(Protocol):
    @property
    def code(self) -> str: ...


class _Outcome(Protocol):
    """``schemas.result.OrderResult`` as far as it is counted (we import none of ours)."""

    @property
    def status(self) -> str: ...
    @property
    def finished_at(self) -> datetime | None: ...
    @property
    def error(self) -> _Error | None: ...


R = TypeVar("R", bound=_Outcome)


def outcome_written(outcome: R, stands: R) -> R:
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


def session_cap_waited(*, first: bool) -> None:
    """A basket start held back by the session cap (``first``: the intent joined the line)."""
    current().session_cap_waits.labels("first" if first else "again").inc()


def callback_delivered() -> None:
    current().callbacks_delivered.inc()


def callback_failed(reason: str) -> None:
    current().callback_failures.labels(reason).inc()


def callback_dropped(reason: str) -> None:
    current().callbacks_dropped.labels(reason).inc()


def breaker_changed(change: str) -> None:
    if change in BREAKER_CHANGES:
        current().breaker_changes.labels(change).inc()


__all__ = ["Metrics", "breaker_changed", "callback_delivered", "callback_dropped",
           "callback_failed", "current", "decided",
           "guard_verdict", "install", "onebox_call", "outcome_written", "retried",
           "session_cap_waited", "step_ran", "use_multiprocess"]
