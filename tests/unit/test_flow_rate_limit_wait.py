"""A call's wait for the shared rate limit, seen from the purchase flow.

The wait comes before the call is sent: the "pending" mark of a call that cannot
be repeated is written after it, and the wait is part of the run's time. Onebox
is the flow tests' fake, reached through the real guard (its Lua on fakeredis, a
clock moved by hand, sleeps that move it or are interrupted).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fakeredis
import pytest
import requests
from kombu import Connection

from fulfilment.config import Settings
from fulfilment.flow import Proceed, RetryIn, Services, Stage, advance
from fulfilment.keys import Keys
from fulfilment.onebox.guard import US, GuardConfig, OneboxGuard, guarded
from schemas.intent import load_intent
from schemas.onebox import Order
from tests.unit.test_flow import NOW, FakeOnebox, flow_services


class SoftTimeLimitExceeded(Exception):
    """What Celery raises in a task's thread at its soft time limit (only tasks/ import Celery)."""


@dataclass
class GuardedOnebox(FakeOnebox):
    """The fake Onebox, each call made through ``guarded`` as the real client makes it."""

    guard: OneboxGuard | None = None
    sent: list[str] = field(default_factory=list)

    def _step(self, step: str, action: Callable[[], Order]) -> Order:
        answer: list[Order] = []

        def send() -> requests.Response:
            self.sent.append(step)
            answer.append(FakeOnebox._act(self, step, action))
            response = requests.Response()
            response.status_code = 200
            return response

        guarded(self.guard, step, send)
        return answer[0]


@dataclass
class World:
    services: Services
    onebox: GuardedOnebox
    guard: OneboxGuard
    redis: fakeredis.FakeRedis
    clock: list[float]
    #: What the guard's next sleep does instead of moving the clock.
    interrupt: list[BaseException] = field(default_factory=list)

    def sleep(self, seconds: float) -> None:
        if self.interrupt:
            raise self.interrupt.pop(0)
        self.clock[0] += seconds

    def queue_ahead(self, seconds: float) -> None:
        """Other workers hold the rate limit's next ``seconds`` of slots."""
        self.redis.set(self.guard.rate_key, str(int((self.clock[0] + seconds) * US)))

    def submit(self) -> str:
        document = {"reference": "ref-1", "buyer": {"email": "a@example.com"},
                    "items": [{"seats": [{"id": 1, "session_id": 10}]}]}
        self.services.ledger.admit(load_intent(document))
        return "ref-1"


@pytest.fixture
def world() -> Iterator[World]:
    prefix = f"unit-{uuid.uuid4().hex[:8]}"
    settings = Settings.defaults().with_overrides(key_prefix=prefix)
    client = fakeredis.FakeRedis()
    keys = Keys(prefix)
    clock = [NOW]
    onebox = GuardedOnebox()
    with Connection("memory://localhost/", transport_options={"polling_interval": 0.01}) as conn:
        services = flow_services(settings, client, onebox, conn, clock)
        guard = OneboxGuard(client, keys, "acct",
                            GuardConfig(rate_limit=100, max_wait=10.0, breaker_failures=0),
                            clock=lambda: clock[0])
        built = World(services, onebox, guard, client, clock)
        guard._sleep = built.sleep
        onebox.guard = guard
        yield built


def test_a_soft_time_limit_while_waiting_for_the_rate_limit_abandons_nothing(
        world: World) -> None:
    # Given a basket opened, and its seats call waiting for its turn
    reference = world.submit()
    real_create = world.onebox.create_order

    def create_then_queue() -> Order:
        order = real_create()
        world.queue_ahead(5.0)
        world.interrupt.append(SoftTimeLimitExceeded())  # the soft limit strikes in the wait
        return order

    world.onebox.create_order = create_then_queue  # type: ignore[method-assign]
    # When the soft time limit strikes during that wait
    with pytest.raises(SoftTimeLimitExceeded):
        advance(world.services, reference, Stage.BASKET)
    # Then nothing was sent and nothing is marked as sent
    assert world.onebox.sent == ["create"]
    entry = world.services.ledger.get(reference)
    assert entry is not None and entry.pending is None and entry.order_id is not None
    # And the next run carries on with the same basket: nothing abandoned
    world.onebox.create_order = real_create  # type: ignore[method-assign]
    assert isinstance(advance(world.services, reference, Stage.PUBLISHED), Proceed)
    assert world.onebox.sent.count("create") == 1
    assert world.onebox.sent.count("seats") == 1
    assert world.onebox.confirms == {reference: 1}


def test_the_wait_counts_in_the_runs_time_and_a_run_out_of_time_sends_nothing(
        world: World) -> None:
    # Given a run that has spent nearly all its time (a slow Onebox) when its seats
    # call must wait 5 s for its turn
    reference = world.submit()
    real_create = world.onebox.create_order

    def slow_create() -> Order:
        order = real_create()
        world.clock[0] += 99.0  # the budget is 120 - 18.05 - 1 = 100.95 s
        world.queue_ahead(5.0)
        return order

    world.onebox.create_order = slow_create  # type: ignore[method-assign]
    # When the wait is over, the run's time is too: it hands over before sending
    decision = advance(world.services, reference, Stage.BASKET)
    assert decision == RetryIn(0.0, "HANDED_OVER")
    assert world.onebox.sent == ["create"]
    entry = world.services.ledger.get(reference)
    assert entry is not None and entry.pending is None and entry.items_done == 0
    # Then the next run carries on with the same basket
    world.onebox.create_order = real_create  # type: ignore[method-assign]
    assert isinstance(advance(world.services, reference, Stage.PUBLISHED), Proceed)
    assert world.onebox.sent.count("create") == 1
    assert world.onebox.confirms == {reference: 1}


def test_a_confirm_waiting_for_the_rate_limit_is_not_marked_sent(world: World) -> None:
    # Given a purchase pre-confirmed, and its confirm call waiting for its turn
    reference = world.submit()
    assert isinstance(advance(world.services, reference, Stage.PRE_CONFIRMED), Proceed)
    world.queue_ahead(5.0)
    world.interrupt.append(SoftTimeLimitExceeded())  # the soft limit strikes in the wait
    # When the soft time limit strikes during that wait
    with pytest.raises(SoftTimeLimitExceeded):
        advance(world.services, reference, Stage.PUBLISHED)
    # Then no confirm went out, and none is marked as maybe sent
    assert "confirm" not in world.onebox.sent
    entry = world.services.ledger.get(reference)
    assert entry is not None and not entry.confirm_sent
    # And the next run confirms without first reading the order back
    assert isinstance(advance(world.services, reference, Stage.PUBLISHED), Proceed)
    assert world.onebox.confirms == {reference: 1}
    assert "get_order" not in world.onebox.sent
