"""The session cap's semaphore on a real Redis (its Lua is Redis's), and the flow using it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection
from prometheus_client import CollectorRegistry

from fulfilment import metrics
from fulfilment.config import Settings
from fulfilment.flow import Proceed, RetryIn, Services, Stage, advance
from fulfilment.keys import Keys
from fulfilment.lease import Leases
from fulfilment.ledger import Admission, Ledger
from fulfilment.results import ResultPublisher
from fulfilment.retry import RetryPolicy
from fulfilment.sandbox.catalogue import Catalogue
from fulfilment.sandbox.state import SandboxState
from fulfilment.sessioncap import SessionCap, sessions_of
from fulfilment.topology import Topology
from schemas.intent import load_intent
from tests import services
from tests.unit.test_flow import FakeOnebox

real_redis = pytest.mark.integration


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    prefix_client = redis.Redis.from_url(services.redis_url())
    yield prefix_client
    prefix_client.close()


@pytest.fixture
def keys(client: redis.Redis) -> Iterator[Keys]:
    prefix = services.unique_prefix()
    yield Keys(prefix)
    found = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if found:
        client.delete(*found)


def wait_until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# --- the semaphore -------------------------------------------------------------
@real_redis
def test_the_cap_holds_under_contention_from_many_threads(client: redis.Redis,
                                                          keys: Keys) -> None:
    # Given a cap of 2 on session 7 and 24 threads that each want it three times
    cap = SessionCap(client, keys, 2, hold=30.0)
    inside, peak, done = [0], [0], [0]
    lock = threading.Lock()

    def worker(n: int) -> None:
        own = redis.Redis.from_url(services.redis_url())
        mine = SessionCap(own, keys, 2, hold=30.0)
        for round_ in range(3):
            holder = f"t{n}-{round_}"
            while not mine.take(holder, [7]).held:
                time.sleep(0.002)
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.003)  # the purchase's work, while holding
            with lock:
                inside[0] -= 1
                done[0] += 1
            mine.release(holder, [7])
        own.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(24)]
    # When they all run at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Then every one got through, never more than 2 at a time, and 2 did run together
    assert done[0] == 72
    assert peak[0] == 2
    assert cap.holders(7) == []


@real_redis
def test_taking_again_is_idempotent(client: redis.Redis, keys: Keys) -> None:
    cap = SessionCap(client, keys, 2, hold=30.0)
    assert cap.take("a", [7]).held
    assert cap.take("a", [7]).held  # the same holder: no second slot
    assert cap.holders(7) == ["a"]
    assert cap.take("b", [7]).held
    assert not cap.take("c", [7]).held
    assert cap.take("a", [7]).held  # still its own, at the cap
    assert cap.holders(7) == ["a", "b"]


@real_redis
def test_a_dead_holders_slot_lapses(client: redis.Redis, keys: Keys) -> None:
    # Given a holder that took the only slot and never renewed it (its worker died)
    cap = SessionCap(client, keys, 1, hold=0.3)
    assert cap.take("dead", [7]).held
    assert not cap.take("next", [7]).held
    started = time.monotonic()
    # Then the slot is free again once its hold lapses
    wait_until(lambda: cap.take("next", [7]).held)
    assert time.monotonic() - started < 5.0
    assert cap.holders(7) == ["next"]


@real_redis
def test_renewal_keeps_a_live_holder_and_a_released_one_never_blocks(client: redis.Redis,
                                                                     keys: Keys) -> None:
    cap = SessionCap(client, keys, 1, hold=0.3)
    assert cap.take("live", [7]).held
    for _ in range(5):  # renewed as its lease is, past its first hold
        cap.hold("live", [7], 0.3)
        assert cap.holders(7) == ["live"]
        time.sleep(0.1)
    assert not cap.take("other", [7]).held
    cap.release("live", [7])
    assert cap.hold("live", [7], 0.3) == 0  # a renewal never brings a released holder back
    assert cap.take("other", [7]).held


@real_redis
def test_a_multi_session_take_is_all_or_none(client: redis.Redis, keys: Keys) -> None:
    # Given session 1 full (cap 1) and session 2 free
    cap = SessionCap(client, keys, 1, hold=30.0)
    assert cap.take("a", [1]).held
    # When an intent needs both: it takes neither, and waits in both lines
    assert not cap.take("both", [1, 2]).held
    assert cap.holders(2) == []
    # Then session 2's free slot is kept for it (first in line), not given to a newcomer
    assert not cap.take("newcomer", [2]).held
    # And once session 1 frees, it takes both at once
    cap.release("a", [1])
    assert cap.take("both", [2, 1]).held
    assert cap.holders(1) == ["both"] and cap.holders(2) == ["both"]


@real_redis
def test_waiters_are_served_first_come_first_served(client: redis.Redis, keys: Keys) -> None:
    cap = SessionCap(client, keys, 1, hold=30.0)
    assert cap.take("holder", [7]).held
    first, second = cap.take("first", [7]), cap.take("second", [7])
    assert not first.held and first.joined and first.behind == 0
    assert not second.held and second.behind == 1
    assert not cap.take("first", [7]).joined  # asking again keeps its place
    cap.release("holder", [7])
    assert not cap.take("newcomer", [7]).held  # a newcomer does not overtake the line
    assert not cap.take("second", [7]).held
    assert cap.take("first", [7]).held
    cap.release("first", [7])
    assert cap.take("second", [7]).held


@real_redis
def test_a_waiter_that_stops_asking_leaves_the_line(client: redis.Redis, keys: Keys) -> None:
    cap = SessionCap(client, keys, 1, hold=30.0, waiter_ttl=0.3)
    assert cap.take("holder", [7]).held
    assert not cap.take("gone", [7]).held  # then its message is lost
    cap.release("holder", [7])
    assert not cap.take("later", [7]).held
    wait_until(lambda: cap.take("later", [7]).held)


def test_the_wait_grows_with_the_place_in_line() -> None:
    cap = SessionCap(redis.Redis(), Keys("x"), 2, hold=15.0)  # no call is made
    assert cap.retry_after(0) == cap.retry_after(1) == 0.5
    assert cap.retry_after(2) == 1.0
    assert cap.retry_after(1000) == 5.0


def test_an_intent_takes_every_session_it_touches() -> None:
    intent = load_intent({"reference": "r", "buyer": {"email": "a@example.com"},
                          "items": [{"seats": [{"id": 1, "session_id": 30},
                                               {"id": 2, "session_id": 10}]},
                                    {"session_id": 20, "price_type_id": 3, "quantity": 1}]})
    assert sessions_of(intent) == (10, 20, 30)


# --- the sandbox's view --------------------------------------------------------
def test_the_sandbox_counts_open_orders_per_session_and_their_peak() -> None:
    state = SandboxState(Catalogue.default())
    first, second = state.create_order(), state.create_order()
    assert state.audit()["peak_open_orders_by_session"] == {}  # empty baskets hold no session
    state.add_seats_auto(first, 1002, 3, 2)
    state.add_seats_auto(second, 1002, 3, 1)
    state.add_seats_auto(second, 1003, 6, 1)
    audit = state.audit()
    assert audit["open_orders_by_session"] == {"1002": 2, "1003": 1}
    state.release(second, [item.id for item in second.items.values()
                           if item.session_id == 1002])
    state.set_buyer(first, {"email": "a@example.com"})
    state.pre_confirm(first)
    state.confirm(first, "ref")
    audit = state.audit()
    assert audit["open_orders_by_session"] == {"1003": 1}
    assert audit["peak_open_orders_by_session"] == {"1002": 2, "1003": 1}


# --- the flow ------------------------------------------------------------------
@pytest.fixture
def cap_services(client: redis.Redis, keys: Keys) -> Iterator[tuple[Services, FakeOnebox]]:
    onebox = FakeOnebox()
    settings = Settings.defaults().with_overrides(key_prefix=keys.prefix, session_cap=1)
    with Connection("memory://localhost/", transport_options={"polling_interval": 0.01}) as conn:
        yield Services(
            settings=settings, client=onebox,  # type: ignore[arg-type]
            ledger=Ledger(client, keys, 3600),
            publisher=ResultPublisher(conn, Topology.for_keys(keys)),
            leases=Leases(client, keys, 15),
            policy=RetryPolicy(max_attempts=5, base=1.0, cap=8.0, deadline=900, jitter=False),
            session_cap=SessionCap(client, keys, 1, hold=15.0),
        ), onebox


def admit(services_: Services, reference: str, session: int = 1002) -> str:
    intent = load_intent({"reference": reference, "buyer": {"email": "a@example.com"},
                          "items": [{"session_id": session, "price_type_id": 3, "quantity": 1}]})
    assert services_.ledger.admit(intent) is Admission.NEW
    return reference


@real_redis
def test_a_purchase_waits_for_its_session_and_an_open_basket_is_never_held_back(
        cap_services: tuple[Services, FakeOnebox]) -> None:
    services_, onebox = cap_services
    registry = CollectorRegistry()
    metrics.install(metrics.Metrics(registry))
    try:
        first, second, other = (admit(services_, "first"), admit(services_, "second"),
                                admit(services_, "other", session=1003))
        # Given the first intent's basket open on session 1002 (cap 1)
        assert isinstance(advance(services_, first, Stage.BASKET), Proceed)
        # When a second intent for that session runs: it waits, nothing sent, nothing counted
        calls = len(onebox.calls)
        decision = advance(services_, second, Stage.BASKET)
        assert isinstance(decision, RetryIn) and decision.reason == "SESSION_CAP"
        assert len(onebox.calls) == calls
        entry = services_.ledger.get(second)
        assert entry is not None and entry.order_id is None
        assert entry.fields.get("failures") in (None, "", "0")
        assert registry.get_sample_value("fulfilment_session_cap_waits_total",
                                         {"wait": "first"}) == 1
        # And an intent for another session is not held back
        assert isinstance(advance(services_, other, Stage.PUBLISHED), Proceed)
        # Even with its slot lapsed and taken by the waiting intent, whose basket opens,
        assert services_.session_cap is not None
        services_.session_cap.release(first, [1002])
        assert isinstance(advance(services_, second, Stage.BASKET), Proceed)
        assert services_.session_cap.holders(1002) == ["second"]
        # the open basket's confirm goes on: the cap is about starting purchases
        assert isinstance(advance(services_, first, Stage.PUBLISHED), Proceed)
        assert onebox.confirms.get(first) == 1
        # Then each outcome gave its slot back
        assert services_.session_cap.holders(1002) == ["second"]
        assert isinstance(advance(services_, second, Stage.PUBLISHED), Proceed)
        assert onebox.confirms.get(second) == 1
        assert services_.session_cap.holders(1002) == []
    finally:
        metrics.install(None)


@real_redis
def test_a_held_slot_outlasts_the_wait_a_run_schedules(
        cap_services: tuple[Services, FakeOnebox]) -> None:
    services_, onebox = cap_services
    from fulfilment.errors import TransientError

    first = admit(services_, "first")
    # Given a basket whose pre-confirm must wait 40 s (a 503 with Retry-After: 40)
    onebox.failures["pre_confirm"] = [TransientError("busy", status=503, retry_after=40.0)]
    decision = advance(services_, first, Stage.PUBLISHED)
    assert isinstance(decision, RetryIn) and decision.delay >= 8.0
    # Then, past a lease's time, its slot is still held: a newcomer waits
    assert services_.session_cap is not None
    hold_until = services_.ledger.redis.zscore(
        services_.ledger.keys.session_cap(1002, "holders"), first)
    seconds, micros = services_.ledger.redis.time()
    assert hold_until is not None
    assert hold_until - (seconds * 1000 + micros // 1000) > (decision.delay + 15.0) * 1000
