"""The purchase table walked pair by pair: real Redis, the sandbox over HTTP, the flow in process.

For every state of ``fulfilment.states.TABLE`` a fresh intent is brought there
against the sandbox, and for every event the table says can happen in it, the
event is made to happen (a sandbox fault or switch, the clock, the shop's
cancel or confirm) and the flow run once, the way one task of a worker runs it.

What is checked, strictly:

- **The step.** The state the intent stands in after that run (for the shop's and
  time's events: after the request, before any run) is the table's ``then``.
  One exception, said so: a run may go on past ``then`` in the same run, where
  the next row of the table, for the same event, takes it on. Then ``then``
  must show in the ledger as the run writes (``state_of`` after every write),
  and the state reached must follow from ``then`` by that event (or answered
  calls). ``PASSED_THROUGH`` lists the pairs where that happens; any other pair
  passing through, or not passing through, fails.
- **No exceptions.** Every pair ends where the table says; where the walk found
  the flow differing (a cancelled intent that had never run; a stop whose
  release Onebox refused for good), the flow was fixed, not the test.
- **The end.** The purchase is then run to its outcome (faults cleared, the
  clock moved on by each retry's delay, as a worker's countdown would): one
  outcome in the ledger and on the results queue (a ``held`` result only as the
  interim one, same ``result_id``); Onebox confirmed nothing twice and the order
  of a ``confirmed`` outcome once; and the intent's seats are sold if, and only
  if, Onebox confirmed it, else free: no seat left held.

The sandbox cannot refuse a ``create`` or a ``confirm`` for good (its faults are
429, 5xx, 401, 403 and lost answers); those two refusals are Onebox's answer
played at the client boundary (``Onebox.refuse``), nothing sent. Every other
event is the sandbox's own.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from kombu import Connection

from fulfilment.config import Settings
from fulfilment.errors import PermanentError
from fulfilment.flow import Decision, Held, Proceed, RetryIn, Services, Stage, advance, settle
from fulfilment.keys import Keys
from fulfilment.lease import Leases
from fulfilment.ledger import Entry, Ledger
from fulfilment.onebox.client import build_client
from fulfilment.results import ResultPublisher, consume_results
from fulfilment.retry import RetryPolicy
from fulfilment.sandbox import RunningSandbox, SandboxOptions, start_in_thread
from fulfilment.states import FINAL, TABLE, Event, Move, State, state_of
from fulfilment.stops import Answer, Stops
from fulfilment.topology import Topology
from schemas.intent import SeatRef, load_intent
from schemas.result import HELD, OrderResult
from tests import services as test_services
from tests.integration.test_sandbox_switches import Clock

pytestmark = pytest.mark.integration

#: Onebox's basket lifetime in the sandbox (seconds of the clock the test moves).
TTL = 600
SESSION = 1001
#: The retry deadline of a DEADLINE event's run: well inside a basket's lifetime.
SHORT_DEADLINE = 60.0
#: Runs allowed to reach an outcome after the event (each retry's wait is skipped).
RUNS = 30
#: Time a run and its task's redelivery take, on top of the retry's countdown.
RUN_TAKES = 0.01
#: The pairs whose run goes on past the table's ``then`` at once, and why.
PASSED_THROUGH = {
    # The seats call is marked sent before it goes out (CALL_UNANSWERED); its answer
    # lost, the same run abandons the basket as CALL_UNANSWERED's LOST row says.
    (State.BASKET, Event.LOST),
}


# --- the world the table is walked in --------------------------------------------------------
class WorkerDiedError(BaseException):
    """The worker dies right after Onebox did the call: nothing of its answer recorded."""


#: Client methods by the step the flow and the sandbox name them.
STEPS = {"create_order": "create", "add_seats": "seats", "add_seats_auto": "seats_auto",
         "set_buyer": "buyer_data", "pre_confirm": "pre_confirm", "confirm": "confirm",
         "release_seats": "release", "get_order": "get_order"}


class Onebox:
    """The real client, with two things the sandbox cannot do: refuse a call for good
    (nothing sent), and a worker dying as a call's answer comes back."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.refusals: dict[str, PermanentError] = {}
        #: step -> the call of that step after which the worker dies (1 = the next one).
        self.dies_after: dict[str, int] = {}
        #: step -> what happens elsewhere while the next call of that step is answered.
        self.meanwhile: dict[str, Callable[[], object]] = {}
        #: step -> what happens elsewhere as the next call of that step is about to go out.
        self.beforehand: dict[str, Callable[[], object]] = {}

    def refuse(self, step: str) -> None:
        self.refusals[step] = PermanentError("refused for good (played at the client)",
                                             code="REFUSED_FOR_GOOD", status=400, step=step)

    def clear(self) -> None:
        self.refusals.clear()
        self.dies_after.clear()
        self.meanwhile.clear()
        self.beforehand.clear()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.real, name)
        step = STEPS.get(name)
        if step is None:
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            if step in self.refusals:
                raise self.refusals.pop(step)
            if step in self.beforehand:
                self.beforehand.pop(step)()
            answer = method(*args, **kwargs)
            if step in self.meanwhile:
                self.meanwhile.pop(step)()
            if step in self.dies_after:
                self.dies_after[step] -= 1
                if self.dies_after[step] == 0:
                    del self.dies_after[step]
                    raise WorkerDiedError(step)
            return answer
        return call


class TracingLedger(Ledger):
    """The ledger, noting the watched intent's state after every write a run makes."""

    watched: str | None = None
    trace: list[State]

    def _write(self, script: Any, reference: str, *args: Any) -> Any:
        try:
            return super()._write(script, reference, *args)
        finally:
            self._note(reference)

    def _write_counted(self, script: Any, reference: str, batch: str | None, *args: Any,
                       extra: Any = ()) -> Any:
        try:
            return super()._write_counted(script, reference, batch, *args, extra=extra)
        finally:
            self._note(reference)

    def _note(self, reference: str) -> None:
        if reference != self.watched:
            return
        entry = self.get_many([reference])[0]  # Redis itself, not the lease's copy
        if entry is not None and (not self.trace or self.trace[-1] is not state_of(entry)):
            self.trace.append(state_of(entry))


@dataclass
class World:
    services: Services
    ledger: TracingLedger
    onebox: Onebox
    sandbox: RunningSandbox
    clock: Clock
    connection: Connection
    topology: Topology
    results: dict[str, list[OrderResult]] = field(default_factory=dict)
    sent_on: list[str] = field(default_factory=list)
    #: Baskets of another buyer, holding seats an intent wants: released after each test.
    rivals: list[tuple[str, list[int]]] = field(default_factory=list)
    seats: dict[str, list[int]] = field(default_factory=dict)
    _next_seat: Iterator[int] = field(default_factory=lambda: itertools.count(101, 2))

    # -- intents ----------------------------------------------------------------------------
    def admit(self, *, hold: bool = False) -> str:
        """A fresh intent of two numbered seats (two items: a basket can be half filled)."""
        first = next(self._next_seat)
        reference = f"table-{first}"
        self.seats[reference] = [first, first + 1]
        document: dict[str, Any] = {
            "reference": reference, "buyer": {"email": "a@example.com"},
            "items": [{"seats": [{"id": seat, "session_id": SESSION}]}
                      for seat in self.seats[reference]]}
        if hold:
            document["hold"] = True
        self.services.ledger.admit(load_intent(document))
        return reference

    def entry(self, reference: str) -> Entry:
        entry = self.ledger.get_many([reference])[0]
        assert entry is not None
        return entry

    def state(self, reference: str) -> State:
        return state_of(self.entry(reference))

    def run(self, reference: str, target: Stage = Stage.PUBLISHED,
            services: Services | None = None) -> Decision:
        return advance(services or self.services, reference, target)

    def stops(self) -> Stops:
        return Stops(self.services, self.sent_on.extend)

    def cancel(self, reference: str) -> Answer:
        [answer] = self.stops().cancel([reference])
        return answer

    # -- Onebox -------------------------------------------------------------------------------
    def faults(self, **scripts: list[str]) -> None:
        self.sandbox.admin.set_faults({"endpoints": {step: {"script": script}
                                                     for step, script in scripts.items()}})

    def take_seat(self, seat: int) -> None:
        """Another buyer's basket takes the seat."""
        order = self.onebox.real.create_order()
        taken = self.onebox.real.add_seats(order.id, [SeatRef(id=seat, session_id=SESSION)])
        self.rivals.append((order.id, [item.id for item in taken.items]))

    def calm(self) -> None:
        """Onebox as by default again, the rivals' seats given back."""
        self.sandbox.admin.set_faults({})
        self.sandbox.admin.configure(orders_mgmt_read="ok", release_outside_basket="to_basket")
        self.onebox.clear()
        for order_id, items in self.rivals:
            self.onebox.real.release_seats(order_id, items)
        self.rivals.clear()

    def seat_states(self, reference: str) -> list[str]:
        seats = self.sandbox.admin.inventory(SESSION)["seats"]
        return [seats[str(seat)] for seat in self.seats[reference]]

    def bought(self, reference: str) -> list[str]:
        codes: list[str] = self.sandbox.admin.audit()["confirmed"].get(reference, [])
        return codes

    # -- results ------------------------------------------------------------------------------
    def collect(self) -> None:
        for result in consume_results(self.connection, self.topology, timeout=0.01,
                                      idle_timeout=0.05):
            self.results.setdefault(result.reference, []).append(result)

    def published(self, reference: str) -> list[OrderResult]:
        self.collect()
        return list(self.results.get(reference, []))

    # -- to the outcome -------------------------------------------------------------------------
    def drive(self, reference: str, services: Services | None = None) -> list[State]:
        """Run until the outcome is published, the clock moved on by each retry's delay as
        a worker's countdown would be; the states after each run."""
        seen = [self.state(reference)]
        for _ in range(RUNS):
            if self.entry(reference).published:
                return seen
            decision = self.run(reference, services=services)
            assert not isinstance(decision, Held), (reference, decision, seen)
            if isinstance(decision, RetryIn):
                self.clock.advance(decision.delay + RUN_TAKES)
            seen.append(self.state(reference))
        raise AssertionError(f"{reference}: no outcome after {RUNS} runs: {seen}")


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def sandbox(clock: Clock) -> Iterator[RunningSandbox]:
    with start_in_thread(SandboxOptions(seed=16, basket_ttl=TTL), clock=clock) as running:
        yield running


@pytest.fixture(scope="module")
def world(sandbox: RunningSandbox, clock: Clock, redis_url: str) -> Iterator[World]:
    prefix = test_services.unique_prefix()
    settings = Settings.defaults().with_overrides(
        onebox_api_url=sandbox.url, redis_url=redis_url, broker_url=redis_url, key_prefix=prefix,
        onebox_read_timeout=2.0, require_durable_redis=False)
    client = redis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    ledger = TracingLedger(client, keys, settings.ledger_retention, clock=clock)
    onebox = Onebox(build_client(settings, client, ledger.clock))
    topology = Topology.for_keys(keys)
    with Connection("memory://localhost/", transport_options={"polling_interval": 0.01}) as conn:
        built = Services(
            settings=settings, client=onebox,  # type: ignore[arg-type]
            ledger=ledger, publisher=ResultPublisher(conn, topology),
            leases=Leases(client, keys, 30),
            # Short backoffs, a wait for a basket's expiry allowed in one go; no deadline
            # but a DEADLINE event's own.
            policy=RetryPolicy(max_attempts=6, base=0.5, cap=TTL + 30, deadline=10 ** 6,
                               jitter=False),
            clock=clock)
        yield World(built, ledger, onebox, sandbox, clock, conn, topology)
    onebox.real.close()
    found = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if found:
        client.delete(*found)
    client.close()


# --- bringing a fresh intent to each state -------------------------------------------------------
Setup = Callable[[World], str]


def admitted(world: World, hold: bool = False) -> str:
    return world.admit(hold=hold)


def basket(world: World, hold: bool = False) -> str:
    """A basket open, its first seat in, the second's call refused for now (503)."""
    reference = world.admit(hold=hold)
    world.faults(seats=["ok", "error_503"])
    assert isinstance(world.run(reference, Stage.BASKET), RetryIn)
    world.calm()
    return reference


def call_unanswered(world: World, hold: bool = False) -> str:
    """The second seats call done by Onebox, and the worker dead before its answer."""
    reference = world.admit(hold=hold)
    world.onebox.dies_after["seats"] = 2
    with pytest.raises(WorkerDiedError):
        world.run(reference, Stage.BASKET)
    return reference


def pre_confirm_unanswered(world: World) -> str:
    """The pre-confirm done by Onebox (the order PRE_CONFIRM, with a code we never heard)."""
    reference = world.admit()
    assert isinstance(world.run(reference, Stage.BASKET), Proceed)
    world.onebox.dies_after["pre_confirm"] = 1
    with pytest.raises(WorkerDiedError):
        world.run(reference, Stage.PRE_CONFIRMED)
    return reference


def pre_confirmed(world: World, hold: bool = False) -> str:
    reference = world.admit(hold=hold)
    assert isinstance(world.run(reference, Stage.PRE_CONFIRMED), Proceed)
    return reference


def held(world: World) -> str:
    reference = world.admit(hold=True)
    decision = world.run(reference)
    assert isinstance(decision, Held), decision
    return reference


def _confirm_answered(world: World, fault: str) -> str:
    reference = world.admit()
    world.faults(confirm=[fault])
    assert isinstance(world.run(reference), RetryIn)
    world.calm()
    return reference


def confirm_sent(world: World) -> str:
    """Confirmed by Onebox, its answer lost."""
    return _confirm_answered(world, "lost_response")


def confirm_sent_unconfirmed(world: World) -> str:
    """A confirm answered 500: maybe done, for us; not done, in the sandbox."""
    return _confirm_answered(world, "error_500")


def stopping(world: World) -> str:
    """Cancelled while its basket is half filled: the stop recorded, no worker run yet."""
    reference = basket(world)
    assert world.cancel(reference).verdict == "stopping"
    return reference


def stopping_held(world: World) -> str:
    """A held order (PRE_CONFIRM at Onebox) cancelled: the stop recorded, not run yet."""
    reference = held(world)
    assert world.cancel(reference).verdict == "stopping"
    return reference


def hold_intent(setup: Callable[..., str]) -> Setup:
    return lambda world: setup(world, hold=True)


# --- making each event happen -----------------------------------------------------------------
def past_the_deadline(world: World) -> Services:
    """The intent's retry deadline passed (the basket still alive)."""
    world.clock.advance(SHORT_DEADLINE + 1)
    return dataclasses.replace(world.services, policy=dataclasses.replace(
        world.services.policy, deadline=SHORT_DEADLINE))


def basket_expired(world: World) -> None:
    world.clock.advance(TTL + 1)


def lapse(world: World, reference: str) -> None:
    entry = world.entry(reference)
    assert entry.held_until is not None
    world.clock.advance(entry.held_until - world.clock() + 1)
    sent = len(world.sent_on)
    lapsed = world.stops().expire_lapsed()
    if entry.stop:  # a stop recorded took it out of the holds: the lapse finds nothing
        assert (lapsed, world.sent_on[sent:]) == (0, [])
    else:
        assert lapsed >= 1 and reference in world.sent_on[sent:]


@dataclass(frozen=True)
class Case:
    """How to walk one pair: the state's setup, and what makes the event happen.

    ``arrange`` readies a call's answer before the run (returns the services to run
    with, or None); ``shop`` is the shop's or time's request itself (no run).
    """

    setup: Setup
    arrange: Callable[[World, str], Services | None] | None = None
    shop: Callable[[World, str], Any] | None = None


def faults(**scripts: list[str]) -> Callable[[World, str], None]:
    return lambda world, _: world.faults(**scripts)


def deadline_with(**scripts: list[str]) -> Callable[[World, str], Services]:
    def arrange(world: World, _: str) -> Services:
        world.faults(**scripts)
        return past_the_deadline(world)
    return arrange


def unreadable_past_the_deadline(world: World, _: str) -> Services:
    world.sandbox.admin.configure(orders_mgmt_read="403")
    return past_the_deadline(world)


def refuse(step: str) -> Callable[[World, str], None]:
    return lambda world, _: world.onebox.refuse(step)


def switch(**settings: Any) -> Callable[[World, str], None]:
    def arrange(world: World, _: str) -> None:
        world.sandbox.admin.configure(**settings)
    return arrange


def expire(world: World, _: str) -> None:
    basket_expired(world)


def cancel(answer: str) -> Callable[[World, str], None]:
    def shop(world: World, reference: str) -> None:
        assert world.cancel(reference).verdict == answer
    return shop


def confirm(answer: str) -> Callable[[World, str], None]:
    def shop(world: World, reference: str) -> None:
        assert world.stops().confirm(reference).verdict == answer
    return shop


_S, _E = State, Event
CASES: dict[tuple[State, Event], Case] = {
    # no basket: the create call
    (_S.ADMITTED, _E.DONE): Case(admitted),
    (_S.ADMITTED, _E.REFUSED): Case(admitted, faults(create=["error_503"])),
    (_S.ADMITTED, _E.REJECTED): Case(admitted, refuse("create")),
    (_S.ADMITTED, _E.LOST): Case(admitted, faults(create=["lost_response"])),
    (_S.ADMITTED, _E.DEADLINE): Case(admitted, deadline_with(create=["error_503"])),
    (_S.ADMITTED, _E.CANCEL): Case(admitted, shop=cancel("finished")),
    (_S.ADMITTED, _E.CONFIRM): Case(hold_intent(admitted), shop=confirm("accepted")),
    # a basket half filled: the second seats call, the buyer, the pre-confirm
    (_S.BASKET, _E.DONE): Case(basket),
    (_S.BASKET, _E.REFUSED): Case(basket, faults(seats=["error_503"])),
    (_S.BASKET, _E.REJECTED): Case(basket, lambda world, ref: world.take_seat(
        world.seats[ref][1])),
    (_S.BASKET, _E.LOST): Case(basket, faults(seats=["lost_response"])),
    (_S.BASKET, _E.GONE): Case(basket, expire),
    (_S.BASKET, _E.DEADLINE): Case(basket, deadline_with(seats=["error_503"])),
    (_S.BASKET, _E.CANCEL): Case(basket, shop=cancel("stopping")),
    (_S.BASKET, _E.CONFIRM): Case(hold_intent(basket), shop=confirm("accepted")),
    # a seats call of unknown outcome: the basket listed (buyer data again) and released
    (_S.CALL_UNANSWERED, _E.DONE): Case(call_unanswered),
    (_S.CALL_UNANSWERED, _E.REFUSED): Case(call_unanswered, faults(
        buyer_data=["error_503"], release=["error_503"])),
    # (the sandbox refuses a release for good only for a pre-confirmed order)
    (_S.CALL_UNANSWERED, _E.REJECTED): Case(pre_confirm_unanswered,
                                            switch(release_outside_basket="refuse")),
    (_S.CALL_UNANSWERED, _E.LOST): Case(call_unanswered, faults(
        buyer_data=["lost_response"], release=["lost_response"])),
    (_S.CALL_UNANSWERED, _E.GONE): Case(call_unanswered, expire),
    (_S.CALL_UNANSWERED, _E.DEADLINE): Case(call_unanswered, deadline_with()),
    (_S.CALL_UNANSWERED, _E.CANCEL): Case(call_unanswered, shop=cancel("stopping")),
    (_S.CALL_UNANSWERED, _E.CONFIRM): Case(hold_intent(call_unanswered),
                                           shop=confirm("accepted")),
    # pre-confirmed: the confirm call
    (_S.PRE_CONFIRMED, _E.DONE): Case(pre_confirmed),
    (_S.PRE_CONFIRMED, _E.REFUSED): Case(pre_confirmed, faults(confirm=["error_503"])),
    (_S.PRE_CONFIRMED, _E.REJECTED): Case(pre_confirmed, refuse("confirm")),
    (_S.PRE_CONFIRMED, _E.LOST): Case(pre_confirmed, faults(confirm=["lost_response"])),
    (_S.PRE_CONFIRMED, _E.GONE): Case(pre_confirmed, expire),
    (_S.PRE_CONFIRMED, _E.DEADLINE): Case(pre_confirmed, deadline_with(confirm=["error_503"])),
    (_S.PRE_CONFIRMED, _E.CANCEL): Case(pre_confirmed, shop=cancel("stopping")),
    (_S.PRE_CONFIRMED, _E.CONFIRM): Case(hold_intent(pre_confirmed), shop=confirm("accepted")),
    # held for the shop
    (_S.HELD, _E.CANCEL): Case(held, shop=cancel("stopping")),
    (_S.HELD, _E.CONFIRM): Case(held, shop=confirm("accepted_held")),
    (_S.HELD, _E.LAPSE): Case(held, shop=lapse),
    # a confirm that may have landed: the order read by its code (or fenced)
    (_S.CONFIRM_SENT, _E.DONE): Case(confirm_sent),
    (_S.CONFIRM_SENT, _E.REFUSED): Case(confirm_sent, faults(get_order=["error_503"])),
    # read refused, so fenced: the release takes, the order back in BASKET (unconfirmed)
    (_S.CONFIRM_SENT, _E.REJECTED): Case(confirm_sent_unconfirmed,
                                         switch(orders_mgmt_read="403")),
    (_S.CONFIRM_SENT, _E.LOST): Case(confirm_sent, faults(get_order=["lost_response"])),
    (_S.CONFIRM_SENT, _E.GONE): Case(confirm_sent_unconfirmed, expire),
    # neither read nor fence answers (a confirmed order's seats are not released)
    (_S.CONFIRM_SENT, _E.DEADLINE): Case(confirm_sent, unreadable_past_the_deadline),
    (_S.CONFIRM_SENT, _E.CANCEL): Case(confirm_sent, shop=cancel("too_late")),
    (_S.CONFIRM_SENT, _E.CONFIRM): Case(confirm_sent, shop=confirm("too_late")),
    # a stop recorded: the release
    (_S.STOPPING, _E.DONE): Case(stopping),
    (_S.STOPPING, _E.REFUSED): Case(stopping, faults(release=["error_503"])),
    (_S.STOPPING, _E.REJECTED): Case(stopping_held, switch(release_outside_basket="refuse")),
    (_S.STOPPING, _E.LOST): Case(stopping, faults(release=["lost_response"])),
    (_S.STOPPING, _E.GONE): Case(stopping, expire),
    (_S.STOPPING, _E.CANCEL): Case(stopping, shop=cancel("stopping")),
    (_S.STOPPING, _E.CONFIRM): Case(stopping, shop=confirm("stopped:cancel")),
    (_S.STOPPING, _E.LAPSE): Case(stopping_held, shop=lapse),
}

#: Where each state's run stops: right after the calls its events are about.
RUN_TO = {_S.ADMITTED: Stage.BASKET, _S.BASKET: Stage.PRE_CONFIRMED,
          _S.CALL_UNANSWERED: Stage.BASKET}

POSSIBLE = [pair for pair, step in TABLE.items() if step.possible and not pair[0].final]


def _follows(start: State, event: Event, end: State) -> bool:
    """``end`` follows from ``start`` by moves of ``event``, or of answered calls."""
    seen, todo = {start}, [start]
    while todo:
        state = todo.pop()
        for by in (event, Event.DONE):
            after = TABLE[(state, by)].then
            if after is not None and after not in seen:
                seen.add(after)
                todo.append(after)
    return end in seen


def check_step(state: State, event: Event, step: Move, trace: list[State], end: State) -> None:
    """The state the event left the purchase in is the table's; see the module docstring."""
    then = step.then
    assert then is not None
    if (state, event) not in PASSED_THROUGH:
        assert end is then, f"{state.name} x {event.name}: table says {then.name}, " \
                             f"the flow reached {end.name} (ledger: {[s.name for s in trace]})"
        return
    assert end is not then, f"{state.name} x {event.name} no longer passes through: drop it"
    assert then in trace, f"{state.name} x {event.name}: {then.name} never written: {trace}"
    assert _follows(then, event, end), f"{end.name} does not follow from {then.name}"


#: Pairs whose seats Onebox keeps until the basket expires (it refused the release for
#: good, so the table says the outcome is written and the seats left to expire).
LEFT_TO_EXPIRE = {(State.STOPPING, Event.REJECTED)}


def check_end(world: World, reference: str, hold: bool, *,
              left_to_expire: bool = False) -> OrderResult:
    """One outcome, nothing bought twice, the seats sold if bought, else free (at once, or
    once the basket expired where Onebox refused to release them)."""
    entry = world.entry(reference)
    assert entry.outcome is not None and state_of(entry).final
    outcome = entry.outcome
    results = world.published(reference)
    finals = [r for r in results if r.status != HELD]
    assert [r.status for r in finals] == [outcome.status], results
    assert {r.result_id for r in results} == {outcome.result_id}
    assert len(results) - len(finals) <= (1 if hold else 0), results
    audit = world.sandbox.admin.audit()
    assert audit["duplicates"] == {}, audit["duplicates"]
    bought = world.bought(reference)
    if outcome.status == "confirmed":
        assert bought == [outcome.order_code]
    elif outcome.status != "unsettled":
        assert bought == [], (outcome, bought)
    if left_to_expire:
        assert world.seat_states(reference) == ["HELD"] * 2  # refused: held until it expires
        world.clock.advance(TTL + 1)
    assert world.seat_states(reference) == (["SOLD"] * 2 if bought else ["FREE"] * 2), \
        (outcome.status, bought)
    return outcome


SETUPS_BY_STATE: dict[State, Setup] = {
    _S.ADMITTED: admitted, _S.BASKET: basket, _S.CALL_UNANSWERED: call_unanswered,
    _S.PRE_CONFIRMED: pre_confirmed, _S.HELD: held, _S.CONFIRM_SENT: confirm_sent,
    _S.STOPPING: stopping}


# --- the tests ------------------------------------------------------------------------------
def test_the_table_is_total_and_every_possible_pair_is_walked() -> None:
    assert set(TABLE) == {(state, event) for state in State for event in Event}
    assert set(CASES) == set(POSSIBLE), set(POSSIBLE) ^ set(CASES)
    assert set(SETUPS_BY_STATE) == {state for state, _ in POSSIBLE}
    assert set(POSSIBLE) >= PASSED_THROUGH | LEFT_TO_EXPIRE


@pytest.mark.parametrize("state", list(SETUPS_BY_STATE), ids=lambda s: s.name)
def test_each_state_is_reached_against_the_sandbox(world: World, state: State) -> None:
    reference = SETUPS_BY_STATE[state](world)
    world.calm()
    assert world.state(reference) is state


@dataclass(frozen=True)
class Walked:
    reference: str
    #: The state after each ledger write of the event's run (the state before it first).
    trace: list[State]
    #: Where the event left it.
    end: State
    #: The services the event's run used (a DEADLINE's short deadline), None: the world's.
    services: Services | None
    hold: bool


def walk(world: World, state: State, event: Event) -> Walked:
    """A fresh intent brought to ``state``; the event made to happen (and, for a call's
    answer, the flow run once, to the stage the state's calls belong to)."""
    case = CASES[(state, event)]
    world.calm()
    reference = case.setup(world)
    world.onebox.clear()
    assert world.state(reference) is state
    hold = world.entry(reference).intent.hold
    world.ledger.watched, world.ledger.trace = reference, [state]
    services = None
    try:
        if case.shop is not None:
            case.shop(world, reference)
        else:
            if case.arrange is not None:
                services = case.arrange(world, reference)
            world.run(reference, RUN_TO.get(state, Stage.PUBLISHED), services=services)
    finally:
        trace, world.ledger.watched = world.ledger.trace, None
    return Walked(reference, trace, world.state(reference), services, hold)


@pytest.mark.parametrize(("state", "event"), POSSIBLE,
                         ids=[f"{s.name}-{e.name}" for s, e in POSSIBLE])
def test_each_pair_moves_as_the_table_says_and_ends_once(world: World, state: State,
                                                         event: Event) -> None:
    step = TABLE[(state, event)]
    # Given a fresh intent in the state, when the event happens
    walked = walk(world, state, event)
    # Then it stands where the table says
    check_step(state, event, step, walked.trace, walked.end)
    # And run on to its outcome, Onebox as by default: one outcome, nothing bought
    # twice, no seat left held
    world.calm()
    world.drive(walked.reference, services=walked.services)
    check_end(world, walked.reference, walked.hold,
              left_to_expire=(state, event) in LEFT_TO_EXPIRE)


def test_a_cancel_recorded_while_a_call_is_out_stops_the_run_at_its_next_step(
        world: World) -> None:
    # Given a basket being filled, and the shop cancelling while its seats call is out
    world.calm()
    reference = basket(world)
    world.onebox.meanwhile["seats"] = lambda: world.cancel(reference)
    before = world.sandbox.admin.audit()["requests"]
    # When the worker's run goes on
    world.ledger.watched, world.ledger.trace = reference, [State.BASKET]
    world.run(reference)
    trace, world.ledger.watched = world.ledger.trace, None
    # Then it stops at its next step: no other call than the release goes out, and it
    # is cancelled (through STOPPING) in the same run, its seats free
    after = world.sandbox.admin.audit()["requests"]
    assert {step: after[step] - before.get(step, 0) for step in after
            if after[step] != before.get(step, 0)} == {"seats": 1, "release": 1}
    # (CALL_UNANSWERED: the seats call marked out before it is sent, as every one is)
    assert trace == [State.BASKET, State.CALL_UNANSWERED, State.STOPPING, State.CANCELLED]
    check_end(world, reference, hold=False)


def test_a_cancel_recorded_as_the_confirm_is_about_to_go_out_wins(world: World) -> None:
    # Given a pre-confirmed order, and the shop cancelling after the run's last check,
    # just before the confirm is sent (its mark is written as the request goes out)
    world.calm()
    reference = pre_confirmed(world)
    order_id = world.entry(reference).order_id
    world.onebox.beforehand["confirm"] = lambda: world.cancel(reference)
    # When the worker's run goes on
    world.run(reference)
    # Then the confirm's mark is refused: nothing reaches Onebox, it is cancelled
    assert world.sandbox.admin.confirm_calls().get(order_id or "", 0) == 0
    assert world.state(reference) is State.CANCELLED
    check_end(world, reference, hold=False)


# --- outcomes: the shop's requests change nothing; the unsettled one is settled later -------------
def unsettled(world: World) -> str:
    reference = confirm_sent(world)
    world.sandbox.admin.configure(orders_mgmt_read="403")
    world.run(reference, services=past_the_deadline(world))
    return reference


def unsettled_unconfirmed(world: World) -> str:
    """Unsettled, though Onebox never confirmed it: neither read nor fence answered."""
    reference = confirm_sent_unconfirmed(world)
    world.sandbox.admin.configure(orders_mgmt_read="403", release_outside_basket="refuse")
    world.run(reference, services=past_the_deadline(world))
    return reference


def failed(world: World) -> str:
    reference = world.admit()
    world.onebox.refuse("create")
    world.run(reference)
    return reference


def cancelled(world: World) -> str:
    reference = stopping(world)
    world.drive(reference)
    return reference


def expired(world: World) -> str:
    reference = held(world)
    lapse(world, reference)
    world.drive(reference)
    return reference


def confirmed(world: World) -> str:
    reference = world.admit()
    world.run(reference)
    return reference


FINALS: dict[State, Setup] = {_S.CONFIRMED: confirmed, _S.FAILED: failed,
                              _S.UNSETTLED: unsettled, _S.CANCELLED: cancelled,
                              _S.EXPIRED: expired}


def test_every_outcome_has_a_setup() -> None:
    assert set(FINALS) == FINAL


@pytest.mark.parametrize("state", list(FINALS), ids=lambda s: s.name)
def test_an_outcome_answers_cancel_and_confirm_and_stays(world: World, state: State) -> None:
    world.calm()
    reference = FINALS[state](world)
    world.calm()
    assert world.state(reference) is state
    before, sent = world.published(reference), len(world.sent_on)
    # When the shop cancels it, and confirms it
    cancelled_answer = world.cancel(reference)
    confirmed_answer = world.stops().confirm(reference)
    # Then each says the outcome that stands, and nothing changes
    assert TABLE[(state, Event.CANCEL)].then is state
    assert TABLE[(state, Event.CONFIRM)].then is state
    assert cancelled_answer.verdict == confirmed_answer.verdict == f"done:{state.value}"
    assert cancelled_answer.ok is (state is State.CANCELLED)
    assert confirmed_answer.ok is (state is State.CONFIRMED)
    assert world.state(reference) is state
    assert world.published(reference) == before
    assert world.sent_on[sent:] == []


@pytest.mark.parametrize(("event", "setup"), [(Event.DONE, unsettled),
                                              (Event.REJECTED, unsettled_unconfirmed)],
                         ids=["DONE", "REJECTED"])
def test_an_unsettled_outcome_is_settled_as_the_table_says(world: World, event: Event,
                                                           setup: Setup) -> None:
    world.calm()
    reference = setup(world)
    world.calm()
    assert world.state(reference) is State.UNSETTLED
    # When the operator settles it, Onebox answering again
    settle(world.services, reference)
    # Then it is settled as the table says, with the same result_id, once
    assert world.state(reference) is TABLE[(State.UNSETTLED, event)].then
    results = world.published(reference)
    assert [r.status for r in results] == ["unsettled", world.state(reference).value]
    assert len({r.result_id for r in results}) == 1
    assert world.sandbox.admin.audit()["duplicates"] == {}
    bought = world.bought(reference)
    assert world.seat_states(reference) == (["SOLD"] * 2 if bought else ["FREE"] * 2)
