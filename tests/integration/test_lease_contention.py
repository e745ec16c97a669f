"""Two workers contend for one intent on a real Redis: a stale holder buys nothing.

Each worker has its own Redis connection, ledger, leases and Onebox client (the
sandbox over loopback). The first stalls inside a seats call, past its lease,
as a frozen process or a hung thread would (its heartbeat stops renewing at
its longest hold). The second takes the intent over, abandons the basket whose
seats call it cannot know the outcome of, and buys with a new one. Then the
first wakes up, its seats call lands in the abandoned basket, and it would go
on to confirm that basket too: only the ledger's fence (a write refused once
the lease is another's) stops it from buying the same intent twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from fulfilment.config import Settings
from fulfilment.flow import Decision, Proceed, RetryIn, Services, Stage, advance
from fulfilment.harness.processes import wait_for
from fulfilment.keys import Keys
from fulfilment.lease import Leases
from fulfilment.ledger import Admission, Ledger
from fulfilment.onebox import OneboxClient, build_client
from fulfilment.retry import RetryPolicy
from fulfilment.sandbox import RunningSandbox
from schemas.intent import AutoItem, load_intent

pytestmark = pytest.mark.integration

REFERENCE = "contended-1"


class Stalling:
    """An Onebox client that stalls in its first seats call once the request went out.

    (A stall before it leaves marks nothing pending: the next holder carries
    on in the same basket, and the stale holder's late call meets a confirmed
    order.) Here the seats are in the first basket and the worker froze before
    recording them: the next holder must start a new basket.
    """

    def __init__(self, inner: OneboxClient) -> None:
        self.inner = inner
        self.stalled = threading.Event()
        self.resume = threading.Event()

    def add_seats_auto(self, order_id: str, item: AutoItem) -> Any:
        answer = self.inner.add_seats_auto(order_id, item)
        if not self.stalled.is_set():
            self.stalled.set()
            self.resume.wait(timeout=120)
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Worker:
    """One worker's collaborators, on a Redis connection of its own."""

    def __init__(self, settings: Settings, *, lease_ttl: float, max_hold: float,
                 stall: bool = False) -> None:
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.onebox = build_client(settings, self.redis)
        self.stalling = Stalling(self.onebox) if stall else None
        keys = Keys(settings.key_prefix)
        self.services = Services(
            settings=settings, client=self.stalling or self.onebox,  # type: ignore[arg-type]
            ledger=Ledger(self.redis, keys, 3600),
            publisher=None,  # type: ignore[arg-type]  # brought to FINISHED: nothing published
            leases=Leases(self.redis, keys, lease_ttl, max_hold=max_hold),
            policy=RetryPolicy(max_attempts=5, base=0.05, cap=0.5, deadline=120, jitter=False))

    def advance(self) -> Decision:
        return advance(self.services, REFERENCE, Stage.FINISHED)

    def close(self) -> None:
        self.onebox.close()
        self.redis.close()


@pytest.fixture
def workers(settings: Settings) -> Iterator[tuple[Worker, Worker]]:
    # The first's heartbeat stops at 0.5 s: it lets go as a frozen worker would
    first = Worker(settings, lease_ttl=0.5, max_hold=0.5, stall=True)
    second = Worker(settings, lease_ttl=5.0, max_hold=60.0)
    yield first, second
    assert first.stalling is not None
    first.stalling.resume.set()
    first.close()
    second.close()


def test_a_stale_holder_cannot_buy_the_intent_a_second_time(
        workers: tuple[Worker, Worker], sandbox: RunningSandbox) -> None:
    first, second = workers
    assert first.stalling is not None
    intent = load_intent({"reference": REFERENCE, "buyer": {"email": "ana@example.com"},
                          "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]})
    assert first.services.ledger.admit(intent) is Admission.NEW
    # Given the first worker stalled inside its seats call, holding the intent
    decisions: list[Decision] = []
    stale = threading.Thread(target=lambda: decisions.append(first.advance()), daemon=True)
    stale.start()
    wait_for(first.stalling.stalled.is_set, timeout=30, what="the first worker to stall")
    # When its lease lapses and the second worker takes over and buys
    def bought() -> bool:
        second.advance()
        entry = second.services.ledger.get(REFERENCE)
        return entry is not None and entry.outcome is not None
    wait_for(bought, timeout=60, what="the second worker to finish the purchase")
    entry = second.services.ledger.get(REFERENCE)
    assert entry is not None and entry.outcome is not None
    assert entry.outcome.status == "confirmed" and entry.baskets == 2
    # and the first wakes up, the answer of its seats call in hand
    first.stalling.resume.set()
    stale.join(timeout=60)
    assert not stale.is_alive()
    # Then Onebox confirmed one order for the intent: the second worker's
    audit = sandbox.admin.audit()
    assert audit["confirmed"].get(REFERENCE) == [entry.outcome.order_code]
    # And the first's next write was refused: it handed the intent over
    [decision] = decisions
    assert decision == RetryIn(first.services.leases.ttl, "LEASE_LOST")
    again = second.services.ledger.get(REFERENCE)
    assert again is not None and again.order_id == entry.order_id and again.items_done == 1
    assert again.item_ids == entry.item_ids
    # (and the intent stays finished: nothing more to do for either)
    assert isinstance(second.advance(), Proceed)
