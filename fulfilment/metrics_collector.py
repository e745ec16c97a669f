"""Fleet-wide gauges read from Redis when Prometheus scrapes (``RedisCollector``).

Above ``fulfilment.wiring`` and the guard (it reads the broker's key prefix and the
breaker's key as they do), so that ``fulfilment.metrics``, which the domain calls
on every order, stays a leaf that imports nothing of ours. ``tasks.metrics``
registers it with each worker's endpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import redis
from prometheus_client.core import GaugeMetricFamily, Metric

from fulfilment.callbacks import Backlog, backlog
from fulfilment.config import Settings
from fulfilment.intake import taken_count
from fulfilment.keys import Keys
from fulfilment.metrics import BREAKER_STATES
from fulfilment.onebox.guard import GuardConfig, scope_for
from fulfilment.redis_text import text
from fulfilment.wiring import transport_options


class RedisCollector:
    """Fleet-wide gauges read from Redis when Prometheus scrapes, never per order.

    One pipelined round trip of O(1) commands, whatever the backlog (and an LLEN of
    each intake drainer's chunk in hand, a few at most): LLEN of
    each queue's lists (kombu keeps one per priority step), HLEN of the
    broker's unacknowledged messages, ZCARD and the first member of the
    ledger's open set (as ``fulfilment.recovery`` reads it) and of the unsettled
    intents' (``fulfilment.unsettled``), the breaker's
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
        self.queues = (keys.task_queue, keys.live_queue, keys.continue_queue,
                       keys.maintenance_queue,
                       keys.results_queue, keys.failures_queue)

    @classmethod
    def for_settings(cls, settings: Settings, *, timeout: float = 2.0) -> RedisCollector:
        """Its own clients with short timeouts: a scrape must fail fast, not hang."""
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
        pipe.zcard(keys.open_intents)
        pipe.zrange(keys.open_intents, 0, 0, withscores=True)
        pipe.time()
        pipe.zcard(keys.unsettled_since)
        pipe.zrange(keys.unsettled_since, 0, 0, withscores=True)
        if self._breaker_key is not None:
            pipe.hgetall(self._breaker_key)
        answers = pipe.execute()
        intake, open_count, oldest, (seconds, micros), unsettled, first_unsettled = answers[:6]
        # Each drainer's chunk in hand: a short list of at most a few drainers.
        processing = taken_count(self._redis, keys)
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
        families.append(GaugeMetricFamily(
            "fulfilment_unsettled_intents", "Intents whose outcome is unsettled (a confirm "
            "was sent and Onebox could not tell yet): read again by themselves "
            "(FULFILMENT_SETTLE_FIRST, doubling to an hour, for FULFILMENT_SETTLE_FOR).",
            value=float(unsettled)))
        waited = max(now - float(first_unsettled[0][1]), 0.0) if first_unsettled else 0.0
        families.append(GaugeMetricFamily(
            "fulfilment_oldest_unsettled_intent_seconds", "Seconds since the oldest unsettled "
            "intent became unsettled (0 when none is).", value=waited))
        state = "disabled"
        if self._breaker_key is not None:
            breaker = {text(k): text(v) for k, v in answers[6].items()}
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
        families += _callback_families(backlog(self._redis, keys, now))
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


def _callback_families(waiting: Backlog) -> list[Metric]:
    """The callback outbox (``fulfilment.callbacks``): all 0 when no callback URL is set."""
    return [
        GaugeMetricFamily("fulfilment_callbacks_pending", "Outcomes waiting to be POSTed to "
                          "a shop's callback URL (due now, or backing off).",
                          value=float(waiting.pending)),
        GaugeMetricFamily("fulfilment_oldest_callback_age_seconds", "Seconds since the "
                          "outcome of the oldest callback still waiting was published (0 when "
                          "none waits).", value=waiting.oldest_age),
        GaugeMetricFamily("fulfilment_callback_endpoints_failing", "Callback endpoints whose "
                          "last try failed (held with backoff).",
                          value=float(len(waiting.failing))),
    ]


__all__ = ["RedisCollector"]
