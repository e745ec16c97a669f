"""Unsettled intents settle by themselves: their orders are read again on a schedule.

Onebox may refuse to show an order for a while (a read refused, a token
without the orders scope for an hour, an outage): the intent then ends
``unsettled`` rather than guessing. Celery beat runs ``settle_due`` every
``FULFILMENT_SWEEP_INTERVAL``: each intent whose next read is due
(``fulfilment.unsettled``) is settled with ``flow.settle``, exactly as an
operator's ``fulfilment settle`` does, so the final outcome goes out with the
same ``result_id`` as soon as Onebox can tell, with nobody on call and no
webhook needed. One run at a time (a Redis lock), a bounded number of
intents and a bounded time per run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis

from fulfilment.errors import FulfilmentError
from fulfilment.ledger import UnknownIntentError
from fulfilment.logcontext import bound
from fulfilment.onebox.client import OneboxClient
from fulfilment.unsettled import UnsettledIndex, answer_of, describe_age
from schemas.onebox import Order
from schemas.result import UNSETTLED, OrderResult

if TYPE_CHECKING:
    from fulfilment.flow import Services

log = logging.getLogger(__name__)

#: Unsettled intents read per run of ``settle_due`` at most; the rest wait for the next.
DUE_PER_RUN = 50
#: What the reads of a check are called in its last answer.
_READS = {"get_order": "read", "release_seats": "fence", "set_buyer": "fence (list)"}


@dataclass(frozen=True)
class Checked:
    """One unsettled intent read again: the outcome that stands, and what Onebox said."""

    reference: str
    #: None: no outcome yet (its run is still going), or its ledger entry is gone.
    outcome: OrderResult | None
    answer: str
    #: When it is read next; None when settled, gone, or off the schedule.
    next_check: float | None = None
    gone: bool = False

    @property
    def settled(self) -> bool:
        return self.outcome is not None and self.outcome.status != UNSETTLED


def index_for(services: Services) -> UnsettledIndex:
    return UnsettledIndex(services.ledger.redis, services.ledger.keys)


def check(services: Services, reference: str, index: UnsettledIndex | None = None) -> Checked:
    """Settle one unsettled intent now if Onebox can tell (``flow.settle``); keep the index.

    Raises ``FulfilmentError`` when a worker holds the intent (it is read again
    on the next run, not counted as a read).
    """
    from fulfilment import flow

    index = index or index_for(services)
    settings = services.settings
    watched = _Watched(services.client)
    reading = dataclasses.replace(services, client=cast(OneboxClient, watched))
    with bound(reference=reference, step="settle"):
        try:
            outcome = flow.settle(reading, reference)
        except UnknownIntentError:
            index.forget(reference)
            log.warning("unsettled intent's ledger entry is gone (past its retention)")
            return Checked(reference, None, "the ledger entry is gone", gone=True)
        except FulfilmentError:
            index.later(reference, services.clock() + settings.settle_first)
            raise
        answer = watched.answer()
        if outcome is not None and outcome.status != UNSETTLED:
            index.forget(reference)
            return Checked(reference, outcome, answer)
        found = index.get(reference)
        if found is None:  # settled meanwhile by another, or never indexed
            if outcome is not None:  # unsettled but not indexed (before this version)
                index.mark(reference, now=services.clock(), first=settings.settle_first,
                           answer=answer, order_code=outcome.order_code, batch=outcome.batch)
            return Checked(reference, outcome, answer)
        if outcome is None:
            answer = "no outcome yet: its purchase is still running"
        elif outcome.order_code is None:
            answer = "no order code to read the order by: ask Onebox support"
        next_check = index.checked(
            found, now=services.clock(), first=settings.settle_first,
            # Without a code no read can ever tell: off the schedule at once.
            settle_for=0.0 if outcome is not None and outcome.order_code is None
            else settings.settle_for, answer=answer)
        if next_check is None:
            log.error("still unsettled after %s and %d reads (%s): off the schedule; settle "
                      "it with Onebox support, then 'fulfilment settle %s'",
                      describe_age(services.clock() - found.since), found.checks + 1, answer,
                      reference)
        else:
            log.info("still unsettled (%s); read again in %s", answer,
                     describe_age(next_check - services.clock()))
        return Checked(reference, outcome, answer, next_check)


def settle_due(services: Services, *, limit: int = DUE_PER_RUN) -> list[Checked]:
    """Read again every unsettled intent whose time has come (what celery beat runs)."""
    settings = services.settings
    client = services.ledger.redis
    lock = client.lock(services.ledger.keys.unsettled_lock,
                       timeout=settings.task_time_limit + 30.0, blocking_timeout=0)
    if not lock.acquire(blocking=False):
        log.info("another settlement run is going")
        return []
    try:
        return _settle_due(services, limit)
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            log.warning("the settlement run's lock expired while it ran")


def _settle_due(services: Services, limit: int) -> list[Checked]:
    settings = services.settings
    index = index_for(services)
    # Each check may make three calls (read, fence, read again): the last one
    # started must end before the task's soft time limit.
    calls = 3 * (settings.onebox_connect_timeout + settings.onebox_read_timeout)
    stop_at = time.monotonic() + max(settings.task_soft_time_limit - calls - 1.0, 1.0)
    done: list[Checked] = []
    for reference in index.due(services.clock(), limit):
        if time.monotonic() > stop_at:
            break
        try:
            done.append(check(services, reference, index))
        except FulfilmentError as exc:
            with bound(reference=reference):
                log.info("not read now (%s): on the next run", exc.code)
    settled = sum(item.settled for item in done)
    if settled:
        log.warning("%d unsettled intents settled by themselves", settled)
    return done


class _Watched:
    """The Onebox client, noting what each read of a check answered (its last answer).

    Codes and statuses only: a message Onebox wrote may echo a buyer's data.
    """

    def __init__(self, client: OneboxClient) -> None:
        self._client = client
        self._answers: list[str] = []

    def answer(self) -> str:
        return "; ".join(self._answers)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        label = _READS.get(name)
        if label is None:
            return attribute
        call: Callable[..., Order] = attribute

        def noted(*args: Any, **kwargs: Any) -> Order:
            try:
                order = call(*args, **kwargs)
            except FulfilmentError as exc:
                self._answers.append(f"{label} {answer_of(exc.code, exc.status)}")
                raise
            self._answers.append(f"{label} {order.status}")
            return order

        return noted
