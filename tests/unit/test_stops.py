"""The shop's cancel and confirm answered by ``fulfilment.stops``: fakeredis, a stand-in Onebox,
no worker. Each request says what became of it, the same when asked twice; and the CLI says
it in one line, exit 1 when refused."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner
from kombu import Connection

from fulfilment.config import Settings
from fulfilment.flow import Services
from fulfilment.states import State, state_of
from fulfilment.stops import CHUNK, Answer, Stops
from schemas.intent import load_intent
from schemas.result import OrderResult, result_id_for
from tests.conftest import LedgerStore
from tests.unit.test_flow import NOW, FakeOnebox, flow_services


class Shop:
    """A ledger with intents in each state the answers depend on, and the shop's requests."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.sent_on: list[str] = []
        self.stops = Stops(services, self.sent_on.extend)

    def admit(self, reference: str, *, hold: bool = False, attempted: bool = True) -> str:
        document = {"reference": reference, "buyer": {"email": "a@example.com"},
                    "items": [{"seats": [{"id": 1, "session_id": 10}]}], "hold": hold}
        self.services.ledger.admit(load_intent(document))
        if attempted:  # a worker has had it once (every intent but a queued one)
            self.services.ledger.count_attempt(reference)
        return reference

    def with_basket(self, reference: str, **fields: object) -> str:
        self.admit(reference)
        self.services.ledger.record(reference, order_id="o-" + reference, **fields)
        return reference

    def cancel(self, reference: str) -> Answer:
        [answer] = self.stops.cancel([reference])
        return answer

    def state(self, reference: str) -> State:
        entry = self.services.ledger.get(reference)
        assert entry is not None
        return state_of(entry)


@pytest.fixture
def shop(ledger_store: LedgerStore) -> Iterator[Shop]:
    settings = Settings.defaults().with_overrides(key_prefix=ledger_store.prefix)
    with Connection("memory://localhost/") as connection:
        yield Shop(flow_services(settings, ledger_store.client, FakeOnebox(), connection,
                                 [NOW]))


# --- cancel ----------------------------------------------------------------------------------
def test_cancelling_twice_gives_the_same_answer(shop: Shop) -> None:
    open_basket = shop.with_basket("basket-1")
    waiting = shop.admit("waiting-1")
    first = [shop.cancel(open_basket), shop.cancel(waiting)]
    again = [shop.cancel(open_basket), shop.cancel(waiting)]
    # A basket is released by the worker: sent on, once; one waiting is cancelled at once
    assert [(a.ok, a.message) for a in first] == [(a.ok, a.message) for a in again]
    assert [a.verdict for a in first] == ["stopping", "finished"]
    assert [a.verdict for a in again] == ["stopping", "done:cancelled"]
    assert first[0].message == "cancelled: the worker releases its seats and publishes " \
                               "the outcome"
    assert first[1].message == "cancelled" and all(a.ok for a in first)
    assert shop.sent_on == [open_basket, open_basket]
    assert shop.state(open_basket) is State.STOPPING
    assert shop.state(waiting) is State.CANCELLED


def test_cancelling_an_intent_no_worker_has_had_yet(shop: Shop) -> None:
    queued = shop.admit("queued-1", attempted=False)
    assert shop.cancel(queued).verdict == "finished"
    assert shop.state(queued) is State.CANCELLED


def test_cancelling_an_unknown_reference_is_refused_saying_so(shop: Shop) -> None:
    answer = shop.cancel("never-admitted")
    assert (answer.ok, answer.verdict) == (False, "unknown")
    assert str(answer) == "never-admitted: not cancelled: no such intent"
    assert shop.sent_on == []


def test_a_cancel_after_the_confirm_was_sent_is_too_late_and_changes_nothing(shop: Shop) -> None:
    sent = shop.with_basket("sent-1", code="C1", confirm_sent=True)
    answer = shop.cancel(sent)
    assert (answer.ok, answer.message) == (False, "not cancelled: too late, confirm was sent")
    assert shop.state(sent) is State.CONFIRM_SENT and shop.sent_on == []


# --- confirm ----------------------------------------------------------------------------------
def test_confirm_answers_what_it_cannot_confirm_and_why(shop: Shop) -> None:
    not_hold = shop.with_basket("plain-1", code="C1")
    cancelled = shop.admit("cancelled-1", hold=True)
    shop.cancel(cancelled)  # no basket: cancelled at once
    stopping = shop.admit("stopping-1", hold=True)
    shop.services.ledger.record(stopping, order_id="o-s")
    shop.cancel(stopping)  # a basket: the stop recorded, the worker releases it
    shop.sent_on.clear()
    answers = {ref: shop.stops.confirm(ref)
               for ref in (not_hold, cancelled, stopping, "nobody-1")}
    assert {ref: (a.ok, a.message) for ref, a in answers.items()} == {
        not_hold: (False, "not confirmed: this intent is not a hold (it confirms by itself)"),
        cancelled: (False, "not confirmed: it is cancelled already"),
        stopping: (False, "not confirmed: it was cancelled"),
        "nobody-1": (False, "not confirmed: no such intent"),
    }
    assert shop.state(stopping) is State.STOPPING and shop.sent_on == []


def test_a_hold_past_its_time_is_refused_and_released(shop: Shop) -> None:
    # Redis's own clock decides (fakeredis: this machine's): the hold lapsed a minute ago
    held = shop.admit("held-1", hold=True)
    now = float(shop.services.ledger.redis.time()[0])
    shop.services.ledger.record(held, order_id="o-1", code="C1")
    assert shop.services.ledger.hold(held, now - 60, None) == 1
    answer = shop.stops.confirm(held)
    assert (answer.ok, answer.verdict) == (False, "lapsed")
    assert answer.message == "not confirmed: the hold lapsed; its seats are being released"
    assert shop.state(held) is State.STOPPING and shop.sent_on == [held]
    again = shop.stops.confirm(held)
    assert (again.ok, again.message) == (False, "not confirmed: the hold lapsed")


def test_a_held_order_confirmed_goes_on_and_a_second_confirm_says_so(shop: Shop) -> None:
    held = shop.admit("held-2", hold=True)
    shop.services.ledger.record(held, order_id="o-2", code="C2")
    now = float(shop.services.ledger.redis.time()[0])
    shop.services.ledger.hold(held, now + 600, None)
    assert shop.state(held) is State.HELD
    first, again = shop.stops.confirm(held), shop.stops.confirm(held)
    assert (first.ok, first.message) == (True, "confirming: the hold's confirm is being sent")
    assert (again.ok, again.message) == (True, "already confirming")
    assert shop.state(held) is State.PRE_CONFIRMED and shop.sent_on == [held]
    # And a cancel now is still in time: no confirm was sent yet
    assert shop.cancel(held).ok


def test_an_outcome_answers_confirm_and_cancel_with_what_stands(shop: Shop) -> None:
    bought = shop.with_basket("bought-1", code="C3")
    shop.services.ledger.finish(bought, OrderResult(
        result_id=result_id_for(bought), reference=bought, status="confirmed",
        order_code="C3", order_id="o-bought-1", attempts=1,
        finished_at=datetime.fromtimestamp(NOW, UTC)))
    confirm, cancel = shop.stops.confirm(bought), shop.cancel(bought)
    assert (confirm.ok, confirm.message) == (True, "already confirmed")
    assert (cancel.ok, cancel.message) == (
        False, "not cancelled: too late, confirm was sent (it is confirmed)")
    assert shop.state(bought) is State.CONFIRMED and shop.sent_on == []


# --- the command line ---------------------------------------------------------------------------
def test_the_cancel_command_says_unknown_in_one_line_and_exits_1(shop: Shop) -> None:
    import tasks.commands  # noqa: F401 - adds the commands to the CLI
    from fulfilment.cli import cli
    from tasks import runtime

    waiting = shop.admit("cli-waiting")
    runtime.install(shop.services)
    try:
        unknown = CliRunner().invoke(cli, ["cancel", "unknown-ref"])
        both = CliRunner().invoke(cli, ["cancel", waiting, "unknown-ref"])
        done = CliRunner().invoke(cli, ["cancel", waiting])
    finally:
        runtime.reset()
    assert unknown.exit_code == 1, unknown.output
    assert unknown.output.splitlines() == ["unknown-ref: not cancelled: no such intent"]
    assert unknown.stderr.strip() == "unknown-ref: not cancelled: no such intent"
    assert both.exit_code == 1
    assert both.stdout.splitlines() == [f"{waiting}: cancelled"]
    assert done.exit_code == 0 and done.stdout.splitlines() == [f"{waiting}: cancelled"]


class _Recording:
    """A publisher that keeps what it published, on any connection (as callbacks would)."""

    def __init__(self) -> None:
        self.published: list[str] = []

    def on(self, connection: object) -> _Recording:
        return self

    def publish(self, result: OrderResult) -> None:
        self.published.append(result.reference)


def test_a_big_cancel_publishes_every_outcome_through_the_deployment_s_publisher(
        shop: Shop, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given more waiting intents than one chunk (published by several threads)
    waiting = [shop.admit(f"q-{n}", attempted=False) for n in range(CHUNK + 3)]
    recording = _Recording()
    services = dataclasses.replace(shop.services, publisher=recording)  # type: ignore[arg-type]
    monkeypatch.setattr("fulfilment.stops.broker_connection",
                        lambda settings: Connection("memory://localhost/"))
    # When they are cancelled
    answers = list(Stops(services, shop.sent_on.extend).cancel(waiting))
    # Then each outcome went out through the deployment's publisher (its callbacks too)
    assert all(a.verdict == "finished" for a in answers)
    assert sorted(recording.published) == sorted(waiting)


def test_the_shop_s_confirm_starts_the_retry_deadline_again(ledger_store: LedgerStore) -> None:
    # Given a hold held for longer than the retry deadline since its admission
    now = [NOW]
    settings = Settings.defaults().with_overrides(key_prefix=ledger_store.prefix)
    with Connection("memory://localhost/") as connection:
        shop = Shop(flow_services(settings, ledger_store.client, FakeOnebox(), connection, now))
        held = shop.admit("held-late", hold=True)
        shop.services.ledger.record(held, order_id="o-1", code="H1", held_until=NOW + 10_000.0)
        deadline = shop.services.policy.deadline
        now[0] += deadline + 60
        before = shop.services.ledger.get(held)
        assert before is not None and shop.services.ledger.age(before) > deadline
        # When the shop confirms it
        assert shop.stops.confirm(held).ok
        now[0] += 5
        # Then its deadline runs from the confirm, not from its admission
        entry = shop.services.ledger.get(held)
        assert entry is not None and shop.services.ledger.age(entry) == pytest.approx(5.0)
