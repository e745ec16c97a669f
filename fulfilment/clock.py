"""Redis's clock, read without a round trip per call: every deadline and window is on it.

Workers, producers, the sweep and the CLI run on hosts whose clocks may
disagree by minutes; Redis is the one clock they all share. A stamp one
process writes (``updated_at``, the open set's scores, ``basket_expires``,
``orphan_expires``, a shared token's expiry) is read by another, so each is
written and compared on Redis's clock, never on the process's own.

``RedisClock`` reads Redis's ``TIME`` once, keeps the offset between it and
this process's monotonic clock, and answers "Redis's time now" as monotonic
time plus that offset: one ``TIME`` every ``REFRESH`` seconds per process,
nothing per call. The monotonic clock never steps, so a wrong or stepping
system clock on a worker changes nothing; Redis's own steps are followed
within ``REFRESH`` seconds. Its error is half a round trip (well under a
millisecond on a LAN) plus the drift between refreshes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

#: Seconds between two readings of Redis's ``TIME`` (per process).
REFRESH = 5.0
#: A reading whose round trip took longer says little about when Redis read its
#: clock: kept only when there is no earlier one.
MAX_ROUND_TRIP = 0.5


def redis_time(client: redis.Redis) -> float:
    """Redis's clock now (epoch seconds), one round trip: for a one-off reading."""
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1_000_000


@dataclass(frozen=True)
class _Offset:
    offset: float  # Redis's time minus the local clock
    next_at: float  # local time of the next reading


class RedisClock:
    """Callable: Redis's time now (epoch seconds), from an offset read every ``REFRESH`` s.

    ``local`` is this process's clock (monotonic by default; tests inject a
    skewed one: the offset absorbs it). Thread-safe: one reading at a time,
    other threads go on with the offset they have. A reading that fails keeps
    the last offset (retried after ``REFRESH``); only the very first raises.
    """

    def __init__(self, client: redis.Redis, *, local: Callable[[], float] = time.monotonic,
                 refresh: float = REFRESH) -> None:
        self._client = client
        self._local = local
        self._refresh = refresh
        self._state: _Offset | None = None
        self._lock = threading.Lock()

    def __call__(self) -> float:
        now = self._local()
        state = self._state
        if state is None or now >= state.next_at:
            state = self._read(state)
            now = self._local()
        return now + state.offset

    def _read(self, state: _Offset | None) -> _Offset:
        if state is None:
            self._lock.acquire()
        elif not self._lock.acquire(blocking=False):
            return state  # another thread is reading: go on with the offset we have
        try:
            current = self._state
            if current is not None and current is not state:
                return current  # read meanwhile by another thread
            before = self._local()
            try:
                seconds = redis_time(self._client)
            except redis.RedisError as exc:
                if state is None:
                    raise
                log.warning("cannot read Redis's clock (%s): keeping the last offset",
                            type(exc).__name__)
                self._state = _Offset(state.offset, before + self._refresh)
                return self._state
            after = self._local()
            if state is not None and after - before > MAX_ROUND_TRIP:
                self._state = _Offset(state.offset, after + self._refresh)
            else:
                self._state = _Offset(seconds - (before + after) / 2, after + self._refresh)
            return self._state
        finally:
            self._lock.release()
