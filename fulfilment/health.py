"""``fulfilment health``: is this deployment able to sell, and is anything piling up?

One run checks, each with a bound on its time: the ledger's Redis (PING), the
broker (a connection, then each queue's depth), Onebox (a token is fetched:
the credentials work and the API answers), the Redis-list intake (its depth,
and when celery beat last drained it: without beat it stalls silently),
intents stuck past ``FULFILMENT_STUCK_AFTER`` (what the recovery sweep should
be resuming), unsettled intents (read again by themselves; degraded once
one has waited ``UNSETTLED_DEGRADED_AFTER`` or left the schedule), and, when a
callback URL is set, the callbacks waiting for the shops' endpoints (how many,
the oldest's age, the endpoints failing).

Each check is ``ok``, ``degraded`` (working, but something needs a look:
stuck intents, an intake beat has not drained lately) or ``unhealthy``
(cannot work: Redis, the broker or Onebox unreachable or refusing), or
``skipped`` (it needs a service that is down). The whole is the worst of its
checks; the command exits 0 only when it is ``ok``, so a probe needs no
parsing. Nothing here writes, and nothing shows a secret or a buyer's data.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from kombu import Connection, Queue

from fulfilment.callbacks import backlog as callback_backlog
from fulfilment.clock import redis_time
from fulfilment.config import Settings, mask_url
from fulfilment.errors import FulfilmentError
from fulfilment.intake import last_drained, taken_count
from fulfilment.keys import Keys
from fulfilment.redis_text import text
from fulfilment.release import waiting as bulk_waiting
from fulfilment.topology import Topology, is_amqp
from fulfilment.unsettled import SETTLE_CAP, UnsettledIndex, describe_age

OK, DEGRADED, UNHEALTHY, SKIPPED = "ok", "degraded", "unhealthy", "skipped"
_RANK = {OK: 0, SKIPPED: 0, DEGRADED: 1, UNHEALTHY: 2}
#: Seconds any one service may take to answer a check.
TIMEOUT = 5.0
#: The intake counts as stalled when its last drain is older than this many
#: drain intervals (``FULFILMENT_INTAKE_INTERVAL``), and at least ``INTAKE_STALE_MIN`` s.
INTAKE_STALE_INTERVALS = 10
INTAKE_STALE_MIN = 30.0
#: A waiting callback makes health degraded past this many longest backoffs
#: (``FULFILMENT_CALLBACK_MAX_DELAY``), and at least ``CALLBACK_STALE_MIN`` s.
CALLBACK_STALE_DELAYS = 5
CALLBACK_STALE_MIN = 300.0
#: Stuck references listed by name.
STUCK_SHOWN = 5
#: An unsettled intent waiting longer than this makes health degraded: by then its
#: reads have backed off to their cap (about seven refused in a row), so Onebox's
#: silence is no blip, and a buyer may have paid without knowing it.
UNSETTLED_DEGRADED_AFTER = SETTLE_CAP


@dataclass(frozen=True)
class Check:
    """One check's verdict, a line for people and figures for programs."""

    name: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Health:
    checks: tuple[Check, ...]
    checked_at: float

    @property
    def status(self) -> str:
        worst = max(self.checks, key=lambda check: _RANK[check.status], default=None)
        if worst is None or _RANK[worst.status] == 0:
            return OK
        return worst.status

    @property
    def healthy(self) -> bool:
        return self.status == OK

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "checked_at": self.checked_at,
                "checks": {check.name: {"status": check.status, "detail": check.detail,
                                        **check.data} for check in self.checks}}

    def lines(self) -> list[str]:
        width = max((len(check.name) for check in self.checks), default=0)
        rows = [f"{check.name:<{width}}  {check.status:<9}  {check.detail}"
                for check in self.checks]
        return [*rows, f"health: {self.status}"]


def check_health(settings: Settings, *, onebox: bool = True,
                 clock: Callable[[], float] | None = None) -> Health:
    """Run every check against the deployment these settings describe.

    ``clock``: None reads Redis's (the workers stamp progress on it), this host's
    only when Redis cannot be read.
    """
    now = clock() if clock is not None else time.time()
    keys = Keys(settings.key_prefix)
    checks: list[Check] = []
    with _redis(settings) as client:
        redis_check = _check_redis(settings, client)
        checks.append(redis_check)
        redis_up = redis_check.status == OK
        checks.append(_check_broker_and_queues(settings, keys, client if redis_up else None))
        if onebox:
            checks.append(_check_onebox(settings, client))
        if redis_up:
            now = clock() if clock is not None else redis_time(client)
            checks.append(_check_stuck(settings, keys, client, now))
            checks.append(_check_intake(settings, keys, client, now))
            checks.append(_check_unsettled(settings, keys, client, now))
            if settings.callback_routes:
                checks.append(_check_callbacks(settings, keys, client, now))
        else:
            checks += [Check(name, SKIPPED, "not checked: Redis is unreachable")
                       for name in ("stuck", "intake", "unsettled")]
            if settings.callback_routes:
                checks.append(Check("callbacks", SKIPPED, "not checked: Redis is unreachable"))
    return Health(tuple(checks), now)


@contextlib.contextmanager
def _redis(settings: Settings) -> Iterator[redis.Redis]:
    """A client that fails fast: a health check must answer, not ride out an outage."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=TIMEOUT,
                                  socket_connect_timeout=TIMEOUT)
    try:
        yield client
    finally:
        client.close()


def _check_redis(settings: Settings, client: redis.Redis) -> Check:
    where = mask_url(settings.redis_url)
    started = time.monotonic()
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check("redis", UNHEALTHY, f"{where}: {type(exc).__name__}", {"url": where})
    millis = (time.monotonic() - started) * 1000
    return Check("redis", OK, f"{where}: PING {millis:.1f} ms",
                 {"url": where, "ping_ms": round(millis, 2)})


def _check_broker_and_queues(settings: Settings, keys: Keys,
                             client: redis.Redis | None) -> Check:
    """The broker answers, and how many messages wait in each queue of ours."""
    from fulfilment.wiring import broker_connection

    where = mask_url(settings.effective_broker_url)
    topology = Topology.for_keys(keys, settings.effective_broker_url)
    amqp = is_amqp(settings.effective_broker_url)
    depths: dict[str, int | None] = {}
    try:
        with broker_connection(settings) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=int(TIMEOUT))
            for label, queue in (("purchase", topology.task_queue),
                                 ("live", topology.live_queue),
                                 ("continue", topology.continue_queue),
                                 ("maintenance", topology.maintenance_queue),
                                 ("results", topology.results_queue),
                                 ("failures", topology.failures_queue)):
                depths[label] = _depth(connection, queue, amqp)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the broker is the verdict
        return Check("broker", UNHEALTHY, f"{where}: {type(exc).__name__}", {"url": where})
    if client is not None:
        depths["intake"] = int(client.llen(keys.intake))
        depths["intake_processing"] = taken_count(client, keys)
    shown = ", ".join(f"{name} {count if count is not None else '?'}"
                      for name, count in depths.items())
    data: dict[str, Any] = {"url": where, "queues": depths}
    if client is not None:
        # Bulk intents waiting in Redis for their release (fulfilment.release), per shop.
        waiting = bulk_waiting(client, keys)
        data["bulk"] = {"waiting": waiting.by_shop, "in_flight": waiting.in_flight}
        shops = ", ".join(f"{shop} {n}" for shop, n in waiting.by_shop.items()) or "none"
        shown += f"; bulk waiting in Redis by shop: {shops}, {waiting.in_flight} in flight"
    return Check("broker", OK, f"{where}: queues {shown}", data)


def _depth(connection: Connection, queue: Queue, amqp: bool) -> int | None:
    """Messages waiting in ``queue`` (0 when the broker has no such queue yet).

    RabbitMQ is asked passively (a declaration could clash with the queue's
    arguments). kombu's Redis transport answers a passive declaration "not
    found" whenever ``global_keyprefix`` is set (its existence check ignores
    the prefix), so there the queue is declared as every producer of ours
    declares it, which changes nothing and answers its length.
    """
    channel: Any = connection.channel()
    try:
        declared: Any = queue.bind(channel).queue_declare(passive=amqp)
        return int(declared[1])  # (name, message count, consumer count)
    except connection.channel_errors:
        return 0
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def _check_onebox(settings: Settings, client: redis.Redis) -> Check:
    """Fetch a token: the credentials are right and Onebox answers (one call each run)."""
    from fulfilment.onebox.auth import TokenProvider
    from fulfilment.onebox.client import new_session
    from fulfilment.onebox.guard import OneboxGuard

    where = mask_url(settings.token_url)
    session = new_session()
    started = time.monotonic()
    try:
        # The fleet's guard too: a probe must not add to an open breaker's load.
        guard = OneboxGuard.for_settings(settings, client)
        tokens = TokenProvider(settings, client, session, guard=guard)
        # A fresh grant, not the shared cache (a cached token proves nothing now).
        # ``check_credentials`` would hide the error's code and status from us.
        grant = tokens._fetch()
    except FulfilmentError as exc:
        status = f"HTTP {exc.status}, " if exc.status is not None else ""
        return Check("onebox", UNHEALTHY, f"{where}: no token ({status}{exc.code}: "
                     f"{exc.message})", {"url": where, "code": exc.code, "http": exc.status})
    finally:
        session.close()
    millis = (time.monotonic() - started) * 1000
    lifetime = grant.expires_at - time.time()
    return Check("onebox", OK, f"{where}: token granted in {millis:.0f} ms "
                 f"(channel {settings.onebox_channel_id})",
                 {"url": where, "token_ms": round(millis, 1),
                  "token_valid_s": max(round(lifetime), 0)})


def _check_stuck(settings: Settings, keys: Keys, client: redis.Redis, now: float) -> Check:
    """Open intents without progress for longer than the sweep's threshold."""
    deadline = now - settings.stuck_after
    open_count = int(client.zcard(keys.open_intents))
    stuck = int(client.zcount(keys.open_intents, "-inf", deadline))
    oldest: Any = client.zrange(keys.open_intents, 0, STUCK_SHOWN - 1, withscores=True)
    listed: list[dict[str, Any]] = [
        {"reference": text(ref), "idle_s": round(now - float(score))}
        for ref, score in oldest if float(score) <= deadline]
    data = {"open": open_count, "stuck": stuck, "stuck_after_s": settings.stuck_after,
            "oldest": listed}
    threshold = f"no progress for {settings.stuck_after:g} s (FULFILMENT_STUCK_AFTER)"
    if not stuck:
        return Check("stuck", OK, f"none of {open_count} open intents has had {threshold}",
                     data)
    named = ", ".join(f"{item['reference']} ({describe_age(float(item['idle_s']))})"
                      for item in listed)
    return Check("stuck", DEGRADED, f"{stuck} of {open_count} open intents have had "
                 f"{threshold}: {named}; is the recovery sweep (celery beat) running, "
                 f"and a worker?", data)


def _check_intake(settings: Settings, keys: Keys, client: redis.Redis, now: float) -> Check:
    """When beat last drained the Redis-list intake: without beat it stalls silently."""
    waiting = int(client.llen(keys.intake)) + taken_count(client, keys)
    drained = last_drained(client, keys)
    stale_after = max(INTAKE_STALE_INTERVALS * settings.intake_interval, INTAKE_STALE_MIN)
    data = {"waiting": waiting, "last_drained_at": drained,
            "last_drained_s_ago": None if drained is None else round(now - drained, 1),
            "stale_after_s": stale_after}
    if drained is None:
        return Check("intake", DEGRADED, f"never drained ({waiting} waiting): is celery beat "
                     "running (celery -A tasks beat, or a worker with -B)?", data)
    age = now - drained
    if age > stale_after:
        return Check("intake", DEGRADED, f"last drained {describe_age(age)} ago, more than "
                     f"{stale_after:g} s ({waiting} waiting): is celery beat running?", data)
    return Check("intake", OK, f"last drained {describe_age(age)} ago, {waiting} waiting", data)


def _check_unsettled(settings: Settings, keys: Keys, client: redis.Redis,
                     now: float) -> Check:
    """Unsettled intents: read again by themselves, but a long wait needs a person."""
    waiting = UnsettledIndex(client, keys).waiting()
    oldest = waiting.oldest_age(now)
    data = {"unsettled": waiting.count, "oldest_s": round(oldest),
            "off_schedule": waiting.off_schedule,
            "degraded_after_s": UNSETTLED_DEGRADED_AFTER, "settle_for_s": settings.settle_for}
    if not waiting.count:
        return Check("unsettled", OK, "none", data)
    shown = f"{waiting.count} unsettled, the oldest for {describe_age(oldest)}"
    if waiting.off_schedule:
        return Check("unsettled", DEGRADED, f"{shown}; {waiting.off_schedule} no longer read "
                     f"again (past FULFILMENT_SETTLE_FOR, {settings.settle_for:g} s): ask "
                     "Onebox support, then 'fulfilment settle'; 'fulfilment unsettled' lists "
                     "them", data)
    if oldest > UNSETTLED_DEGRADED_AFTER:
        return Check("unsettled", DEGRADED, f"{shown}, more than "
                     f"{UNSETTLED_DEGRADED_AFTER:g} s: Onebox has not shown their orders "
                     "since; 'fulfilment unsettled' lists the last answers (is the orders "
                     "scope granted? is celery beat running?)", data)
    return Check("unsettled", OK, f"{shown}; read again by themselves", data)


def _check_callbacks(settings: Settings, keys: Keys, client: redis.Redis, now: float) -> Check:
    """Outcomes waiting for the shops' callback URLs: degraded once the oldest has waited
    past ``callback_stale_after`` (an endpoint down that long, or the sender not running)."""
    waiting = callback_backlog(client, keys, now)
    stale_after = callback_stale_after(settings)
    data = {"pending": waiting.pending, "oldest_s": round(waiting.oldest_age, 1),
            "stale_after_s": stale_after,
            "failing": {url: {"failures": hold.get("failures"), "reason": hold.get("reason"),
                              "failing_for_s": round(now - float(hold.get("since", now)), 1)}
                        for url, hold in waiting.failing.items()}}
    failing = "; ".join(f"{url} failing for {describe_age(now - float(hold.get('since', now)))} "
                        f"({hold.get('reason')})" for url, hold in waiting.failing.items())
    detail = f"{waiting.pending} waiting"
    if waiting.pending:
        detail += f", oldest {describe_age(waiting.oldest_age)}"
    if failing:
        detail += f"; {failing}"
    if waiting.oldest_age > stale_after:
        return Check("callbacks", DEGRADED, f"{detail}: older than {stale_after:g} s; is the "
                     "shop's endpoint up, and celery beat running?", data)
    return Check("callbacks", OK, detail, data)


def callback_stale_after(settings: Settings) -> float:
    """Seconds a callback may wait before health says degraded: a few full backoffs."""
    return max(CALLBACK_STALE_MIN, CALLBACK_STALE_DELAYS * settings.callback_max_delay)
