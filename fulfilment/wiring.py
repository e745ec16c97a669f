"""Build the collaborators (Redis, Onebox client, ledger, publisher) from settings.

One place that knows how the parts fit, so the worker, the CLI, the demo and
the tests all assemble them the same way. The demo passes a fakeredis client
and a ``memory://`` broker; everything else uses the real ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from kombu import Connection
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from fulfilment.callbacks import CallbackOutbox
from fulfilment.config import Settings
from fulfilment.flow import Services
from fulfilment.keys import Keys
from fulfilment.lease import Leases
from fulfilment.ledger import Ledger
from fulfilment.onebox.client import build_client
from fulfilment.redis_transport import ssl_for, transport_for
from fulfilment.results import ResultPublisher
from fulfilment.retry import RetryPolicy
from fulfilment.sessioncap import SessionCap
from fulfilment.topology import Topology, is_amqp


def redis_client(settings: Settings) -> redis.Redis:
    """A Redis client that rides out a short blip (a failover, a restart)."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), 5),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


#: The embedded demo's in-memory broker: no hostname, and a short poll.
MEMORY_BROKER = "memory://localhost/"


def transport_options(settings: Settings) -> dict[str, Any]:
    """Broker transport options, the same for the Celery app and our own kombu use."""
    url = settings.effective_broker_url
    if url.startswith("memory://"):
        return {"polling_interval": 0.005}
    if is_amqp(url):
        # RabbitMQ: a publish returns only once the broker has taken the message
        # (for a quorum queue: written by a majority); a refusal raises.
        return {"confirm_publish": True}
    options: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout,
        # Look for messages of dead workers a tenth of the timeout apart (kombu's
        # default scans every 100 s, too seldom for a short timeout).
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
        "unacked_restore_throttle": 1,
        # BRPOP names the queues in the order a worker consumes them (continue, live,
        # maintenance, bulk: fulfilment.topology) and takes from the first that has a
        # message, instead of kombu's default rotation: live work is never behind bulk.
        "queue_order_strategy": "priority",
    }
    if url.startswith(("redis://", "rediss://")):
        # Every broker key under the deployment's prefix too: one Redis, many deployments.
        options["global_keyprefix"] = f"{settings.key_prefix}:broker:"
    return options


def broker_connection(settings: Settings) -> Connection:
    url = settings.effective_broker_url
    return Connection(url, transport=transport_for(url), ssl=ssl_for(url),
                      transport_options=transport_options(settings))


def build_ledger(settings: Settings, client: redis.Redis,
                 clock: Callable[[], float] | None = None) -> Ledger:
    """``clock``: Redis's time; None: a ``RedisClock`` on ``client`` (``fulfilment.clock``)."""
    return Ledger(client, Keys(settings.key_prefix), settings.ledger_retention, clock)


def build_services(settings: Settings, client: redis.Redis | None = None,
                   connection: Connection | None = None, *,
                   clock: Callable[[], float] | None = None) -> Services:
    """``clock``: Redis's time, the one seam for every stamp another process compares (the
    ledger's, the flow's expiries, the shared token's); None: read from Redis (``TIME``)."""
    client = client if client is not None else redis_client(settings)
    keys = Keys(settings.key_prefix)
    ledger = build_ledger(settings, client, clock)
    return Services(
        settings=settings,
        client=build_client(settings, client, ledger.clock),
        ledger=ledger,
        publisher=ResultPublisher(connection or broker_connection(settings),
                                  Topology.for_keys(keys, settings.effective_broker_url),
                                  callbacks=CallbackOutbox(client, keys, settings.callback_routes,
                                                           ledger.clock)
                                  if settings.callback_routes else None),
        leases=Leases(client, keys, settings.lease_ttl,
                      max_hold=settings.task_time_limit),
        policy=RetryPolicy.from_settings(settings),
        clock=ledger.clock,
        session_cap=SessionCap(client, keys, settings.session_cap, hold=settings.lease_ttl,
                               max_hold=settings.task_time_limit) if settings.session_cap else None,
    )
