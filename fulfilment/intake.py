"""Intents from any language, taken in a chunk at a time: a Redis list, or a RabbitMQ queue.

A producer runs ``LPUSH <prefix>:intake '<json intent>'`` (or publishes the
intent to the ``<prefix>.intake`` queue: ``fulfilment.intake_queue``). A drain
takes the messages in as ``submit_many`` takes a chunk of a file
(``Producer.take_in``: one admission round trip, one fan-out) and sends each
refused message to the failures queue with its reason.

Nothing is lost. A drainer registers in ``<prefix>:intake:drainers`` with a
lease on Redis's clock, and one script moves a chunk from the list's oldest
end to a processing list of its own, renewing the lease. The chunk leaves that
list only once it is admitted and its refusals published (in the script that
takes the next chunk). A drainer that dies leaves its processing list; once
its lease has lapsed, the next drain puts it back at the oldest end of the
intake, where it is taken again: an intent admitted before is then a
duplicate, never bought twice (one the dead drainer admitted but did not
dispatch is started by the recovery sweep, ``FULFILMENT_STUCK_AFTER``).

Several drain at once while the list is long: a drain that finds more than a
chunk waiting reserves places for helpers (at most ``MAX_DRAINERS`` drainers
and reserved places at once, fleet-wide) and the caller sends a drain task for
each; a place its helper never takes lapses.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import redis

from fulfilment.clock import RedisClock
from fulfilment.keys import Keys
from fulfilment.producer import (
    ACCEPTED,
    CHUNK,
    DISPATCH_ERRORS,
    DUPLICATE,
    REFUSED,
    Producer,
    Submission,
)
from fulfilment.redis_text import text
from fulfilment.results import ResultPublisher

log = logging.getLogger(__name__)

#: Seconds a drainer's lease lasts on Redis's clock, renewed with every chunk it takes.
LEASE = 15.0
#: Drainers (and places reserved for helpers) at once, fleet-wide.
MAX_DRAINERS = 4
#: Seconds a place reserved for a helper waits for it.
HELPER_WAIT = 10.0
#: Seconds one drain goes on taking chunks (a task holds a worker slot meanwhile).
BUDGET = 10.0

# Redis's clock in milliseconds, inside a script.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: drainers, intake, legacy processing list. ARGV: drainer id, lease ms, max
# drainers, helper wait ms, helper ids (comma-separated), chunk, backlog elsewhere.
# Joins (a drainer already registered, or a helper on its reserved place, is in;
# a new one only while fewer than max are), and reserves places for helpers while
# the backlog is over a chunk. Answers: joined (0/1), lapsed ids, reserved ids,
# whether the legacy list holds anything.
_JOIN = _NOW + """
local id, lease, most = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local live = redis.call('ZCOUNT', KEYS[1], now, '+inf')
local mine = redis.call('ZSCORE', KEYS[1], id)
if not (mine and tonumber(mine) >= now) then
  if live >= most then return {0, {}, {}, 0} end
  live = live + 1
end
redis.call('ZADD', KEYS[1], now + lease, id)
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
local legacy = redis.call('EXISTS', KEYS[3])
local reserved = {}
local backlog = redis.call('LLEN', KEYS[2]) + tonumber(ARGV[7])
local wanted = math.ceil(backlog / tonumber(ARGV[6])) - 1
for helper in string.gmatch(ARGV[5], '[^,]+') do
  if #reserved >= wanted or live >= most then break end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), helper)
  reserved[#reserved + 1] = helper
  live = live + 1
end
return {1, lapsed, reserved, legacy}
"""

# KEYS: drainers, intake, the lapsed drainer's processing list, the legacy lock.
# ARGV: its id ('' for the legacy list). Puts the list back at the intake's oldest
# end, in order, unless its drainer renewed its lease meanwhile (or, for the
# legacy list, an old drainer holds the old lock). Answers how many moved, or -1.
_REQUEUE = _NOW + """
if ARGV[1] == '' then
  if redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
else
  local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if expires and tonumber(expires) >= now then return -1 end
  redis.call('ZREM', KEYS[1], ARGV[1])
end
local moved = 0
while redis.call('LMOVE', KEYS[3], KEYS[2], 'LEFT', 'RIGHT') do moved = moved + 1 end
return moved
"""

# KEYS: drainers, intake, this drainer's processing list. ARGV: id, lease ms, chunk.
# The chunk taken before is done: removed. The lease is renewed, and up to a chunk
# moves from the intake's oldest end to the processing list, in the same order.
_TAKE = _NOW + """
redis.call('DEL', KEYS[3])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local count = tonumber(ARGV[3])
local taken = redis.call('LRANGE', KEYS[2], -count, -1)
if #taken > 0 then
  redis.call('LTRIM', KEYS[2], 0, -count - 1)
  redis.call('RPUSH', KEYS[3], unpack(taken))
end
return taken
"""

# KEYS: drainers, intake, this drainer's processing list, drained-at. ARGV: id,
# done (1: the chunk held was taken in, remove it; 0: put it back), the time to record.
_LEAVE = """
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[4], ARGV[3])
else
  while redis.call('LMOVE', KEYS[3], KEYS[2], 'LEFT', 'RIGHT') do end
end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""


@dataclass
class DrainReport:
    accepted: int = 0
    duplicates: int = 0
    refused: int = 0
    awaiting_dispatch: int = 0  # of the accepted: the broker did not take them (yet)
    #: Drain tasks asked for (places reserved for them).
    helpers: int = 0

    @property
    def total(self) -> int:
        return self.accepted + self.duplicates + self.refused

    def count(self, answer: Submission) -> None:
        if answer.status == ACCEPTED:
            self.accepted += 1
            self.awaiting_dispatch += answer.awaiting_dispatch
        elif answer.status == DUPLICATE:
            self.duplicates += 1
        else:
            self.refused += 1


@dataclass
class _Held:
    """Whether a drainer holds a chunk of the list it has not taken in."""

    chunk: bool = False


class QueueSource(Protocol):
    """Another intake a drain takes chunks from (``fulfilment.intake_queue``)."""

    def backlog(self) -> int:
        """Messages waiting, as far as known."""

    def take(self, count: int) -> Sequence[bytes]:
        """Up to ``count`` messages (none: nothing waits); held until ``done``."""

    def done(self) -> None:
        """The messages taken last are taken in: let them go."""


class Intake:
    """Drains the intake a chunk at a time (see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys, producer: Producer,
                 publisher: ResultPublisher, *, clock: Callable[[], float] | None = None,
                 chunk: int = CHUNK, lease: float = LEASE, max_drainers: int = MAX_DRAINERS,
                 budget: float = BUDGET) -> None:
        """``clock``: Redis's time (``fulfilment health`` compares the drain's stamp with
        it); None: Redis's ``TIME``."""
        self._redis = client
        self._keys = keys
        self._producer = producer
        self._publisher = publisher
        self._clock = clock or RedisClock(client)
        self._chunk = chunk
        self._lease_ms = int(lease * 1000)
        self._max_drainers = max_drainers
        self._budget = budget
        self._join = client.register_script(_JOIN)
        self._requeue = client.register_script(_REQUEUE)
        self._take_script = client.register_script(_TAKE)
        self._leave = client.register_script(_LEAVE)

    def drain(self, *, drainer: str | None = None,
              send_helpers: Callable[[list[str]], None] | None = None,
              queue: QueueSource | None = None) -> DrainReport:
        """Take chunks in until nothing waits or the budget is spent; none if
        ``MAX_DRAINERS`` are at it already.

        ``drainer``: the place a helper was sent for. With ``send_helpers``,
        places are reserved for helpers while more than a chunk waits, and it is
        called with their ids (a drain task each). ``queue``: the RabbitMQ
        intake, taken from as the list is. A drain that ran records when it
        ended (``Keys.intake_drained``): ``fulfilment health`` reports it, since
        the intake stalls silently when celery beat is not running.
        """
        report = DrainReport()
        me = drainer or uuid.uuid4().hex
        wanted = [uuid.uuid4().hex for _ in range(self._max_drainers)] if send_helpers else []
        joined, lapsed, reserved, legacy = self._join(
            keys=[self._keys.intake_drainers, self._keys.intake, self._keys.intake_processing],
            args=[me, self._lease_ms, self._max_drainers, int(HELPER_WAIT * 1000),
                  ",".join(wanted), self._chunk, queue.backlog() if queue and wanted else 0])
        if not joined:
            return report
        for other in [*map(text, lapsed), *([""] if legacy else [])]:
            self._take_back(other)
        state = _Held()
        try:
            if reserved and send_helpers is not None:
                report.helpers = self._ask(send_helpers, [text(helper) for helper in reserved])
            self._drain(me, report, queue, state)
        finally:
            self._leave(keys=[self._keys.intake_drainers, self._keys.intake,
                              self._keys.intake_taken(me), self._keys.intake_drained],
                        args=[me, "0" if state.chunk else "1", repr(self._clock())])
        if report.total:
            log.info("intake: %d accepted (%d wait for dispatch), %d duplicates, %d refused",
                     report.accepted, report.awaiting_dispatch, report.duplicates,
                     report.refused)
        return report

    def _drain(self, me: str, report: DrainReport, queue: QueueSource | None,
               state: _Held) -> None:
        deadline = time.monotonic() + self._budget
        while time.monotonic() < deadline:
            taken = self._take_script(
                keys=[self._keys.intake_drainers, self._keys.intake, self._keys.intake_taken(me)],
                args=[me, self._lease_ms, self._chunk])
            if taken:
                state.chunk = True
                self._take(taken[::-1], report)  # oldest first, as pushed
                state.chunk = False
            messages = queue.take(self._chunk) if queue is not None else []
            if messages and queue is not None:
                self._take(messages, report)
                queue.done()
            if not taken and not messages:
                return

    @staticmethod
    def _ask(send_helpers: Callable[[list[str]], None], drainers: list[str]) -> int:
        """Send the helpers; the broker refusing leaves this drain alone (their places lapse)."""
        try:
            send_helpers(drainers)
        except DISPATCH_ERRORS as exc:
            log.warning("intake: no helper could be sent (%s); draining alone",
                        type(exc).__name__)
            return 0
        return len(drainers)

    def _take_back(self, drainer: str) -> None:
        """Put a lapsed drainer's chunk (or the legacy list) back on the intake."""
        legacy = drainer == ""
        moved = self._requeue(
            keys=[self._keys.intake_drainers, self._keys.intake,
                  self._keys.intake_processing if legacy else self._keys.intake_taken(drainer),
                  self._keys.intake_lock], args=[drainer])
        if int(moved) > 0:
            log.warning("intake: %d messages of a drainer that stopped midway are taken again",
                        int(moved))

    def _take(self, messages: Sequence[bytes], report: DrainReport) -> None:
        """Admit a chunk; each refused message goes to the failures queue with its reason.

        Raised (Redis failing, the broker refusing a refusal's report), the
        chunk stays where it was taken from and is taken again.
        """
        for message, answer in zip(messages, self._producer.take_in(messages), strict=True):
            if answer.status == REFUSED:
                self._publisher.publish_failure(answer.reason or "refused", dict(answer.errors),
                                                message)
            report.count(answer)


def last_drained(client: redis.Redis, keys: Keys) -> float | None:
    """When the intake was last drained (epoch seconds), or None if never."""
    raw = client.get(keys.intake_drained)
    try:
        return float(text(raw)) if raw is not None else None
    except ValueError:
        return None


def taken_count(client: redis.Redis, keys: Keys) -> int:
    """Messages taken off the intake list and not yet taken in (every drainer's chunk)."""
    total = int(client.llen(keys.intake_processing))
    for drainer in client.zrange(keys.intake_drainers, 0, -1):
        total += int(client.llen(keys.intake_taken(text(drainer))))
    return total
