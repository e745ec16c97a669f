"""Unsettled intents read again on a schedule: the index's backoff, and settling by itself.

fakeredis (and the real Redis, through ``world``) and the flow's stand-in Onebox
on a clock moved by hand: no waiting, no worker. The end-to-end version, with
a worker, beat and the sandbox over HTTP, is tests/integration/test_settlement.py.
"""

from __future__ import annotations

import fakeredis
import pytest

from fulfilment.config import Settings
from fulfilment.errors import OutcomeUnknownError
from fulfilment.health import UNSETTLED_DEGRADED_AFTER, _check_unsettled
from fulfilment.keys import Keys
from fulfilment.settlement import check, index_for, settle_due
from fulfilment.topology import routing_key_for
from fulfilment.unsettled import SETTLE_CAP, UnsettledIndex, next_delay
from tests.unit.test_flow import World, refuse_order_reads, world
from tests.unit.test_metrics import collector, scraped

__all__ = ["world"]  # the fixture, shared with the flow's tests

T0 = 1_800_000_000.0
FIRST = 60.0
FOR = 259_200.0


@pytest.fixture
def index() -> UnsettledIndex:
    return UnsettledIndex(fakeredis.FakeRedis(), Keys("unit"))


def test_the_reads_back_off_from_a_minute_to_an_hour_then_the_intent_leaves_the_schedule(
        index: UnsettledIndex) -> None:
    # Given an intent that became unsettled at T0
    assert index.mark("r-1", now=T0, first=FIRST, answer="CONFIRM_UNREADABLE (HTTP 403)",
                      order_code="CODE1", batch="b-1")
    # Then its first read is due a minute later, not before
    assert index.due(T0 + FIRST - 0.01, 10) == []
    assert index.due(T0 + FIRST, 10) == ["r-1"]
    # When every read leaves it unsettled, read on time
    now, delays = T0 + FIRST, []
    while True:
        found = index.get("r-1")
        assert found is not None
        next_check = index.checked(found, now=now, first=FIRST, settle_for=FOR,
                                   answer="read FORBIDDEN_RESOURCE (HTTP 403)")
        if next_check is None:
            break
        delays.append(next_check - now)
        assert index.due(next_check - 0.01, 10) == []
        now = next_check
    # Then the wait doubled up to an hour, the last read came at FULFILMENT_SETTLE_FOR,
    # and it left the schedule: never due again, still listed, counted as off it
    assert delays[:6] == [120, 240, 480, 960, 1920, SETTLE_CAP]
    assert set(delays[5:-1]) == {SETTLE_CAP} and delays[-1] <= SETTLE_CAP
    assert now == T0 + FOR
    assert index.due(T0 + 100 * FOR, 10) == []
    [listed] = index.all()
    assert (listed.next_check, listed.checks, listed.order_code, listed.batch) == \
        (None, len(delays) + 1, "CODE1", "b-1")
    assert listed.last_answer == "read FORBIDDEN_RESOURCE (HTTP 403)"
    waiting = index.waiting()
    assert (waiting.count, waiting.oldest_since, waiting.off_schedule) == (1, T0, 1)


def test_marking_again_keeps_when_it_became_unsettled_and_its_schedule(
        index: UnsettledIndex) -> None:
    index.mark("r-1", now=T0, first=FIRST, answer="A", order_code="C", batch=None)
    assert not index.mark("r-1", now=T0 + 500, first=FIRST, answer="B", order_code="C",
                          batch=None)
    found = index.get("r-1")
    assert found is not None and (found.since, found.next_check, found.last_answer) == \
        (T0, T0 + FIRST, "A")
    assert index.due(T0 + FIRST, 10) == ["r-1"]


def test_a_first_read_longer_than_the_cap_is_not_shortened() -> None:
    assert next_delay(0, 7200.0) == 7200.0
    assert next_delay(40, 60.0) == SETTLE_CAP


def test_an_unsettled_result_has_a_route_of_its_own() -> None:
    assert [routing_key_for(s) for s in ("confirmed", "failed", "unsettled")] == \
        ["result.confirmed", "result.failed", "result.unsettled"]


def unsettled_by_refused_reads(world: World) -> str:
    """A confirm that landed but whose answer was lost; reads refused (403) until the
    purchase ends unsettled."""
    reference = world.submit()
    world.onebox.done_then_raise["confirm"] = [OutcomeUnknownError("lost", step="confirm")]
    world.run(reference)
    refuse_order_reads(world, times=200)
    for _ in range(12):
        if world.services.ledger.get(reference).outcome is not None:  # type: ignore[union-attr]
            break
        world.run(reference)
    return reference


def test_an_unsettled_intent_settles_by_itself_once_onebox_answers(world: World) -> None:
    # Given an intent that ended unsettled because Onebox refused every read
    reference = unsettled_by_refused_reads(world)
    [unsettled] = world.results()
    assert unsettled.status == "unsettled"
    index = index_for(world.services)
    [found] = index.all()
    became = found.since
    assert (found.reference, found.order_code, found.checks) == \
        (reference, unsettled.order_code, 0)
    assert found.last_answer == "CONFIRM_UNREADABLE (HTTP 403)"
    # When the scheduled run comes before its first read is due: nothing is read
    reads = world.onebox.calls.count("get_order")
    assert settle_due(world.services) == []
    assert world.onebox.calls.count("get_order") == reads
    # When it is due and Onebox still refuses: read, still unsettled, read later
    world.clock[0] = became + world.services.settings.settle_first
    [checked] = settle_due(world.services)
    assert not checked.settled and checked.next_check == world.clock[0] + 120
    assert checked.answer.startswith("read FORBIDDEN_RESOURCE (HTTP 403); fence DIST0004")
    assert "a@example.com" not in checked.answer
    assert world.results() == []  # nothing new published
    # When Onebox answers reads again, and the next read is due
    world.onebox.failures["get_order"].clear()
    world.clock[0] += 120
    [checked] = settle_due(world.services)
    # Then the final outcome is published with the same result_id, and it leaves the index
    assert checked.settled and checked.answer == "read CONFIRM"
    [final] = world.results()
    assert final.status == "confirmed" and final.result_id == unsettled.result_id
    assert index.all() == [] and index.waiting().count == 0
    assert world.onebox.confirms == {reference: 1}


def test_an_indexed_intent_without_an_outcome_yet_is_read_again_later(world: World) -> None:
    # Given an intent indexed just before its worker died, its outcome never written
    reference = world.submit()
    index = index_for(world.services)
    index.mark(reference, now=world.clock[0], first=FIRST, answer="X", order_code=None,
               batch=None)
    # When it is read: no outcome yet, so read again later, counted
    checked = check(world.services, reference)
    assert checked.outcome is None and checked.next_check == world.clock[0] + 120
    found = index.get(reference)
    assert found is not None and found.checks == 1
    assert world.onebox.calls == []


def test_health_is_degraded_by_an_unsettled_intent_waiting_past_an_hour_or_off_the_schedule(
        index: UnsettledIndex) -> None:
    settings = Settings.defaults()
    keys = Keys("unit")
    assert _check_unsettled(settings, keys, index.redis, T0).status == "ok"
    index.mark("r-1", now=T0, first=FIRST, answer="A", order_code="C", batch=None)
    young = _check_unsettled(settings, keys, index.redis, T0 + 600)
    assert young.status == "ok" and young.data["unsettled"] == 1
    old = _check_unsettled(settings, keys, index.redis, T0 + UNSETTLED_DEGRADED_AFTER + 1)
    assert old.status == "degraded" and "fulfilment unsettled" in old.detail
    found = index.get("r-1")
    assert found is not None
    index.checked(found, now=T0 + 600, first=FIRST, settle_for=0.0, answer="A")
    off = _check_unsettled(settings, keys, index.redis, T0 + 700)
    assert off.status == "degraded" and off.data["off_schedule"] == 1


def test_the_metrics_count_the_unsettled_and_the_oldest_wait() -> None:
    client = fakeredis.FakeRedis()
    now = float(client.time()[0])
    assert scraped(collector(client))[("fulfilment_unsettled_intents", ())] == 0
    index = UnsettledIndex(client, Keys("unit"))
    index.mark("r-1", now=now - 300, first=FIRST, answer="A", order_code="C", batch=None)
    index.mark("r-2", now=now - 10, first=FIRST, answer="A", order_code="C", batch=None)
    got = scraped(collector(client))
    assert got[("fulfilment_unsettled_intents", ())] == 2
    assert got[("fulfilment_oldest_unsettled_intent_seconds", ())] == pytest.approx(300, abs=2)


def test_a_settled_outcome_elsewhere_drops_it_from_the_index(world: World) -> None:
    # Given an unsettled intent that an operator settles (fulfilment settle REF)
    reference = unsettled_by_refused_reads(world)
    world.onebox.failures["get_order"].clear()
    checked = check(world.services, reference)
    # Then it is settled and off the index; read again, it is left as it is
    assert checked.settled and index_for(world.services).all() == []
    again = check(world.services, reference)
    assert again.settled and again.answer == ""
    assert [r.status for r in world.results()] == ["unsettled", "confirmed"]
    assert again.outcome == checked.outcome


def test_onebox_s_purchase_webhook_settles_an_intent_whose_reads_give_no_answer(
        world: World) -> None:
    # Given an intent that ended unsettled because Onebox refused every read, and
    # Onebox's PURCHASE webhook for its order, received (signature checked) meanwhile
    reference = unsettled_by_refused_reads(world)
    [unsettled] = world.results()
    assert unsettled.order_code is not None
    keys = world.services.ledger.keys
    # When its read is due and Onebox still refuses it, without the webhook: unsettled
    world.clock[0] += world.services.settings.settle_first
    [checked] = settle_due(world.services)
    assert not checked.settled
    world.services.ledger.redis.set(keys.webhook_seen(unsettled.order_code, "PURCHASE"), "1")
    world.clock[0] += 120
    [checked] = settle_due(world.services)
    # Then with it: confirmed, the same result_id, Onebox having confirmed it once
    assert checked.settled
    [final] = world.results()
    assert (final.status, final.result_id) == ("confirmed", unsettled.result_id)
    assert world.onebox.confirms == {reference: 1}
