"""The recovery sweep: the ledger, not the broker, is the record of what is owed.

An intent whose ledger entry has not moved for ``stuck_after`` seconds and has
no published outcome lost its message somewhere (a broker restart, a worker
killed past its visibility timeout, a chain that stalled, a producer that died
between admitting and dispatching). The sweep dispatches it again; the flow
resumes it from the ledger, and the lease keeps a late original from racing it.

One sweep at a time (a Redis lock), and it never drops an intent it could not
read for a passing reason (Redis slow, the task's time limit): only an entry
that is gone, published, or that no code can ever decode leaves the open set.

Refunds are owed the same care: a refund admitted whose message was lost (a
producer that died after admitting it, a broker that lost the message before
any worker took it) is dispatched again by the same sweep, under the same lock,
past the same ``stuck_after`` (``fulfilment.refunds.resume_stuck``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis

from fulfilment import refunds
from fulfilment.flow import Services
from fulfilment.keys import Keys
from fulfilment.ledger import UNREADABLE

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Swept:
    """What one sweep dispatched again: intents by reference, refunds by id."""

    intents: list[str] = field(default_factory=list)
    refunds: list[str] = field(default_factory=list)


def sweep_all(services: Services, dispatch: Callable[[str], None],
              dispatch_refund: Callable[[Mapping[str, Any]], None], *,
              limit: int = 500) -> Swept:
    """Dispatch every stuck intent and every stuck refund again (what celery beat runs)."""
    with _one_sweep(services) as running:
        if not running:
            return Swept()
        intents = _sweep(services, dispatch, limit)
        resumed = refunds.resume_stuck(services, dispatch_refund,
                                       older_than=services.settings.stuck_after, limit=limit)
        if resumed:
            log.warning("recovery sweep resumed %d stuck refunds", len(resumed))
        return Swept(intents, resumed)


def sweep(services: Services, dispatch: Callable[[str], None], *, limit: int = 500) -> list[str]:
    """Dispatch every stuck intent again; return their references (intents only: a
    deployment that takes refunds runs ``sweep_all``)."""
    with _one_sweep(services) as running:
        return _sweep(services, dispatch, limit) if running else []


@contextmanager
def _one_sweep(services: Services) -> Iterator[bool]:
    """The sweep's lock: True while held, False when another sweep is running."""
    client = services.ledger.redis
    lock = client.lock(Keys(services.settings.key_prefix).sweep_lock,
                       timeout=max(services.settings.sweep_interval * 4, 60.0),
                       blocking_timeout=0)
    if not lock.acquire(blocking=False):
        log.info("another recovery sweep is running")
        yield False
        return
    try:
        yield True
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            log.warning("the sweep's lock expired while it ran")


def _sweep(services: Services, dispatch: Callable[[str], None], limit: int) -> list[str]:
    deadline = services.clock() - services.settings.stuck_after
    resumed = []
    for reference in services.ledger.stuck(deadline, limit=limit):
        try:
            entry = services.ledger.get(reference)
        except UNREADABLE as exc:
            log.exception("ledger entry of %s is unreadable; sent to the failures queue",
                          reference)
            services.publisher.publish_failure(f"unreadable ledger entry: {type(exc).__name__}",
                                               {"reference": [reference]}, None)
            services.ledger.forget_open(reference)
            continue
        if entry is None or entry.published:
            services.ledger.forget_open(reference)  # expired, or done meanwhile
            continue
        # Mark progress now, so the next sweep gives this dispatch time to work.
        services.ledger.record(reference)
        dispatch(reference)
        resumed.append(reference)
    if resumed:
        log.warning("recovery sweep resumed %d stuck intents", len(resumed))
    return resumed
