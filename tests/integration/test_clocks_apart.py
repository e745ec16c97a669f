"""Two workers whose clocks disagree by minutes share one real Redis: only Redis's clock counts.

Each worker's process clock is injected (``RedisClock(local=...)``), one of them
16 minutes off. What one writes and the other compares (progress stamps and
the open set's scores, which the recovery sweep reads; a basket's expiry) must
read the same on both, and ``fulfilment status`` shows the admission on Redis's
clock, not the producer's.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from kombu import Connection

from fulfilment import recovery
from fulfilment.cli import cli
from fulfilment.clock import RedisClock, redis_time
from fulfilment.config import Settings
from fulfilment.errors import OutcomeUnknownError, PermanentError
from fulfilment.flow import RetryIn, Services, Stage, advance
from fulfilment.retry import RetryPolicy
from fulfilment.wiring import build_services
from schemas.intent import load_intent
from schemas.onebox import Order
from tests.unit.test_flow import FakeOnebox

pytestmark = pytest.mark.integration

#: How far off a worker's clock is: more than the 15-minute default deadline.
SKEW = 16 * 60.0
#: The basket's time to live as Onebox reports it (Onebox's clock is Redis's here).
TTL = 120.0
#: The flow's allowance for Onebox's clock and Redis's disagreeing (``CLOCK_SKEW_MARGIN``).
MARGIN = 5.0


class Onebox(FakeOnebox):
    """The scripted Onebox, its baskets expiring ``TTL`` from now on Redis's clock."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__()
        self.redis = client

    def create_order(self) -> Order:
        order = super().create_order()
        expiring = replace(order, expires_at=datetime.fromtimestamp(
            redis_time(self.redis) + TTL, UTC))
        self.orders[order.id] = expiring
        return expiring


@dataclasses.dataclass
class Fleet:
    redis: redis.Redis
    prefix: str
    connection: Connection
    onebox: Onebox

    def worker(self, skew: float, **overrides: Any) -> Services:
        """A worker whose process clock is ``skew`` seconds off."""
        settings = Settings.defaults().with_overrides(key_prefix=self.prefix, **overrides)
        clock = RedisClock(self.redis, local=lambda: time.time() + skew)
        built = build_services(settings, self.redis, self.connection, clock=clock)
        built.client.close()
        return replace(built, client=self.onebox,  # type: ignore[arg-type]
                       policy=RetryPolicy(max_attempts=5, base=1.0, cap=3600.0,
                                          deadline=7200.0, jitter=False))


@pytest.fixture
def fleet(redis_client: redis.Redis, prefix: str) -> Iterator[Fleet]:
    with Connection("memory://localhost/", transport_options={"polling_interval": 0.01}) as conn:
        yield Fleet(redis_client, prefix, conn, Onebox(redis_client))


def admit(services: Services, reference: str, **kwargs: Any) -> str:
    services.ledger.admit(load_intent({
        "reference": reference, "buyer": {"email": "ana@example.com"},
        "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]}), **kwargs)
    return reference


# --- the recovery sweep ----------------------------------------------------------------
@pytest.mark.parametrize(("writer", "sweeper"), [(-SKEW, 0.0), (0.0, SKEW)],
                         ids=["writer-slow", "sweeper-fast"])
def test_a_healthy_intent_is_not_resumed_early(fleet: Fleet, writer: float,
                                               sweeper: float) -> None:
    # Given an intent that made progress just now, by a worker on its clock
    writing = fleet.worker(writer)
    reference = admit(writing, "healthy-1")
    writing.ledger.record(reference)
    # When the sweep runs (a minute without progress is stuck), on its own clock
    swept: list[str] = []
    resumed = recovery.sweep(fleet.worker(sweeper, stuck_after=60.0), swept.append)
    # Then nothing is resumed: it has not been still for a minute on Redis's clock
    assert resumed == swept == []


@pytest.mark.parametrize(("writer", "sweeper"), [(SKEW, 0.0), (0.0, -SKEW)],
                         ids=["writer-fast", "sweeper-slow"])
def test_a_stuck_intent_is_not_hidden(fleet: Fleet, writer: float, sweeper: float) -> None:
    # Given an intent whose last progress was recorded by a worker on its clock
    writing = fleet.worker(writer)
    reference = admit(writing, "stuck-1")
    writing.ledger.record(reference)
    sweeping = fleet.worker(sweeper, stuck_after=1.0)
    # When it stays still for longer than a second (stuck) and the sweep runs
    swept: list[str] = []
    deadline = time.monotonic() + 10.0
    while not swept and time.monotonic() < deadline:
        recovery.sweep(sweeping, swept.append)  # the condition: waited on, with a deadline
    # Then the sweep resumes it within seconds, not 16 minutes later
    assert swept == [reference]


# --- a basket's expiry --------------------------------------------------------------------
@pytest.mark.parametrize(("stamper", "judge"), [(0.0, SKEW), (0.0, -SKEW), (SKEW, 0.0)],
                         ids=["judge-fast", "judge-slow", "stamper-fast"])
def test_a_basket_expiry_stamped_by_one_worker_is_judged_right_by_another(
        fleet: Fleet, stamper: float, judge: float) -> None:
    # Given a confirm sent by one worker whose answer was lost: the basket's expiry is
    # stamped as the confirm goes out (TTL from then)
    first, second = fleet.worker(stamper), fleet.worker(judge)
    reference = admit(first, "basket-1")
    fleet.onebox.failures["confirm"] = [OutcomeUnknownError("read timed out",
                                                            code="READ_TIMEOUT", step="confirm")]
    assert isinstance(advance(first, reference, Stage.PUBLISHED), RetryIn)
    entry = first.ledger.get(reference)
    assert entry is not None and entry.confirm_sent and entry.basket_expires is not None
    # When another worker finds the order neither readable (404) nor fenceable
    fleet.onebox.failures["get_order"] = [PermanentError("no such order", status=404,
                                                         code="ORDER_NOT_FOUND",
                                                         step="get_order")]
    fleet.onebox.refuse_release = True
    decision = advance(second, reference, Stage.PUBLISHED)
    # Then it waits for the basket's expiry as Redis's clock has it: TTL (and the margin)
    # from the confirm, neither at once nor 16 minutes more
    assert isinstance(decision, RetryIn), decision
    assert decision.reason == "ORDER_NOT_FOUND", decision
    assert TTL + MARGIN - 3.0 <= decision.delay <= TTL + MARGIN + 0.5, decision
    assert fleet.onebox.confirms == {}


# --- fulfilment status --------------------------------------------------------------------
def test_status_shows_the_admission_on_redis_clock_not_the_producers(
        fleet: Fleet, redis_url: str) -> None:
    # Given an intent admitted by a producer whose clock is 16 minutes slow
    submitted = datetime.now(UTC) - timedelta(seconds=SKEW)
    reference = admit(fleet.worker(-SKEW), "status-1", submitted_at=submitted)
    admitted = redis_time(fleet.redis)
    # When an operator asks for its status
    shown = CliRunner().invoke(cli, ["status", reference], env={
        "FULFILMENT_REDIS_URL": redis_url, "FULFILMENT_KEY_PREFIX": fleet.prefix})
    assert shown.exit_code == 0, shown.output
    line = next(text for text in shown.stdout.splitlines() if "admitted" in text)
    # Then "admitted" is Redis's time at admission, a moment ago on Redis's clock
    moment = datetime.fromisoformat(line.split()[1].replace("Z", "+00:00")).timestamp()
    assert admitted - 2.0 <= moment <= admitted + 1.0, line
    assert line.endswith("(0s ago)") or line.endswith("(1s ago)"), line
