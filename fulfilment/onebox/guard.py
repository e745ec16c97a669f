"""Limits the whole fleet shares toward Onebox: a rate limit and a circuit breaker.

Every call to Onebox, the token's included, asks ``OneboxGuard.admit`` first:
one Redis round trip (the ``_ADMIT`` script) that

- refuses the call while the **circuit breaker** is open (``CircuitOpenError``,
  ``retry_after`` = the cool-down left). Once the cool-down is over it lets one
  call of the whole fleet through as the probe (``SET NX`` on the probe key);
  the others are told to come back shortly. The probe's success closes the
  breaker, its failure opens it for another cool-down.
- reserves the call's slot under the **rate limit** (GCRA: one "theoretical
  arrival time" per Onebox account, moved on by 1/rate per call, no burst), and
  answers how long to wait for it. The caller sleeps that long, then sends: no
  polling. A slot further off than ``ONEBOX_RATE_LIMIT_MAX_WAIT`` is not taken
  (``RateLimitedError``, ``retry_after`` = the wait): the step is retried then,
  rather than holding a worker.
- counts the call in the breaker's window.

Without a rate limit, a process that has just seen the breaker closed does
not ask again for ``BREAKER_CACHE`` seconds: it counts its calls itself and
hands the count over with its next ``_ADMIT`` or failure report. So calls cost
no round trip at all in the common case, and a process learns that the
breaker opened at most that long after it did (its own failures it learns at
once).

A failed call (5xx, a timeout, a connection failure; never a 4xx, 429
included: that is Onebox answering) is reported with a second script, which
opens the breaker when a window holds at least ``ONEBOX_BREAKER_FAILURES``
failures that are also at least half of its calls. A successful call costs no
second round trip, except the probe's.

A call the guard stops is never sent, so it is always safe to repeat: both
errors are ``HeldBackError``, which the flow does not count as a failure. A
call that was sent keeps its own classification (``transport``): the guard only
watches it. Time is Redis's (``TIME``), so machines whose clocks disagree still
share one limit; tests inject a clock.

Clock steps: if Redis's clock steps back, state written before the step lies
in the future, and the scripts would hold every call of the fleet back for the
size of the step. So they never trust more than the configuration allows: an
arrival time further off than ``ONEBOX_RATE_LIMIT_MAX_WAIT`` plus one interval,
a breaker open for longer than its cool-down from now and a probe held for
longer than its TTL are clamped to that bound (and written back); a failure
window that starts in the future is begun again. A step forward needs nothing:
state in the past is simply over.

When Redis cannot be reached the guard lets calls through (logged): a call too
many is better than a sale not made, and Onebox's own 429 still stands behind it.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
import requests

from fulfilment import metrics
from fulfilment.config import Settings
from fulfilment.errors import CircuitOpenError, RateLimitedError
from fulfilment.keys import Keys
from fulfilment.redis_text import text

log = logging.getLogger(__name__)

US = 1_000_000
#: Share of a window's calls that must have failed, besides their number, to open it.
FAILURE_SHARE = 0.5
#: A caller that finds the probe under way comes back after at most this many seconds.
PROBE_PATIENCE = 2.0
#: Seconds between two log lines of one process about calls the rate limit held back.
HELD_LOG_EVERY = 10.0
#: How long the breaker's state outlives its last change (an idle fleet forgets it).
STATE_TTL = 3600.0
#: Seconds a process trusts a "closed" answer when there is no rate limit to keep.
BREAKER_CACHE = 0.5

# What _ADMIT answers first.
GO, OPEN, PROBING, TOO_LONG = 0, 1, 2, 3
# What a sent call came to, for the breaker.
OK, FAILED, NEUTRAL = "ok", "fail", "neutral"

# Both scripts start from the time: ARGV[1] (microseconds, tests), or Redis's own,
# so the fleet's machines share one clock.
_NOW = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
"""

# KEYS: breaker hash, probe key, rate key.
# ARGV: now (us, or '' for Redis's TIME), breaker on ('1'/'0'), probe token, probe
# TTL (ms), window (us), interval between calls (us, '0' = no limit), longest wait
# (us), state TTL (ms), cool-down (us), calls made meanwhile without asking (see
# BREAKER_CACHE). Answers {verdict, microseconds, 1 if this call is the probe}.
# Redis's clock may step back (NTP, a VM restored): state written before the step
# then lies further ahead than the configuration allows, and is clamped to that
# bound (see "Clock steps" in the module docstring).
_ADMIT = _NOW + """
local breaker = ARGV[2] == '1'
local cooldown = tonumber(ARGV[9])
local probe = 0
if breaker then
  local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until'))
  if open_until then
    -- Never open longer than a cool-down from now: past that, Redis's clock stepped back.
    if open_until - now > cooldown then
      open_until = now + cooldown
      redis.call('HSET', KEYS[1], 'open_until', string.format('%.0f', open_until))
    end
    if now < open_until then return {1, open_until - now, 0} end
    if not redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then
      -- Key expiry is on the wall clock too: a probe never holds longer than its TTL.
      local left = redis.call('PTTL', KEYS[2])
      if left > tonumber(ARGV[4]) then
        redis.call('PEXPIRE', KEYS[2], ARGV[4])
        left = tonumber(ARGV[4])
      end
      return {2, math.max(left, 0) * 1000, 0}
    end
    probe = 1
  end
end
local wait = 0
local interval = tonumber(ARGV[6])
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[3])) or now
  if tat < now then tat = now end
  -- The limiter never owes more than its longest wait plus one call: a later
  -- arrival time is left by a clock that stepped back. Keep the bound instead.
  local ceiling = now + tonumber(ARGV[7]) + interval
  if tat > ceiling then
    tat = ceiling
    redis.call('SET', KEYS[3], string.format('%.0f', tat), 'PX',
               math.ceil((tat - now) / 1000) + 1000)
  end
  wait = tat - now
  if wait > tonumber(ARGV[7]) then
    if probe == 1 then redis.call('DEL', KEYS[2]) end
    return {3, wait, 0}
  end
  local next_tat = tat + interval
  redis.call('SET', KEYS[3], string.format('%.0f', next_tat),
             'PX', math.ceil((next_tat - now) / 1000) + 1000)
end
if breaker and probe == 0 then
  local start = tonumber(redis.call('HGET', KEYS[1], 'window_start'))
  local calls = 1 + (tonumber(ARGV[10]) or 0)
  if start and start <= now and now - start < tonumber(ARGV[5]) then
    redis.call('HINCRBY', KEYS[1], 'calls', calls)
  else
    redis.call('HSET', KEYS[1], 'window_start', string.format('%.0f', now), 'calls', calls,
               'failures', 0)
    redis.call('PEXPIRE', KEYS[1], ARGV[8])
  end
end
return {0, wait, probe}
"""

# KEYS: breaker hash, probe key.
# ARGV: now (us or ''), outcome (ok/fail/neutral), probe token ('' if not the probe),
# failures to open, failure share, cool-down (us), window (us), state TTL (ms), calls
# made meanwhile without asking (see BREAKER_CACHE).
# Answers {verdict, failures, calls}: opened, reopened, closed, released, counted, none.
_REPORT = _NOW + """
local outcome = ARGV[2]
local is_open = redis.call('HEXISTS', KEYS[1], 'open_until') == 1
local function open_now()
  redis.call('HDEL', KEYS[1], 'window_start', 'calls', 'failures')
  redis.call('HSET', KEYS[1], 'open_until', string.format('%.0f', now + tonumber(ARGV[6])))
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
end
if ARGV[3] ~= '' and is_open then
  if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
  if outcome == 'ok' then
    redis.call('DEL', KEYS[1])
    return {'closed', 0, 0}
  elseif outcome == 'fail' then
    open_now()
    return {'reopened', 0, 0}
  end
  return {'released', 0, 0}
end
if outcome ~= 'fail' or is_open then return {'none', 0, 0} end
local start = tonumber(redis.call('HGET', KEYS[1], 'window_start'))
local failures, calls
local uncounted = tonumber(ARGV[9]) or 0
if start and start <= now and now - start < tonumber(ARGV[7]) then
  failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
  calls = math.max(redis.call('HINCRBY', KEYS[1], 'calls', uncounted), failures)
else
  redis.call('HSET', KEYS[1], 'window_start', string.format('%.0f', now), 'calls',
             math.max(uncounted, 1), 'failures', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  failures, calls = 1, math.max(uncounted, 1)
end
if failures >= tonumber(ARGV[4]) and failures >= tonumber(ARGV[5]) * calls then
  open_now()
  return {'opened', failures, calls}
end
return {'counted', failures, calls}
"""


@dataclass(frozen=True)
class GuardConfig:
    """The guard's settings, in seconds and calls per second."""

    rate_limit: float = 0.0  # calls per second for the whole fleet; 0 = no limit
    max_wait: float = 10.0
    breaker_failures: int = 10  # 0 = no breaker
    breaker_window: float = 10.0
    breaker_cooldown: float = 15.0
    #: How long the probe may take before another worker may probe (a whole call).
    probe_ttl: float = 20.0

    @classmethod
    def from_settings(cls, settings: Settings) -> GuardConfig:
        return cls(
            rate_limit=settings.onebox_rate_limit,
            max_wait=settings.onebox_rate_limit_max_wait,
            breaker_failures=settings.onebox_breaker_failures,
            breaker_window=settings.onebox_breaker_window,
            breaker_cooldown=settings.onebox_breaker_cooldown,
            probe_ttl=settings.onebox_connect_timeout + settings.onebox_read_timeout + 1.0,
        )

    @property
    def enabled(self) -> bool:
        return self.rate_limit > 0 or self.breaker_failures > 0


@dataclass(frozen=True)
class Permit:
    """Leave to send one call; ``probe`` is the probe's token when this call is it."""

    probe: str | None = None
    waited: float = 0.0


@dataclass(frozen=True)
class BreakerState:
    """Where the breaker stands (for tests and operators)."""

    status: str  # "closed", "open" or "half_open" (cool-down over, probe pending)
    seconds_left: float = 0.0
    failures: int = 0
    calls: int = 0


def scope_for(settings: Settings) -> str:
    """One Onebox account: the API host and channel (never the secret)."""
    return hashlib.sha256(
        f"{settings.onebox_api_url}|{settings.onebox_channel_id}".encode()
    ).hexdigest()[:16]


class OneboxGuard:
    """Admits calls to Onebox under the fleet's rate limit and circuit breaker."""

    def __init__(self, client: redis.Redis, keys: Keys, scope: str, config: GuardConfig, *,
                 clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self._redis = client
        self._clock = clock  # None: Redis's own clock, shared by every machine
        self._sleep = sleep
        self.breaker_key = keys.onebox_guard(scope, "breaker")
        self.probe_key = keys.onebox_guard(scope, "probe")
        self.rate_key = keys.onebox_guard(scope, "rate")
        self._admit = client.register_script(_ADMIT)
        self._report = client.register_script(_REPORT)
        self._interval_us = math.ceil(US / config.rate_limit) if config.rate_limit > 0 else 0
        self._state_ttl_ms = int((STATE_TTL + config.breaker_window
                                  + config.breaker_cooldown) * 1000)
        self._lock = threading.Lock()
        self._held = _HeldBack()
        self._redis_warned_at = -math.inf
        # Without a rate limit: until when a "closed" answer is trusted, and the
        # calls made meanwhile, not yet counted in the breaker's window.
        self._cache = BREAKER_CACHE if self._interval_us == 0 else 0.0
        self._monotonic = clock or time.monotonic
        self._closed_until = -math.inf
        self._uncounted = 0

    @classmethod
    def for_settings(cls, settings: Settings, client: redis.Redis) -> OneboxGuard | None:
        """The guard these settings ask for, or None when both limits are off."""
        config = GuardConfig.from_settings(settings)
        if not config.enabled:
            return None
        return cls(client, Keys(settings.key_prefix), scope_for(settings), config)

    # --- the two calls around every request -----------------------------------------
    def admit(self, step: str) -> Permit:
        """Wait for this call's turn and return its permit, or raise a ``HeldBackError``."""
        config = self.config
        with self._lock:
            if self._monotonic() < self._closed_until:
                self._uncounted += 1
                return Permit()
            uncounted, self._uncounted = self._uncounted, 0
        token = secrets.token_hex(8)
        try:
            verdict, micros, probe = self._admit(
                keys=[self.breaker_key, self.probe_key, self.rate_key],
                args=[self._now(), "1" if config.breaker_failures else "0", token,
                      int(config.probe_ttl * 1000), int(config.breaker_window * US),
                      self._interval_us, int(config.max_wait * US), self._state_ttl_ms,
                      int(config.breaker_cooldown * US), uncounted])
        except redis.RedisError as exc:
            self._redis_unavailable(exc)
            return Permit()
        seconds = int(micros) / US
        metrics.guard_verdict(int(verdict), seconds)
        if verdict == OPEN:
            raise CircuitOpenError(f"Onebox calls are paused for {seconds:.1f}s more: "
                                   "Onebox keeps failing", step=step, retry_after=seconds)
        if verdict == PROBING:
            raise CircuitOpenError("Onebox calls are paused while one probes it", step=step,
                                   retry_after=min(seconds, PROBE_PATIENCE))
        if verdict == TOO_LONG:
            self._note_held(seconds, sent_back=True)
            raise RateLimitedError(f"the shared rate limit has no slot for {seconds:.1f}s",
                                   step=step, retry_after=seconds)
        if probe:
            log.info("circuit breaker half-open: probing Onebox with one %s call", step)
        elif self._cache:
            with self._lock:
                self._closed_until = self._monotonic() + self._cache
        if seconds > 0:
            self._note_held(seconds)
            self._sleep(seconds)
        return Permit(token if probe else None, seconds)

    def report(self, permit: Permit, outcome: str, step: str) -> None:
        """Tell the breaker what a sent call came to (only failures and probes need it)."""
        config = self.config
        if not config.breaker_failures or (permit.probe is None and outcome != FAILED):
            return
        with self._lock:  # a failure: ask again before the next call
            uncounted, self._uncounted, self._closed_until = self._uncounted, 0, -math.inf
        try:
            raw = self._report(
                keys=[self.breaker_key, self.probe_key],
                args=[self._now(), outcome, permit.probe or "", config.breaker_failures,
                      FAILURE_SHARE, int(config.breaker_cooldown * US),
                      int(config.breaker_window * US), self._state_ttl_ms, uncounted])
        except redis.RedisError as exc:
            self._redis_unavailable(exc)
            return
        verdict, failures, calls = text(raw[0]), int(raw[1]), int(raw[2])
        metrics.breaker_changed(verdict)
        if verdict == "opened":
            log.warning("circuit breaker opened: %d of %d Onebox calls failed within %.0fs; "
                        "calls paused for %.0fs", failures, calls, config.breaker_window,
                        config.breaker_cooldown)
        elif verdict == "reopened":
            log.warning("circuit breaker open again: the probe (%s) failed; calls paused for "
                        "%.0fs", step, config.breaker_cooldown)
        elif verdict == "closed":
            log.info("circuit breaker closed: the probe (%s) succeeded; calls resume", step)

    def send(self, step: str, call: Callable[[], requests.Response]) -> requests.Response:
        """Admit, make the call, report what it came to; the call's own errors propagate."""
        permit = self.admit(step)
        try:
            response = call()
        except (requests.ConnectionError, requests.Timeout):
            self.report(permit, FAILED, step)
            raise
        except BaseException:
            self.report(permit, NEUTRAL, step)  # not Onebox's doing: free the probe
            raise
        self.report(permit, FAILED if response.status_code >= 500 else OK, step)
        return response

    # --- for tests and operators ----------------------------------------------------
    def state(self) -> BreakerState:
        raw = {text(k): text(v) for k, v in self._redis.hgetall(self.breaker_key).items()}
        now_us = self._now_us()
        if "open_until" in raw:
            left = min((float(raw["open_until"]) - now_us) / US, self.config.breaker_cooldown)
            return BreakerState("open" if left > 0 else "half_open", max(left, 0.0))
        return BreakerState("closed", 0.0, int(raw.get("failures", 0)), int(raw.get("calls", 0)))

    # --- plumbing ---------------------------------------------------------------
    def _now(self) -> str:
        return "" if self._clock is None else str(int(self._clock() * US))

    def _now_us(self) -> float:
        if self._clock is not None:
            return self._clock() * US
        seconds, micros = self._redis.time()
        return float(seconds) * US + float(micros)

    def _note_held(self, seconds: float, *, sent_back: bool = False) -> None:
        """Count a wait; once in a while, say how many calls the rate limit held back."""
        with self._lock:
            line = self._held.add(seconds, sent_back, time.monotonic())
        if line is not None:
            log.info("rate limit %g calls/s: %s", self.config.rate_limit, line)

    def _redis_unavailable(self, exc: redis.RedisError) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._redis_warned_at < HELD_LOG_EVERY:
                return
            self._redis_warned_at = now
        log.warning("Redis unavailable for the Onebox rate limit and breaker (%s): calls go "
                    "unguarded meanwhile", type(exc).__name__)


@dataclass
class _HeldBack:
    """What the rate limit held back since the last log line of this process."""

    calls: int = 0
    sent_back: int = 0
    seconds: float = 0.0
    longest: float = 0.0
    since: float = -math.inf

    def add(self, seconds: float, sent_back: bool, now: float) -> str | None:
        if sent_back:
            self.sent_back += 1
        else:
            self.calls += 1
            self.seconds += seconds
            self.longest = max(self.longest, seconds)
        if now - self.since < HELD_LOG_EVERY:
            return None
        span = "" if self.since == -math.inf else f" in the last {now - self.since:.0f}s"
        line = (f"{self.calls} calls held back{span} ({self.seconds:.1f}s in all, longest "
                f"{self.longest:.2f}s); {self.sent_back} retried later")
        self.calls, self.sent_back, self.seconds, self.longest, self.since = 0, 0, 0.0, 0.0, now
        return line


#: Steps no ``before_send`` hook is about: the token's call (``fulfilment.onebox.auth.STEP``),
#: made on the way to the call the hook is for.
UNHOOKED_STEPS = frozenset({"token"})

_BEFORE_SEND: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "onebox_before_send", default=None)


@contextmanager
def before_send(hook: Callable[[], None]) -> Iterator[None]:
    """Run ``hook`` just before each call made inside goes out.

    That is after the guard let the call through and after its rate-limit wait:
    never for a call the guard held back, nor for the token's call. The purchase
    flow marks a call that cannot be repeated as sent here, and checks its run's
    time, so a wait is neither taken for a send nor left out of the time spent.
    A hook that raises stops the call unsent. Hooks nest: the outer one runs first.
    """
    outer = _BEFORE_SEND.get()

    def both() -> None:
        if outer is not None:
            outer()
        hook()

    token = _BEFORE_SEND.set(both)
    try:
        yield
    finally:
        _BEFORE_SEND.reset(token)


def guarded(guard: OneboxGuard | None, step: str,
            call: Callable[[], requests.Response]) -> requests.Response:
    """``guard.send(step, call)``, or just ``call()`` when there is no guard.

    Every request to Onebox is made through here: ``before_send`` hooks rely on it.
    """
    # Counted and timed only if sent; the hooks run once the guard lets it go.
    call = _announced(step, metrics.onebox_call(step, call))
    return call() if guard is None else guard.send(step, call)


def announce(step: str) -> None:
    """Run the ``before_send`` hooks of a call about to go out (a stand-in Onebox calls it)."""
    hook = None if step in UNHOOKED_STEPS else _BEFORE_SEND.get()
    if hook is not None:
        hook()


def _announced(step: str,
               call: Callable[[], requests.Response]) -> Callable[[], requests.Response]:
    def announced() -> requests.Response:
        announce(step)
        return call()
    return announced


__all__ = ["BreakerState", "GuardConfig", "OneboxGuard", "Permit", "announce", "before_send",
           "guarded", "scope_for"]

