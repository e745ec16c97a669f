"""The fleet's rate limit and circuit breaker: the Lua scripts' logic on fakeredis, a
clock moved by hand, and sleeps recorded rather than slept."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
import requests

from fulfilment.config import Settings
from fulfilment.errors import CircuitOpenError, HeldBackError, RateLimitedError, TransientError
from fulfilment.keys import Keys
from fulfilment.onebox import auth
from fulfilment.onebox.guard import (
    BREAKER_CACHE,
    FAILED,
    OK,
    PROBE_PATIENCE,
    UNHOOKED_STEPS,
    GuardConfig,
    OneboxGuard,
    before_send,
    guarded,
    scope_for,
)

T0 = 1_800_000_000.0


class Fleet:
    """Guards of several "processes" sharing one Redis and one (hand-moved) clock."""

    def __init__(self, config: GuardConfig) -> None:
        self.redis = fakeredis.FakeRedis()
        self.now = T0
        self.config = config
        self.slept: list[float] = []

    def guard(self) -> OneboxGuard:
        return OneboxGuard(self.redis, Keys("unit"), "acct", self.config,
                           clock=lambda: self.now, sleep=self.slept.append)

    def answer(self, status: int) -> Callable[[], requests.Response]:
        def call() -> requests.Response:
            response = requests.Response()
            response.status_code = status
            return response
        return call


def refused() -> requests.Response:
    raise requests.ConnectionError("connection refused")


# --- the rate limit -------------------------------------------------------------------
def test_calls_at_once_are_spaced_one_interval_apart_by_the_scripts_wait() -> None:
    fleet = Fleet(GuardConfig(rate_limit=10, breaker_failures=0))
    guard = fleet.guard()
    waits = [guard.admit("create").waited for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert fleet.slept == pytest.approx([0.1, 0.2, 0.3, 0.4])  # one sleep per call, no polling
    fleet.now += 10  # idle a while: no credit saved up beyond the next slot
    assert [guard.admit("create").waited for _ in range(2)] == pytest.approx([0.0, 0.1])


def test_the_limit_is_shared_by_every_process() -> None:
    fleet = Fleet(GuardConfig(rate_limit=4, breaker_failures=0))
    first, second = fleet.guard(), fleet.guard()
    waits = [guard.admit("seats").waited for guard in (first, second, first, second)]
    assert waits == pytest.approx([0.0, 0.25, 0.5, 0.75])


def test_no_one_second_window_holds_more_calls_than_the_limit() -> None:
    # Given 40 calls/s for four processes and callers arriving at random, in bursts
    fleet = Fleet(GuardConfig(rate_limit=40, max_wait=60, breaker_failures=0))
    guards = [fleet.guard() for _ in range(4)]
    rng = random.Random(7)
    sent: list[int] = []  # microseconds, as the script counts
    arrival = T0
    for _ in range(600):
        arrival += rng.choice([0.0, 0.0, 0.001, 0.01, 0.05, 0.2])
        fleet.now = arrival
        waited = rng.choice(guards).admit("create").waited
        sent.append(int(arrival * 1_000_000) + round(waited * 1_000_000))
    # Then every window [t, t + 1 s) that starts at a call holds at most 40 of them
    sent.sort()
    most = max(sum(1 for s in sent[i:i + 60] if s < start + 1_000_000)
               for i, start in enumerate(sent))
    assert most == 40


def test_a_turn_too_far_off_is_not_taken_but_retried_later() -> None:
    fleet = Fleet(GuardConfig(rate_limit=10, max_wait=0.25, breaker_failures=0))
    guard = fleet.guard()
    for _ in range(3):
        guard.admit("confirm")  # waits 0, 0.1, 0.2
    with pytest.raises(RateLimitedError) as caught:
        guard.admit("confirm")
    assert caught.value.retry_after == pytest.approx(0.3)
    assert caught.value.code == "RATE_LIMITED" and caught.value.step == "confirm"
    # The refused call reserved nothing: 0.1 s later the next slot is 0.2 s off
    fleet.now += 0.1
    assert guard.admit("confirm").waited == pytest.approx(0.2)


def test_held_back_calls_are_logged_once_in_a_while_not_per_call(
        caplog: pytest.LogCaptureFixture) -> None:
    fleet = Fleet(GuardConfig(rate_limit=100, breaker_failures=0))
    guard = fleet.guard()
    with caplog.at_level(logging.INFO, logger="fulfilment.onebox.guard"):
        for _ in range(50):
            guard.admit("create")
    lines = [r.getMessage() for r in caplog.records if "held back" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("rate limit 100 calls/s: 1 calls held back")


# --- the circuit breaker ------------------------------------------------------------
def breaker_fleet() -> Fleet:
    return Fleet(GuardConfig(breaker_failures=5, breaker_window=10, breaker_cooldown=30))


def test_failures_open_the_breaker_for_the_whole_fleet(caplog: pytest.LogCaptureFixture) -> None:
    fleet = breaker_fleet()
    one, other = fleet.guard(), fleet.guard()
    with caplog.at_level(logging.INFO, logger="fulfilment.onebox.guard"):
        for index in range(5):
            guard = one if index % 2 else other
            with pytest.raises(requests.ConnectionError):
                guard.send("create", refused)
    fleet.now += 4
    with pytest.raises(CircuitOpenError) as caught:
        other.send("create", fleet.answer(200))
    assert caught.value.retry_after == pytest.approx(26.0)
    assert caught.value.code == "CIRCUIT_OPEN" and caught.value.step == "create"
    assert isinstance(caught.value, HeldBackError) and isinstance(caught.value, TransientError)
    assert one.state().status == "open"
    opened = [r.getMessage() for r in caplog.records if "opened" in r.getMessage()]
    assert opened == ["circuit breaker opened: 5 of 5 Onebox calls failed within 10s; "
                      "calls paused for 30s"]


@pytest.mark.parametrize("status", [400, 401, 404, 409, 429])
def test_onebox_answering_4xx_is_no_failure(status: int) -> None:
    fleet = breaker_fleet()
    guard = fleet.guard()
    for _ in range(20):
        guard.send("seats", fleet.answer(status))
    assert guard.state().status == "closed"
    guard.send("seats", fleet.answer(200))


@pytest.mark.parametrize("failure", ["500", "502", "503", "504", "timeout", "refused"])
def test_5xx_timeouts_and_connection_failures_count(failure: str) -> None:
    fleet = breaker_fleet()
    guard = fleet.guard()

    def call() -> requests.Response:
        if failure == "timeout":
            raise requests.ReadTimeout("read timed out")
        if failure == "refused":
            raise requests.ConnectionError("refused")
        return fleet.answer(int(failure))()

    for _ in range(5):
        with contextlib.suppress(requests.RequestException):
            guard.send("confirm", call)
    assert guard.state().status == "open"


def test_a_few_failures_among_many_successes_do_not_open_it() -> None:
    fleet = breaker_fleet()
    guard = fleet.guard()
    for index in range(40):
        guard.send("create", fleet.answer(503 if index % 4 == 0 else 200))  # 10 of 40
        fleet.now += 0.1
    state = guard.state()
    assert state.status == "closed" and state.failures == 10
    # Calls since the last failure are handed over with the next ask (BREAKER_CACHE).
    assert 40 - BREAKER_CACHE / 0.1 <= state.calls <= 40


def test_without_a_rate_limit_a_closed_breaker_is_asked_once_per_breaker_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = breaker_fleet()
    guard, other = fleet.guard(), fleet.guard()
    asks: list[dict[str, Any]] = []
    admit = guard._admit

    def recorded_admit(**kw: Any) -> Any:
        asks.append(kw)
        return admit(**kw)

    monkeypatch.setattr(guard, "_admit", recorded_admit)
    for _ in range(10):
        guard.send("create", fleet.answer(200))
        fleet.now += BREAKER_CACHE / 4
    assert len(asks) == 3  # calls 0, 4 and 8: each time the last answer is BREAKER_CACHE old
    assert [ask["args"][-1] for ask in asks] == [0, 3, 3]  # the calls made meanwhile
    for _ in range(20):  # another worker's failures open the breaker
        other.send("create", fleet.answer(503))
        if other.state().status == "open":
            break
    assert guard.state().status == "open"
    guard.send("create", fleet.answer(200))  # still trusted: learnt late, but learnt
    fleet.now += BREAKER_CACHE
    with pytest.raises(CircuitOpenError):
        guard.send("create", fleet.answer(200))


def test_failures_spread_over_many_windows_do_not_open_it() -> None:
    fleet = breaker_fleet()
    guard = fleet.guard()
    for _ in range(20):
        guard.send("create", fleet.answer(503))
        fleet.now += 3  # four failures per 10-second window
    assert guard.state().status == "closed"


def open_breaker(fleet: Fleet) -> None:
    guard = fleet.guard()
    for _ in range(5):
        guard.send("create", fleet.answer(503))
    assert guard.state().status == "open"


def test_after_the_cool_down_one_probe_goes_and_its_success_closes_it(
        caplog: pytest.LogCaptureFixture) -> None:
    fleet = breaker_fleet()
    open_breaker(fleet)
    one, other = fleet.guard(), fleet.guard()
    fleet.now += 30
    assert one.state().status == "half_open"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fulfilment.onebox.guard"):
        probe = one.admit("create")
        assert probe.probe is not None
        # While it is under way nobody else calls, and each is told to look again soon
        with pytest.raises(CircuitOpenError) as caught:
            other.admit("seats")
        assert 0 < (caught.value.retry_after or 0) <= PROBE_PATIENCE
        one.report(probe, OK, "create")
    assert other.admit("seats").probe is None
    assert other.state().status == "closed"
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["circuit breaker half-open: probing Onebox with one create call",
                        "circuit breaker closed: the probe (create) succeeded; calls resume"]


def test_a_failed_probe_opens_it_for_another_cool_down(caplog: pytest.LogCaptureFixture) -> None:
    fleet = breaker_fleet()
    open_breaker(fleet)
    fleet.now += 31
    guard = fleet.guard()
    with caplog.at_level(logging.WARNING, logger="fulfilment.onebox.guard"), \
            pytest.raises(requests.ConnectionError):
        guard.send("token", refused)
    assert "circuit breaker open again: the probe (token) failed" in caplog.text
    fleet.now += 29
    with pytest.raises(CircuitOpenError) as caught:
        guard.admit("create")
    assert caught.value.retry_after == pytest.approx(1.0)
    fleet.now += 1
    assert guard.admit("create").probe is not None


def test_a_probe_that_could_not_be_sent_lets_another_worker_probe() -> None:
    fleet = breaker_fleet()
    open_breaker(fleet)
    fleet.now += 30
    one, other = fleet.guard(), fleet.guard()

    def broken() -> requests.Response:
        raise requests.exceptions.InvalidHeader("our own mistake, not Onebox's")

    with pytest.raises(requests.exceptions.InvalidHeader):
        one.send("create", broken)
    assert other.admit("create").probe is not None  # the probe was freed, not spent


def test_calls_admitted_before_it_opened_and_failing_late_change_nothing() -> None:
    fleet = breaker_fleet()
    guard = fleet.guard()
    late = guard.admit("confirm")
    open_breaker(fleet)
    guard.report(late, FAILED, "confirm")
    fleet.now += 30
    assert guard.admit("create").probe is not None  # the cool-down was not extended


def test_the_rate_limit_slot_is_not_taken_by_a_refused_call() -> None:
    fleet = Fleet(GuardConfig(rate_limit=10, breaker_failures=5, breaker_cooldown=30))
    open_breaker(fleet)
    guard = fleet.guard()
    fleet.now += 1
    for _ in range(5):
        with pytest.raises(CircuitOpenError):
            guard.admit("create")
    fleet.now += 29
    assert guard.admit("create").waited == 0.0


def test_without_redis_calls_go_through_unguarded(caplog: pytest.LogCaptureFixture) -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    guard = OneboxGuard(client, Keys("unit"), "acct", GuardConfig(rate_limit=1),
                        clock=lambda: T0, sleep=lambda _: None)
    server.connected = False
    with caplog.at_level(logging.WARNING, logger="fulfilment.onebox.guard"):
        for _ in range(3):
            response = guard.send("create", Fleet(GuardConfig()).answer(200))
            assert response.status_code == 200
    assert caplog.text.count("calls go unguarded") == 1


# --- before_send: just before a call goes out ----------------------------------------
def test_before_send_runs_after_the_wait_and_never_for_a_call_held_back() -> None:
    # Given calls that wait for their turn, and one whose turn is too far off
    fleet = Fleet(GuardConfig(rate_limit=1, max_wait=1.5, breaker_failures=0))
    guard, seen = fleet.guard(), []
    with before_send(lambda: seen.append(len(fleet.slept))):
        guarded(guard, "seats", fleet.answer(200))
        guarded(guard, "seats", fleet.answer(200))  # waits 1 s first
        with pytest.raises(RateLimitedError):
            guarded(guard, "seats", fleet.answer(200))  # 2 s off: held back, not sent
    # Then the hook ran once per call sent, each time after the call's wait
    assert seen == [0, 1]
    fleet.now += 10
    guarded(guard, "seats", fleet.answer(200))  # outside: no hook
    assert seen == [0, 1]


def test_before_send_skips_the_token_call_and_nests_outer_first() -> None:
    assert auth.STEP in UNHOOKED_STEPS  # the token's call is made on the way to the call
    fleet, seen = Fleet(GuardConfig(breaker_failures=0)), []
    with before_send(lambda: seen.append("outer")), before_send(lambda: seen.append("inner")):
        guarded(None, auth.STEP, fleet.answer(200))
        guarded(None, "pre_confirm", fleet.answer(200))
    assert seen == ["outer", "inner"]


def test_a_hook_that_raises_stops_the_call_unsent_and_frees_the_probe() -> None:
    # Given a breaker whose cool-down is over: the next call is the probe
    fleet = breaker_fleet()
    guard = fleet.guard()
    for _ in range(5):
        guard.send("create", fleet.answer(503))
    fleet.now += 31
    sent: list[int] = []

    def call() -> requests.Response:
        sent.append(1)
        return fleet.answer(200)()

    def out_of_time() -> None:
        raise TransientError("this run's time is up")

    # When the caller's hook stops it just before it goes out
    with before_send(out_of_time), pytest.raises(TransientError):
        guarded(guard, "create", call)
    # Then nothing was sent, and another call may probe at once
    assert sent == []
    assert guard.state().status == "half_open"
    guarded(guard, "create", call)
    assert sent == [1] and guard.state().status == "closed"


# --- wiring ------------------------------------------------------------------------
def test_settings_turn_the_guard_on_and_off() -> None:
    redis_client = fakeredis.FakeRedis()
    off = Settings.defaults().with_overrides(onebox_rate_limit=0, onebox_breaker_failures=0)
    assert OneboxGuard.for_settings(off, redis_client) is None
    guard = OneboxGuard.for_settings(Settings.defaults().with_overrides(onebox_rate_limit=40),
                                     redis_client)
    assert guard is not None and guard.config.rate_limit == 40
    assert guard.config.probe_ttl == pytest.approx(3.05 + 15 + 1)


def test_each_onebox_account_has_its_own_limits() -> None:
    base = Settings.defaults()
    assert scope_for(base) == scope_for(base.with_overrides(key_prefix="other"))
    assert scope_for(base) != scope_for(base.with_overrides(onebox_channel_id="channel-2"))
    assert "sandbox-api-key" not in Keys("p").onebox_guard(scope_for(base), "rate")

