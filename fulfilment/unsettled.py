"""The index of unsettled intents: which wait, since when, and when each is read next.

An intent is ``unsettled`` when a confirm was sent and Onebox could not say
whether it went through. Its order is read again by itself
(``fulfilment.settlement``) on a schedule kept here, on Redis's clock: the
first read ``FULFILMENT_SETTLE_FIRST`` seconds after, then the wait doubles up
to ``SETTLE_CAP``, for ``FULFILMENT_SETTLE_FOR`` seconds (72 h by default).
After that it leaves the schedule (score ``+inf``) but stays listed, for an
operator (``fulfilment unsettled``, ``fulfilment settle``).

Three keys (``Keys.unsettled*``): the schedule (reference -> next read), when
each became unsettled (reference -> time: the count and the oldest in O(1),
for the metrics and ``fulfilment health``) and a small JSON per reference (reads
so far, the last answer, order code, batch). The last answer holds Onebox's
error codes, HTTP statuses and order statuses only: never a message Onebox
wrote (it may echo a buyer's data).

The flow marks an intent here *before* it writes the ``unsettled`` outcome: a
worker dying in between leaves an index entry whose outcome is not written
yet (the next read finds it still running, or settled, and drops it), never
an unsettled intent nobody reads again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import redis

from fulfilment.keys import Keys
from fulfilment.redis_text import text

#: The longest wait between two reads of one unsettled intent, in seconds.
SETTLE_CAP = 3600.0
#: Characters of a last answer kept.
ANSWER_LIMIT = 200

# Mark a reference unsettled unless it is already (a redelivered run keeps the
# first time and schedule). KEYS: schedule, since, info. ARGV: reference, now,
# first read's time, info JSON. Returns 1 when newly marked.
_MARK = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
return 1
"""

# After a read that did not settle it: the next read's time and the info, only
# while it is still indexed (settled meanwhile by another: nothing). KEYS as
# _MARK. ARGV: reference, next read's time ('+inf': off the schedule), info JSON
# ('': unchanged).
_CHECKED = """
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
return 1
"""


@dataclass(frozen=True)
class Unsettled:
    """One unsettled intent as the index holds it."""

    reference: str
    #: When it became unsettled (Redis's clock).
    since: float
    #: When it is read next; None once it left the schedule (past FULFILMENT_SETTLE_FOR).
    next_check: float | None
    #: Reads since it became unsettled.
    checks: int
    #: What Onebox answered last (codes and statuses only).
    last_answer: str
    order_code: str | None
    batch: str | None

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"reference": self.reference, "since": self.since,
                "age_s": round(max(now - self.since, 0.0), 1),
                "next_check_in_s": None if self.next_check is None
                else round(max(self.next_check - now, 0.0), 1),
                "checks": self.checks, "last_answer": self.last_answer,
                "order_code": self.order_code, "batch": self.batch}


@dataclass(frozen=True)
class Waiting:
    """How many unsettled intents wait, and for how long the oldest has."""

    count: int
    oldest_since: float | None
    #: How many left the schedule (past FULFILMENT_SETTLE_FOR): an operator's.
    off_schedule: int

    def oldest_age(self, now: float) -> float:
        return max(now - self.oldest_since, 0.0) if self.oldest_since is not None else 0.0


def next_delay(checks: int, first: float) -> float:
    """Seconds from a read (``checks`` done so far) to the next: doubling, capped."""
    return min(first * 2.0 ** min(checks, 32), max(SETTLE_CAP, first))


def clipped(answer: str) -> str:
    return answer if len(answer) <= ANSWER_LIMIT else answer[:ANSWER_LIMIT - 1] + "…"


class UnsettledIndex:
    """Reads and writes the index; every write is one atomic Redis command."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self._keys = keys
        self._mark = client.register_script(_MARK)
        self._checked = client.register_script(_CHECKED)

    @property
    def _three(self) -> list[str]:
        keys = self._keys
        return [keys.unsettled, keys.unsettled_since, keys.unsettled_info]

    def mark(self, reference: str, *, now: float, first: float, answer: str,
             order_code: str | None, batch: str | None) -> bool:
        """Index an intent that is ending unsettled; first read at ``now + first``."""
        info = _info(0, answer, order_code, batch)
        return bool(self._mark(keys=self._three,
                               args=[reference, repr(now), repr(now + first), info]))

    def checked(self, found: Unsettled, *, now: float, first: float, settle_for: float,
                answer: str) -> float | None:
        """A read left it unsettled: schedule the next (None: it leaves the schedule)."""
        checks = found.checks + 1
        until = found.since + settle_for
        next_check: float | None = None
        if now < until:
            next_check = min(now + next_delay(checks, first), until)
        info = _info(checks, answer, found.order_code, found.batch)
        self._checked(keys=self._three, args=[found.reference,
                                              "+inf" if next_check is None else repr(next_check),
                                              info])
        return next_check

    def later(self, reference: str, when: float) -> None:
        """Read it again at ``when`` without counting a read (it was busy, or not read)."""
        self._checked(keys=self._three, args=[reference, repr(when), ""])

    def forget(self, reference: str) -> None:
        """Settled (or its ledger entry gone): off the index."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self._keys.unsettled, reference)
        pipe.zrem(self._keys.unsettled_since, reference)
        pipe.hdel(self._keys.unsettled_info, reference)
        pipe.execute()

    def due(self, now: float, limit: int) -> list[str]:
        """References whose next read is due, the most overdue first."""
        found = self.redis.zrangebyscore(self._keys.unsettled, "-inf", repr(now),
                                         start=0, num=limit)
        return [text(ref) for ref in found]

    def get(self, reference: str) -> Unsettled | None:
        found = self._read([reference])
        return found[0] if found else None

    def all(self, *, batch: str | None = None) -> list[Unsettled]:
        """Every indexed intent, oldest first; only ``batch``'s when given."""
        pairs: Any = self.redis.zrange(self._keys.unsettled_since, 0, -1)
        found = self._read([text(ref) for ref in pairs])
        return [item for item in found if batch is None or item.batch == batch]

    def waiting(self) -> Waiting:
        """The count, the oldest and how many left the schedule: three O(log n) reads."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self._keys.unsettled_since)
        pipe.zrange(self._keys.unsettled_since, 0, 0, withscores=True)
        pipe.zcount(self._keys.unsettled, "+inf", "+inf")
        count, oldest, off = pipe.execute()
        return Waiting(int(count), float(oldest[0][1]) if oldest else None, int(off))

    def _read(self, references: list[str]) -> list[Unsettled]:
        if not references:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for reference in references:
            pipe.zscore(self._keys.unsettled_since, reference)
            pipe.zscore(self._keys.unsettled, reference)
            pipe.hget(self._keys.unsettled_info, reference)
        answers = pipe.execute()
        found = []
        for index, reference in enumerate(references):
            since, scheduled, raw = answers[index * 3:index * 3 + 3]
            if since is None:
                continue  # settled between the two reads
            info = json.loads(text(raw)) if raw else {}
            next_check = None if scheduled is None or math.isinf(float(scheduled)) \
                else float(scheduled)
            found.append(Unsettled(reference, float(since), next_check,
                                   int(info.get("checks", 0)), str(info.get("last", "")),
                                   info.get("order_code"), info.get("batch")))
        return found


def _info(checks: int, answer: str, order_code: str | None, batch: str | None) -> str:
    return json.dumps({"checks": checks, "last": clipped(answer), "order_code": order_code,
                       "batch": batch}, separators=(",", ":"))


def answer_of(code: str, status: int | None) -> str:
    """An error as a last answer: its code and HTTP status, never its message."""
    return f"{code} (HTTP {status})" if status is not None else code


def describe_age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
