"""The fleet's Onebox limits when Redis's clock steps back, on a real Redis and its clock.

A step back cannot be made on the shared Redis, so each test writes the state as
the step leaves it: times ahead of Redis's ``TIME`` by an hour (an NTP correction,
a VM restored from a snapshot). Whatever was written, no call may be held back
longer than the configuration allows.
"""

from __future__ import annotations

import pytest
import redis

from fulfilment.errors import CircuitOpenError, RateLimitedError
from fulfilment.keys import Keys
from fulfilment.onebox.guard import FAILED, US, GuardConfig, OneboxGuard, Permit

pytestmark = pytest.mark.integration

#: How far ahead of Redis's clock the state is left: the size of the step back.
STEP = 3600.0


def guard_for(client: redis.Redis, prefix: str, config: GuardConfig) -> OneboxGuard:
    """A guard on Redis's own clock (no injected one), sleeps recorded, not slept."""
    slept: list[float] = []
    return OneboxGuard(client, Keys(prefix), "acct", config, sleep=slept.append)


def redis_now_us(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * US + int(micros)


def test_an_arrival_time_left_ahead_holds_calls_back_no_longer_than_the_longest_wait(
        redis_client: redis.Redis, prefix: str) -> None:
    # Given a rate limit whose arrival time lies an hour ahead of Redis's clock
    config = GuardConfig(rate_limit=10, max_wait=2.0, breaker_failures=0)
    guard = guard_for(redis_client, prefix, config)
    redis_client.set(guard.rate_key, str(redis_now_us(redis_client) + int(STEP * US)))
    # When a call asks for its turn
    with pytest.raises(RateLimitedError) as held:
        guard.admit("create")
    # Then it is told to come back after at most the longest wait plus one interval
    bound = config.max_wait + 1 / config.rate_limit
    assert held.value.retry_after is not None and held.value.retry_after <= bound + 0.05
    # And the limiter owes no more than that from now on (the clamp is written back)
    owed = (int(redis_client.get(guard.rate_key) or 0) - redis_now_us(redis_client)) / US
    assert owed <= bound


def test_a_breaker_left_open_an_hour_ahead_pauses_calls_no_longer_than_its_cool_down(
        redis_client: redis.Redis, prefix: str) -> None:
    config = GuardConfig(breaker_failures=5, breaker_cooldown=15.0)
    guard = guard_for(redis_client, prefix, config)
    open_until = redis_now_us(redis_client) + int(STEP * US)
    redis_client.hset(guard.breaker_key, "open_until", str(open_until))
    with pytest.raises(CircuitOpenError) as paused:
        guard.admit("create")
    assert paused.value.retry_after is not None
    assert paused.value.retry_after <= config.breaker_cooldown
    assert guard.state().seconds_left <= config.breaker_cooldown
    left = (float(redis_client.hget(guard.breaker_key, "open_until") or 0)
            - redis_now_us(redis_client)) / US
    assert left <= config.breaker_cooldown


def test_a_probe_whose_key_outlives_the_step_is_held_no_longer_than_its_ttl(
        redis_client: redis.Redis, prefix: str) -> None:
    # Given a breaker whose cool-down is over, and a probe's key that Redis will
    # keep an hour too long (key expiry is on the same wall clock)
    config = GuardConfig(breaker_failures=5, probe_ttl=20.0)
    guard = guard_for(redis_client, prefix, config)
    redis_client.hset(guard.breaker_key, "open_until", str(redis_now_us(redis_client) - US))
    redis_client.set(guard.probe_key, "someone", px=int((STEP + config.probe_ttl) * 1000))
    # When another call comes: it waits for the probe
    with pytest.raises(CircuitOpenError):
        guard.admit("create")
    # Then the probe's hold is cut to its TTL: the fleet probes again within it
    assert 0 < redis_client.pttl(guard.probe_key) <= config.probe_ttl * 1000


def test_a_failure_window_that_starts_ahead_is_begun_again(
        redis_client: redis.Redis, prefix: str) -> None:
    # Given a window that starts an hour ahead, holding failures from before the step
    config = GuardConfig(breaker_failures=3, breaker_window=10.0)
    guard = guard_for(redis_client, prefix, config)
    start = redis_now_us(redis_client) + int(STEP * US)
    redis_client.hset(guard.breaker_key, mapping={"window_start": str(start), "calls": 2,
                                                  "failures": 2})
    # When one more call fails
    guard.report(Permit(), FAILED, "create")
    # Then it starts a new window: failures an hour apart never add up to open it
    state = guard.state()
    assert state.status == "closed" and state.failures == 1
