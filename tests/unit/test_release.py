"""Bulk flow control's scripts on a real Redis: fair turns, the in-flight bound, parking.

Real Redis only: the release script names the ready lists it pops at run time
and parks with a score of ``inf``, which only the real Lua shows working.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
import redis

from fulfilment.keys import Keys
from fulfilment.ledger import Ledger
from fulfilment.producer import ACCEPTED, Producer
from fulfilment.release import BulkGate, BulkRelease, waiting
from schemas.intent import BULK, LIVE

pytestmark = pytest.mark.integration


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture
def client(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


def release_of(client: redis.Redis, keys: Keys, bound: int) -> BulkRelease:
    return BulkRelease(client, keys, in_flight=bound, clock=time.time)


def test_shops_take_turns_one_reference_at_a_time(client: redis.Redis, keys: Keys) -> None:
    # Given shop A's upload parked first, then shop B's, then the default shop's
    release = release_of(client, keys, bound=100)
    release.park("shop-a", [f"a{n}" for n in range(10)])
    release.park("shop-b", [f"b{n}" for n in range(3)])
    release.park(None, ["d0"])
    # When references are released
    released = release.release(limit=9)
    # Then the shops take turns, each in its own order, until a shop runs out
    assert released == ["a0", "b0", "d0", "a1", "b1", "a2", "b2", "a3", "a4"]
    assert waiting(client, keys).by_shop == {"shop-a": 5}


def test_a_shop_that_comes_back_joins_the_rotation_once(client: redis.Redis,
                                                        keys: Keys) -> None:
    release = release_of(client, keys, bound=100)
    release.park("shop-a", ["a0", "a1"])
    release.park("shop-a", ["a2"])  # a second chunk of the same shop: no second turn
    release.park("shop-b", ["b0", "b1", "b2"])
    assert release.release(limit=10) == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert client.llen(keys.bulk_shops) == 0
    # And a shop whose list ran dry comes back with its next upload
    release.park("shop-b", ["b3"])
    assert release.release() == ["b3"]


def test_no_more_than_the_bound_is_in_flight_and_a_finish_frees_one(
        client: redis.Redis, keys: Keys) -> None:
    release = release_of(client, keys, bound=3)
    release.park("shop-a", [f"a{n}" for n in range(6)])
    assert release.release() == ["a0", "a1", "a2"]
    assert release.release() == []  # full
    assert release.release(finished="a1") == ["a3"]  # a top-up: one out, one in
    assert release.release(finished="not-in-flight") == []
    assert client.zcard(keys.bulk_in_flight) == 3
    assert waiting(client, keys).in_flight == 3


def test_parked_intents_are_not_stuck_and_released_ones_are_if_never_sent(
        client: redis.Redis, keys: Keys) -> None:
    # Given three admitted bulk intents, parked
    ledger = Ledger(client, keys, 3600)
    producer = Producer(ledger, lambda _: None, max_quantity=50)
    references = [s.reference for s in producer.submit_many(
        [intent(f"p{n}") for n in range(3)], lane=LIVE)]  # admitted, nothing parked yet
    release = release_of(client, keys, bound=1)
    release.park(None, [r for r in references if r is not None])
    later = time.time() + 3600
    # Then the recovery sweep leaves them be, however long they wait
    assert ledger.stuck(later) == []
    # When one is released and its sender dies before sending it
    assert release.release() == ["p0"]
    # Then the sweep finds it once FULFILMENT_STUCK_AFTER has passed; the others still wait
    assert ledger.stuck(later) == ["p0"]
    assert ledger.open_count() == 3


def test_time_parked_in_the_lane_does_not_count_against_the_retry_deadline(
        client: redis.Redis, keys: Keys) -> None:
    # Given a bulk intent admitted, then parked for an hour (the clocks moved by hand)
    now = [1_800_000_000.0]
    ledger = Ledger(client, keys, 7200, clock=lambda: now[0])
    producer = Producer(ledger, lambda _: None, max_quantity=50)
    assert [a.status for a in producer.submit_many([intent("late-1")], lane=LIVE)] == [ACCEPTED]
    release = BulkRelease(client, keys, in_flight=1, clock=lambda: now[0])
    release.park(None, ["late-1"])
    now[0] += 3600
    # When its turn comes
    assert release.release() == ["late-1"]
    now[0] += 5
    # Then its retry deadline has run 5 s, not an hour
    entry = ledger.get("late-1")
    assert entry is not None and ledger.age(entry) == pytest.approx(5.0)


def test_tidy_frees_the_slots_of_purchases_that_ended_without_a_top_up(
        client: redis.Redis, keys: Keys) -> None:
    ledger = Ledger(client, keys, 3600)
    producer = Producer(ledger, lambda _: None, max_quantity=50)
    list(producer.submit_many([intent(f"t{n}") for n in range(3)], lane=LIVE))
    release = release_of(client, keys, bound=10)
    release.park(None, ["t0", "t1", "t2"])
    assert release.release() == ["t0", "t1", "t2"]
    client.hset(keys.ledger("t0"), "published", "1")  # ended, its top-up lost
    client.delete(keys.ledger("t1"))  # gone
    assert release.tidy(look_after=3600, drop_after=7200) == 0  # none old enough to look at
    time.sleep(0.01)  # scores are Redis's TIME: let it move past them
    assert release.tidy(look_after=0, drop_after=7200) == 2
    assert client.zrange(keys.bulk_in_flight, 0, -1) == [b"t2"]
    assert release.tidy(look_after=0, drop_after=0) == 1  # past the hard bound: freed anyway


def test_submit_many_parks_by_shop_and_sends_what_the_bound_allows(
        client: redis.Redis, keys: Keys) -> None:
    # Given a producer with flow control (bound 4) and one with none
    sent: list[list[str]] = []
    live: list[str] = []
    gate = BulkGate(release_of(client, keys, bound=4), lambda refs: sent.append(list(refs)))
    producer = Producer(Ledger(client, keys, 3600), live.append, max_quantity=50, bulk=gate)
    # When a file of two shops is submitted (bulk, by default), and one checkout
    intents = [intent(f"a{n}", shop="shop-a") for n in range(5)] + \
        [intent(f"b{n}", shop="shop-b") for n in range(2)]
    answers = list(producer.submit_many(intents, chunk=100))
    checkout = producer.submit(intent("live-1", shop="shop-b"))
    # Then every bulk intent is accepted, in the bulk lane; four are sent, fairly
    assert {(a.status, a.lane) for a in answers} == {(ACCEPTED, BULK)}
    assert sent == [["a0", "b0", "a1", "b1"]]
    assert waiting(client, keys).by_shop == {"shop-a": 3}
    # And the checkout went out at once, in the live lane, whatever the bulk lane holds
    assert (checkout.status, checkout.lane, live) == (ACCEPTED, LIVE, ["live-1"])


def test_an_intent_names_its_own_lane(client: redis.Redis, keys: Keys) -> None:
    sent: list[Sequence[str]] = []
    live: list[str] = []
    gate = BulkGate(release_of(client, keys, bound=4), sent.append)
    producer = Producer(Ledger(client, keys, 3600), live.append, max_quantity=50, bulk=gate)
    assert producer.submit(intent("x1", lane="bulk")).lane == BULK
    answers = list(producer.submit_many([intent("x2", lane="live"), intent("x3")]))
    assert [a.lane for a in answers] == [LIVE, BULK]
    assert live == ["x2"] and [list(s) for s in sent] == [["x1"], ["x3"]]


def intent(reference: str, **extra: str) -> dict[str, object]:
    return {"reference": reference, "buyer": {"email": "a@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}], **extra}
