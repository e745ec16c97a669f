"""Intents from any language: a plain JSON document pushed onto a Redis list.

A producer runs ``LPUSH <prefix>:intake '<json intent>'``. The drainer moves
each message atomically to a processing list (``LMOVE``), takes it in, and only
then removes it: a drainer that dies midway leaves the message in the
processing list, and the next drain takes it in again (admission is
idempotent, so that cannot buy twice). A message that fails its contract goes
to the failures queue with its reason (and the message, cut to a bound) and
the drain goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from fulfilment.clock import RedisClock
from fulfilment.errors import InvalidMessageError, PermanentError
from fulfilment.keys import Keys
from fulfilment.producer import (
    ACCEPTED,
    DUPLICATE,
    Producer,
    ReferenceConflictError,
    parse_intent,
)
from fulfilment.redis_text import text
from fulfilment.results import ResultPublisher

log = logging.getLogger(__name__)

#: How long one drainer may hold the intake before another may take over.
LOCK_TTL = 60


@dataclass
class DrainReport:
    accepted: int = 0
    duplicates: int = 0
    refused: int = 0
    awaiting_dispatch: int = 0  # of the accepted: the broker did not take them (yet)

    @property
    def total(self) -> int:
        return self.accepted + self.duplicates + self.refused


class Intake:
    def __init__(self, client: redis.Redis, keys: Keys, producer: Producer,
                 publisher: ResultPublisher, *, clock: Callable[[], float] | None = None) -> None:
        """``clock``: Redis's time (``fulfilment health`` compares the drain's stamp with
        it); None: Redis's ``TIME``."""
        self._redis = client
        self._keys = keys
        self._producer = producer
        self._publisher = publisher
        self._clock = clock or RedisClock(client)

    def drain(self, limit: int = 1000) -> DrainReport:
        """Take in up to ``limit`` waiting intents (none if another drainer is at it).

        A drain that ran records when it ended (``Keys.intake_drained``):
        ``fulfilment health`` reports it, since the intake stalls silently
        when celery beat is not running.
        """
        report = DrainReport()
        lock = self._redis.lock(self._keys.intake_lock, timeout=LOCK_TTL, blocking_timeout=0)
        if not lock.acquire(blocking=False):
            return report
        try:
            # Leftovers first: a drainer died after taking them, before finishing.
            for raw in self._redis.lrange(self._keys.intake_processing, 0, -1):
                self._take(raw, report)
            while report.total < limit:
                taken = self._redis.lmove(self._keys.intake, self._keys.intake_processing,
                                          "RIGHT", "LEFT")
                if taken is None:
                    break
                self._take(taken, report)
            self._redis.set(self._keys.intake_drained, repr(self._clock()))
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                log.warning("the intake's lock expired while it was drained")
        if report.total:
            log.info("intake: %d accepted (%d wait for dispatch), %d duplicates, %d refused",
                     report.accepted, report.awaiting_dispatch, report.duplicates,
                     report.refused)
        return report

    def _take(self, raw: bytes | str, report: DrainReport) -> None:
        """Admit one message, or send it to the failures queue with its reason.

        Whatever the message holds, it leaves the processing list: a message
        that cannot be read (not JSON, not an intent, too large, an unknown
        ``schema_version``) would otherwise be taken first by every drain and
        stall the intake for good. Only Redis failing, or the broker refusing
        a refused message's report (raised), leaves it there, to be taken again
        by the next drain. An admitted intent whose dispatch the broker refused
        is taken: it waits in the ledger for the recovery sweep.
        """
        refusal = self._refusal(raw, report)
        if refusal is not None:
            reason, errors = refusal
            self._publisher.publish_failure(reason, errors, raw)
            report.refused += 1
        self._redis.lrem(self._keys.intake_processing, 1, raw)  # type: ignore[arg-type]

    def _refusal(self, raw: bytes | str, report: DrainReport) -> tuple[str, Any] | None:
        """Submit the message; the reason and field errors if it is refused, else None."""
        try:
            intent = parse_intent(raw, max_quantity=self._producer.max_quantity)
        except InvalidMessageError as exc:
            return exc.message, exc.errors
        except Exception as exc:  # noqa: BLE001 - no message may stall the intake
            # Its type only: the text of a parser's error may quote the message.
            log.error("intake: a message could not be parsed (%s)", type(exc).__name__)
            return f"unreadable message: {type(exc).__name__}", {}
        try:
            submission = self._producer.submit(intent)
        except ReferenceConflictError as exc:
            return exc.message, {"reference": [exc.message]}
        except PermanentError as exc:
            return exc.message, {}
        if submission.status == ACCEPTED:
            report.accepted += 1
            report.awaiting_dispatch += submission.awaiting_dispatch
        elif submission.status == DUPLICATE:
            report.duplicates += 1
        return None


def last_drained(client: redis.Redis, keys: Keys) -> float | None:
    """When the intake was last drained (epoch seconds), or None if never."""
    raw = client.get(keys.intake_drained)
    try:
        return float(text(raw)) if raw is not None else None
    except ValueError:
        return None
