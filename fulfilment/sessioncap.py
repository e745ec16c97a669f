"""A cap per Onebox session: at most N purchases in flight for one session, fleet-wide.

An on-sale puts thousands of intents on one session at once; without a cap the
fleet opens as many baskets there as it has threads, and other sessions wait
behind them. With ``FULFILMENT_SESSION_CAP`` set, an intent takes a slot in
every session it touches before its basket is created (all of them, atomically,
or none) and gives them back once its outcome is recorded.

The semaphore is a sorted set of holders per session, scored by when the hold
lapses, on Redis's clock (``TIME`` inside Lua: no two hosts' clocks are ever
compared). A holder is the intent's reference, so taking again is idempotent.
A run holding slots renews them while it works (a heartbeat, as the intent's
lease is renewed) and, as it ends, for the wait it schedules: a killed worker's
hold lapses within ``FULFILMENT_LEASE_TTL``; a released or lapsed holder never
blocks.

Only starting is capped. A run that finds its basket open (a retry, a confirm)
holds its slots whatever the count: the confirm of an open basket is never
held back. An intent that cannot start is not failed: it waits
(``SessionCapError``, a ``HeldBackError``: no attempt used up, bounded by the
retry deadline) and its worker thread is freed meanwhile.

Fairness: the waiters of a session queue in the order they first asked (a
second sorted set, scored by that time), and a free slot goes to the first in
line: an intent may start only while fewer waiters are ahead of it than there
are free slots. A newcomer never overtakes a waiter, so no wait starves; a
waiter that stops asking (its message lost) leaves the line after
``WAITER_TTL``. An intent that needs two sessions takes both at once or waits
in both lines; while it waits at the head of one, that session's free slot is
kept for it (head-of-line blocking, the price of all-or-none). The wait before
asking again grows with the place in line (``retry_after``), so a deep line
costs little.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

import redis

from fulfilment import metrics
from fulfilment.errors import HeldBackError
from fulfilment.keys import Keys
from schemas.intent import AutoItem, NumberedItem, PurchaseIntent

log = logging.getLogger(__name__)

#: The first in line asks again this soon; later ones wait longer (``retry_after``).
FIRST_WAIT = 0.5
#: The longest wait before asking again, however deep the line.
LONGEST_WAIT = 5.0
#: A waiter that has not asked again for this long leaves the line.
WAITER_TTL = 30.0
#: Keys of an idle session vanish after this long (their members have lapsed long since).
KEY_TTL_SECONDS = 86400

# A session's keys, three per session in KEYS: holders (scored by when the hold
# lapses, ms), line (scored by first ask, ms, always after the last in line) and
# seen (scored by when the waiter leaves the line, ms). Every script first drops
# the lapsed holders and waiters of each session it touches.
_PRUNE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function prune(holders, line, seen)
  redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
  local gone = redis.call('ZRANGEBYSCORE', seen, '-inf', now, 'LIMIT', 0, 200)
  if #gone > 0 then
    redis.call('ZREM', line, unpack(gone))
    redis.call('ZREM', seen, unpack(gone))
  end
end
local function touch(i)
  for k = i, i + 2 do redis.call('EXPIRE', KEYS[k], ARGV[#ARGV]) end
end
"""

# Take a slot in every session, or none. ARGV: holder, cap, hold ms, waiter ms, key ttl.
# Returns {1, 0} when held (again: the hold is refreshed), else {0, behind, new} where
# ``behind`` is how many of the line must start before this one can (its furthest
# place over the sessions) and ``new`` is 1 when it just joined a line.
_TAKE = _PRUNE + """
local holder, cap = ARGV[1], tonumber(ARGV[2])
local behind, free_all = 0, true
for i = 1, #KEYS, 3 do
  prune(KEYS[i], KEYS[i + 1], KEYS[i + 2])
  if not redis.call('ZSCORE', KEYS[i], holder) then
    local ahead = redis.call('ZRANK', KEYS[i + 1], holder)
    if not ahead then ahead = redis.call('ZCARD', KEYS[i + 1]) end
    local free = cap - redis.call('ZCARD', KEYS[i])
    if ahead >= free then
      free_all = false
      behind = math.max(behind, ahead - math.max(free, 0))
    end
  end
end
if free_all then
  for i = 1, #KEYS, 3 do
    redis.call('ZADD', KEYS[i], now + tonumber(ARGV[3]), holder)
    redis.call('ZREM', KEYS[i + 1], holder)
    redis.call('ZREM', KEYS[i + 2], holder)
    touch(i)
  end
  return {1, 0, 0}
end
local new = 0
for i = 1, #KEYS, 3 do
  if not redis.call('ZSCORE', KEYS[i + 1], holder) then
    -- After the last in line, even within one ms or after a clock step back.
    local last = redis.call('ZRANGE', KEYS[i + 1], -1, -1, 'WITHSCORES')
    local score = now
    if #last > 0 and tonumber(last[2]) >= score then score = tonumber(last[2]) + 1 end
    redis.call('ZADD', KEYS[i + 1], score, holder)
    new = 1
  end
  redis.call('ZADD', KEYS[i + 2], now + tonumber(ARGV[4]), holder)
  touch(i)
end
return {0, behind, new}
"""

# Hold for ``ms`` more from now. ARGV: holder, ms, '1' to join whatever the count (an
# open basket) or '0' to renew only a hold that exists, key ttl. Returns how many held.
_HOLD = _PRUNE + """
local held = 0
for i = 1, #KEYS, 3 do
  prune(KEYS[i], KEYS[i + 1], KEYS[i + 2])
  local score = now + tonumber(ARGV[2])
  if ARGV[3] == '1' then
    held = held + redis.call('ZADD', KEYS[i], 'GT', 'CH', score, ARGV[1])
  else
    held = held + redis.call('ZADD', KEYS[i], 'XX', 'GT', 'CH', score, ARGV[1])
  end
  if ARGV[3] == '1' then
    redis.call('ZREM', KEYS[i + 1], ARGV[1])
    redis.call('ZREM', KEYS[i + 2], ARGV[1])
    touch(i)
  end
end
return held
"""

# Leave: no longer a holder, nor in any line. ARGV: holder, key ttl (unused).
_RELEASE = """
for i = 1, #KEYS, 3 do
  redis.call('ZREM', KEYS[i], ARGV[1])
  redis.call('ZREM', KEYS[i + 1], ARGV[1])
  redis.call('ZREM', KEYS[i + 2], ARGV[1])
end
return 0
"""


class SessionCapError(HeldBackError):
    """A session this intent needs is at its cap: wait in line, nothing was sent.

    Not a failure of the purchase (no attempt used up); the retry deadline bounds it.
    """

    default_code = "SESSION_CAP"


@dataclass(frozen=True)
class Taken:
    """A take's answer: held, or how many in line must start first."""

    held: bool
    behind: int = 0
    #: True on an intent's first refusal (it just joined a line).
    joined: bool = False


def sessions_of(intent: PurchaseIntent) -> tuple[int, ...]:
    """Every Onebox session the intent's items touch, sorted (its slots' keys in order)."""
    found: set[int] = set()
    for item in intent.items:
        if isinstance(item, AutoItem):
            found.add(item.session_id)
        elif isinstance(item, NumberedItem):
            found.update(seat.session_id for seat in item.seats)
    return tuple(sorted(found))


class SessionCap:
    """The fleet's slots per session: ``cap`` holders at most in each."""

    def __init__(self, client: redis.Redis, keys: Keys, cap: int, *, hold: float,
                 max_hold: float = float("inf"), waiter_ttl: float = WAITER_TTL) -> None:
        """``hold``: seconds a hold lasts unless renewed (the lease's TTL); ``max_hold``:
        a run renews no longer than this (the task's hard time limit); ``waiter_ttl``:
        how long a place in line lasts without asking again."""
        if cap < 1:
            raise ValueError("a session cap is at least 1")
        self._redis, self._keys, self.cap = client, keys, cap
        self.hold_seconds, self.max_hold, self.waiter_ttl = hold, max_hold, waiter_ttl
        self._take = client.register_script(_TAKE)
        self._hold = client.register_script(_HOLD)
        self._release = client.register_script(_RELEASE)

    def _session_keys(self, sessions: Iterable[int]) -> list[str]:
        return [self._keys.session_cap(session, kind) for session in sorted(set(sessions))
                for kind in ("holders", "line", "seen")]

    def take(self, holder: str, sessions: Iterable[int]) -> Taken:
        """A slot in every session, or none (then ``holder`` waits in each line)."""
        keys = self._session_keys(sessions)
        if not keys:
            return Taken(True)
        answer = self._take(keys=keys, args=[holder, self.cap, _ms(self.hold_seconds),
                                             _ms(self.waiter_ttl), KEY_TTL_SECONDS])
        return Taken(bool(int(answer[0])), int(answer[1]), bool(int(answer[2])))

    def hold(self, holder: str, sessions: Iterable[int], seconds: float, *,
             join: bool = False) -> int:
        """Hold ``holder``'s slots for ``seconds`` more (never shorter than they stand).

        ``join``: hold them whatever the count (a run whose basket is open);
        otherwise only a hold that exists is renewed. Returns how many changed.
        """
        keys = self._session_keys(sessions)
        if not keys:
            return 0
        return int(self._hold(keys=keys, args=[holder, _ms(seconds), "1" if join else "0",
                                               KEY_TTL_SECONDS]))

    def release(self, holder: str, sessions: Iterable[int]) -> None:
        """Give back ``holder``'s slots and leave every line (idempotent)."""
        keys = self._session_keys(sessions)
        if keys:
            self._release(keys=keys, args=[holder, KEY_TTL_SECONDS])

    def holders(self, session: int) -> list[str]:
        """Who holds a slot of ``session`` now (lapsed holders excluded): tests, operators."""
        seconds, micros = self._redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        found = self._redis.zrangebyscore(self._keys.session_cap(session, "holders"),
                                          now_ms, "+inf")
        return sorted(value.decode() if isinstance(value, bytes) else str(value)
                      for value in found)

    def retry_after(self, behind: int) -> float:
        """How long to wait before asking again, ``behind`` starts away from a slot."""
        return min(FIRST_WAIT * (1 + behind // self.cap), LONGEST_WAIT)


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


class RunSlots:
    """One run's use of the cap: take before a new basket, keep while working, and, at
    the end, hold for the wait ahead or give back once the outcome is recorded.

    A no-op without a cap or sessions. As a context manager it stops its heartbeat.
    """

    def __init__(self, cap: SessionCap | None, reference: str, sessions: tuple[int, ...], *,
                 basket_open: bool) -> None:
        self.cap = cap if sessions else None
        self.reference, self.sessions, self.basket_open = reference, sessions, basket_open
        #: Whether this run holds the slots (taken, or joined with an open basket).
        self.holding = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> RunSlots:
        if self.cap is not None and self.basket_open:
            # An open basket holds its slots whatever the count: never block its confirm.
            self.cap.hold(self.reference, self.sessions, self.cap.hold_seconds, join=True)
            self._start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._halt()

    def take(self) -> None:
        """Before a new basket: hold a slot in each session, or raise ``SessionCapError``."""
        if self.cap is None:
            return
        taken = self.cap.take(self.reference, self.sessions)
        if taken.held:
            self._start()
            return
        metrics.session_cap_waited(first=taken.joined)
        raise SessionCapError(f"sessions {list(self.sessions)} are at their cap of "
                              f"{self.cap.cap}: waiting in line ({taken.behind} ahead)",
                              retry_after=self.cap.retry_after(taken.behind))

    def done(self, *, finished: bool, basket_open: bool, wait: float) -> None:
        """The run is over: give back once the outcome is recorded, else hold over the
        ``wait`` ahead plus time for the next run to be picked up (twice the hold)."""
        self._halt()
        if self.cap is None:
            return
        if finished:
            self.cap.release(self.reference, self.sessions)
        elif self.holding:
            self.cap.hold(self.reference, self.sessions, wait + 2 * self.cap.hold_seconds,
                          join=basket_open)
        # A waiter holds nothing: its place in line lasts WAITER_TTL from its last ask.

    def _start(self) -> None:
        self.holding = True
        if self._beat is None and self.cap is not None:
            self._stop.clear()
            self._beat = threading.Thread(target=self._renew, name=f"slots-{self.reference}",
                                          daemon=True)
            self._beat.start()

    def _halt(self) -> None:
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join()
        self._beat = None

    def _renew(self) -> None:
        cap = self.cap
        assert cap is not None
        until = time.monotonic() + cap.max_hold
        while not self._stop.wait(cap.hold_seconds / 3):
            if time.monotonic() > until:
                return  # a run hung past the hard time limit lets its slots lapse
            try:
                cap.hold(self.reference, self.sessions, cap.hold_seconds)
            except redis.RedisError as exc:
                log.warning("could not renew session slots: %s", type(exc).__name__)
