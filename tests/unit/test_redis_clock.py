"""``RedisClock``: Redis's time from one ``TIME`` every few seconds, whatever this host's clock."""

from __future__ import annotations

from datetime import UTC, datetime

import fakeredis
import pytest
import redis

from fulfilment.clock import MAX_ROUND_TRIP, REFRESH, RedisClock
from fulfilment.keys import Keys
from fulfilment.ledger import Ledger
from fulfilment.lookup import describe, intent_status
from schemas.intent import load_intent

#: Redis's time in these tests, and how far this host's clock is from it.
REDIS_NOW = 1_800_000_000.0
SKEW = -16 * 60.0


class Local:
    """This process's clock, moved by hand (``SKEW`` off Redis's)."""

    def __init__(self) -> None:
        self.now = REDIS_NOW + SKEW

    def __call__(self) -> float:
        return self.now


class Redis:
    """Answers ``TIME`` on Redis's clock (which moves with the local one), counting calls;
    may fail, or take long."""

    def __init__(self, local: Local) -> None:
        self.local = local
        self.calls = 0
        self.down = False
        self.takes = 0.0

    def time(self) -> tuple[int, int]:
        self.calls += 1
        if self.down:
            raise redis.ConnectionError("Redis is down")
        now = self.local.now - SKEW
        self.local.now += self.takes
        return int(now), round((now % 1) * 1_000_000)


@pytest.fixture
def local() -> Local:
    return Local()


@pytest.fixture
def server(local: Local) -> Redis:
    return Redis(local)


def clock_on(server: Redis, local: Local) -> RedisClock:
    return RedisClock(server, local=local)  # type: ignore[arg-type]


def test_it_tells_redis_time_whatever_the_local_clock_says(local: Local, server: Redis) -> None:
    clock = clock_on(server, local)
    assert clock() == pytest.approx(REDIS_NOW, abs=1e-3)
    local.now += 2.5
    assert clock() == pytest.approx(REDIS_NOW + 2.5, abs=1e-3)


def test_one_time_call_per_refresh_interval_not_one_per_reading(local: Local,
                                                                server: Redis) -> None:
    clock = clock_on(server, local)
    for _ in range(1000):
        clock()
        local.now += REFRESH / 1000 * 0.99
    assert server.calls == 1
    local.now += REFRESH
    clock()
    assert server.calls == 2


def test_a_failed_reading_keeps_the_last_offset_and_the_first_one_raises(
        local: Local, server: Redis) -> None:
    server.down = True
    with pytest.raises(redis.ConnectionError):
        clock_on(server, local)()
    server.down = False
    clock = clock_on(server, local)
    clock()
    server.down = True
    local.now += REFRESH + 1
    assert clock() == pytest.approx(REDIS_NOW + REFRESH + 1, abs=1e-3)
    calls = server.calls
    clock()  # not asked again at once: after another interval
    assert server.calls == calls


def test_a_slow_answer_does_not_replace_a_good_offset(local: Local, server: Redis) -> None:
    clock = clock_on(server, local)
    clock()
    # Redis's clock answered at the start of a slow round trip: the midpoint would be off
    server.takes = MAX_ROUND_TRIP * 4
    local.now += REFRESH + 1
    assert clock() == pytest.approx(REDIS_NOW + REFRESH + 1 + MAX_ROUND_TRIP * 4, abs=1e-3)


def test_a_ledger_without_a_clock_stamps_progress_on_redis_time() -> None:
    client = fakeredis.FakeRedis()
    ledger = Ledger(client, Keys("t"), 3600)
    ledger.admit(load_intent({"reference": "r-1", "buyer": {"email": "a@example.com"},
                              "items": [{"session_id": 1, "price_type_id": 3, "quantity": 1}]}))
    seconds, micros = client.time()
    entry = ledger.get("r-1")
    assert entry is not None and entry.admitted_at is not None
    assert abs(entry.updated_at - (seconds + micros / 1e6)) < 1.0
    assert isinstance(ledger.clock, RedisClock)


def test_status_counts_ago_on_the_redis_clock_it_read() -> None:
    client = fakeredis.FakeRedis()
    Ledger(client, Keys("t"), 3600, clock=lambda: REDIS_NOW).admit(load_intent({
        "reference": "r-2", "buyer": {"email": "a@example.com"},
        "items": [{"session_id": 1, "price_type_id": 3, "quantity": 1}]}))
    found = intent_status(client, Keys("t"), "r-2")
    seconds, _ = client.time()
    assert found.read_at == datetime.fromtimestamp(seconds, UTC).isoformat().replace(
        "+00:00", "Z")
    # Read 3 minutes after admission on Redis's clock, whatever this host's clock says
    later = datetime.fromtimestamp(REDIS_NOW + 180, UTC).isoformat().replace("+00:00", "Z")
    lines = describe(found.__class__(**{**found.as_dict(), "read_at": later}))
    assert any(line.startswith("  admitted") and line.endswith("(3m ago)") for line in lines)
