"""Intents from any language: a plain JSON document pushed onto a Redis list.

A producer runs ``LPUSH <prefix>:intake '<json intent>'``. The drainer moves
each message atomically to a processing list (``LMOVE``), takes it in, and only
then removes it: a drainer that dies midway leaves the message in the
processing list, and the next drain takes it in again (admission is
idempotent, so that cannot buy twice). A message that fails its contract goes
to the failures queue with its reason and the drain goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from fulfilment.errors import InvalidMessageError
from fulfilment.keys import Keys
from fulfilment.producer import ACCEPTED, DUPLICATE, Producer, ReferenceConflictError
from fulfilment.results import ResultPublisher

log = logging.getLogger(__name__)

#: How long one drainer may hold the intake before another may take over.
LOCK_TTL = 60


@dataclass
class DrainReport:
    accepted: int = 0
    duplicates: int = 0
    refused: int = 0

    @property
    def total(self) -> int:
        return self.accepted + self.duplicates + self.refused


class Intake:
    def __init__(self, client: redis.Redis, keys: Keys, producer: Producer,
                 publisher: ResultPublisher) -> None:
        self._redis = client
        self._keys = keys
        self._producer = producer
        self._publisher = publisher

    def drain(self, limit: int = 1000) -> DrainReport:
        """Take in up to ``limit`` waiting intents (none if another drainer is at it)."""
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
        finally:
            lock.release()
        if report.total:
            log.info("intake: %d accepted, %d duplicates, %d refused", report.accepted,
                     report.duplicates, report.refused)
        return report

    def _take(self, raw: bytes | str, report: DrainReport) -> None:
        # The bytes go to the contract as they are: text that is not UTF-8 is refused.
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        try:
            submission = self._producer.submit(raw)
        except InvalidMessageError as exc:
            self._publisher.publish_failure("invalid purchase intent", exc.errors, text)
            report.refused += 1
        except ReferenceConflictError as exc:
            self._publisher.publish_failure(exc.message, {}, text)
            report.refused += 1
        else:
            if submission.status == ACCEPTED:
                report.accepted += 1
            elif submission.status == DUPLICATE:
                report.duplicates += 1
        self._redis.lrem(self._keys.intake_processing, 1, raw)  # type: ignore[arg-type]
