"""The purchase, as plain functions: bring an intent up to a stage, once.

``advance(services, reference, target)`` reads the ledger, does whatever is
still owed up to ``target`` and records each call's effect before going on.
Run it twice, or on a redelivered message, or from the recovery sweep, and it
resumes where the work stands: it never opens a second basket for an intent
that holds one, and never confirms twice (a confirm that may have been sent is
settled by reading the order by its code before anything else).

It never raises for a purchase that went wrong: it returns ``RetryIn`` (try
again after a delay) or ``Proceed`` (this stage is done, or the purchase has
an outcome). Failed purchases release their seats and get a ``failed``
outcome here; the task layer only schedules.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from fulfilment.config import Settings
from fulfilment.errors import (
    FulfilmentError,
    OutcomeUnknownError,
    PermanentError,
    TransientError,
)
from fulfilment.lease import Leases
from fulfilment.ledger import Entry, Ledger
from fulfilment.logcontext import bound
from fulfilment.onebox.client import OneboxClient
from fulfilment.results import ResultPublisher
from fulfilment.retry import RetryPolicy
from schemas.intent import NumberedItem
from schemas.onebox import Order
from schemas.result import CONFIRMED, FAILED, OrderResult, ResultError, result_id_for

log = logging.getLogger(__name__)

#: Onebox's answer when a basket is gone (expired or never existed).
ORDER_NOT_FOUND = "ORDER_NOT_FOUND"
SEAT_NOT_AVAILABLE = "ORDER_SEAT_NOT_AVAILABLE"
#: How long an abandoned basket is assumed to live when Onebox did not say.
DEFAULT_BASKET_TTL = 600.0
#: Allowance for Onebox's clock and ours disagreeing about an expiry.
CLOCK_SKEW_MARGIN = 5.0


class Stage(enum.IntEnum):
    """How far a purchase has come; each task brings it up to one of these."""

    BASKET = 1  # order created, every item added, buyer attached
    PRE_CONFIRMED = 2  # order code known
    FINISHED = 3  # outcome (confirmed or failed) recorded in the ledger
    PUBLISHED = 4  # outcome on the results queue


@dataclass(frozen=True)
class Proceed:
    """The stage is reached (or the purchase is finished): go on."""


@dataclass(frozen=True)
class RetryIn:
    """Not now: run this stage again after ``delay`` seconds."""

    delay: float
    reason: str


Decision = Proceed | RetryIn


class NotFoundYetError(TransientError):
    """Onebox cannot find the order yet; conclusive once its basket's expiry has passed.

    Waiting for that is not failing: it does not use up attempts.
    """


class UnknownIntentError(PermanentError):
    """A task names a reference the ledger does not hold (expired, or never admitted)."""

    default_code = "UNKNOWN_INTENT"


@dataclass(frozen=True)
class Services:
    """What the steps work with; built once per worker process."""

    settings: Settings
    client: OneboxClient
    ledger: Ledger
    publisher: ResultPublisher
    leases: Leases
    policy: RetryPolicy
    clock: Callable[[], float] = time.time


def advance(services: Services, reference: str, target: Stage, attempt: int = 1) -> Decision:
    """Do what is owed for ``reference`` up to ``target``; see the module docstring.

    ``attempt`` (the task's delivery count) is only for the logs: retry limits
    count failures without progress in the ledger, not deliveries.
    """
    entry = services.ledger.get(reference)
    if entry is None:
        raise UnknownIntentError(f"no ledger entry for reference {reference}")
    with bound(reference=reference, order_id=entry.order_id, attempt=attempt):
        if entry.published or (entry.finished and target < Stage.PUBLISHED):
            return Proceed()
        lease = services.leases.take(reference)
        if lease is None:
            return RetryIn(1.0, "another worker holds this intent")
        try:
            entry = services.ledger.get(reference) or entry  # re-read under the lease
            return _advance_leased(services, entry, target)
        finally:
            lease.release()


def _advance_leased(services: Services, entry: Entry, target: Stage) -> Decision:
    services.ledger.count_attempt(entry.reference)
    decision = _attempt(services, entry, target)
    if isinstance(decision, Proceed) and target >= Stage.PUBLISHED:
        _publish(services, entry.reference)
    return decision


def _attempt(services: Services, entry: Entry, target: Stage) -> Decision:
    """Run the stages; turn each kind of failure into what happens next."""
    try:
        _run(services, entry, target)
    except OutcomeUnknownError as exc:
        return _after_unknown(services, entry.reference, exc)
    except TransientError as exc:
        return _after_transient(services, entry.reference, exc)
    except PermanentError as exc:
        if exc.code == ORDER_NOT_FOUND:
            # The basket expired under us: nothing was bought, start a new one.
            return _restart_basket(services, entry.reference, exc)
        orphan_left = _orphan_left(services, entry.reference)
        if exc.code == SEAT_NOT_AVAILABLE and orphan_left > 0:
            # Our own abandoned basket may hold the seat until it expires: wait for it.
            log.info("seat held, maybe by our abandoned basket for %.0fs more", orphan_left)
            waiting = TransientError(exc.message, code=exc.code, status=exc.status,
                                     trace_id=exc.trace_id, step=exc.step,
                                     retry_after=orphan_left + 1.0)
            # Bounded by the deadline only: waiting is not trying again.
            return _retry_or_fail(services, entry.reference, waiting, counts=False)
        return _fail(services, entry.reference, exc)
    return Proceed()


def _run(services: Services, entry: Entry, target: Stage) -> None:
    if entry.finished:
        return
    _fill_basket(services, entry)
    if target >= Stage.PRE_CONFIRMED:
        _pre_confirm(services, entry.reference)
    if target >= Stage.FINISHED:
        _confirm(services, entry.reference)


# --- the stages ----------------------------------------------------------------
def _fill_basket(services: Services, entry: Entry) -> None:
    ledger, client, reference = services.ledger, services.client, entry.reference
    if entry.pending:
        # A seats or pre-confirm call was sent and its answer never recorded (the
        # worker died, or hit its time limit): what the basket holds is unknown.
        raise OutcomeUnknownError(f"interrupted {entry.pending} call", code="INTERRUPTED",
                                  step=entry.pending)
    order_id = entry.order_id
    if order_id is None:
        # Safe to repeat: a basket created but never recorded just expires.
        with bound(step="create"):
            order = client.create_order()
        order_id = order.id
        # A new basket is progress (new baskets are bounded on their own by
        # FULFILMENT_RETRY_MAX_ATTEMPTS): each gets the full failure budget.
        ledger.record(reference, order_id=order_id, item_ids=[], items_done=0, buyer_set=False,
                      code=None, confirm_sent=False, baskets=entry.baskets + 1, failures=0,
                      **_expiry(services, order))
        with bound(order_id=order_id):
            log.info("basket opened")
    items = entry.intent.items
    items_done = entry.items_done if entry.order_id else 0
    with bound(order_id=order_id):
        for index in range(items_done, len(items)):
            item = items[index]
            with bound(step="seats"), _sending(ledger, reference, "seats"):
                if isinstance(item, NumberedItem):
                    order = client.add_seats(order_id, item.seats)
                else:
                    order = client.add_seats_auto(order_id, item)
            ledger.record(reference, item_ids=_item_ids(order), items_done=index + 1, pending=None,
                          **_expiry(services, order), failures=0)
        if not (entry.buyer_set and entry.order_id):
            # Safe to repeat: buyer data is set, not added.
            with bound(step="buyer_data"):
                client.set_buyer(order_id, entry.intent.buyer)
            ledger.record(reference, buyer_set=True, failures=0)


def _pre_confirm(services: Services, reference: str) -> None:
    entry = _reread(services, reference)
    if entry.code is not None:
        return
    assert entry.order_id is not None
    with bound(step="pre_confirm", order_id=entry.order_id):
        with _sending(services.ledger, reference, "pre_confirm"):
            order = services.client.pre_confirm(entry.order_id, entry.intent.delivery_method)
        if not order.code:
            raise OutcomeUnknownError("pre-confirm answered without an order code",
                                      code="MALFORMED_RESPONSE", step="pre_confirm")
        services.ledger.record(reference, code=order.code, item_ids=_item_ids(order), pending=None,
                               failures=0, **_expiry(services, order))
        log.info("order pre-confirmed, code %s", order.code)


def _confirm(services: Services, reference: str) -> None:
    entry = _reread(services, reference)
    assert entry.order_id is not None and entry.code is not None
    client, ledger = services.client, services.ledger
    with bound(step="confirm", order_id=entry.order_id):
        if entry.confirm_sent:
            # A confirm may have been done: ask Onebox before sending another.
            found = _settle(services, entry)
            if found is None:
                raise PermanentError("the order expired unconfirmed", code=ORDER_NOT_FOUND,
                                     step="confirm")
            order = found
            log.info("reconciled order %s: %s", entry.code, order.status)
            if order.status == "CONFIRM":
                _finish_confirmed(services, entry, order)
                return
            if order.status not in {"PRE_CONFIRM", "BASKET"}:
                raise PermanentError(f"order in unexpected status {order.status}",
                                     code="ORDER_STATUS_UNEXPECTED", step="confirm")
            if order.status == "BASKET":
                # Back in BASKET: pre-confirm again before confirming.
                ledger.record(reference, code=None, confirm_sent=False)
                _pre_confirm(services, reference)
                entry = _reread(services, reference)
                assert entry.order_id is not None and entry.code is not None
        assert entry.order_id is not None
        # Before the call, never after. The call restarts the basket's timer, so
        # "not found" is only conclusive a full time-to-live after it.
        ttl = entry.basket_ttl or DEFAULT_BASKET_TTL
        ledger.record(reference, confirm_sent=True, basket_expires=services.clock() + ttl)
        order = client.confirm(entry.order_id, reference, entry.intent.payments)
        _finish_confirmed(services, entry, order)


def _settle(services: Services, entry: Entry) -> Order | None:
    """The order a confirm may have reached, read by its code; None if it is gone.

    A confirmed order is kept for good, so an order that cannot be found once
    its basket's expiry has passed was never confirmed. Before that, "not
    found" may only mean the orders-management API has not caught up yet.
    """
    assert entry.code is not None
    try:
        return services.client.get_order(entry.code)
    except PermanentError as exc:
        if exc.code != ORDER_NOT_FOUND:
            raise
        conclusive_at = (entry.basket_expires or services.clock()) + CLOCK_SKEW_MARGIN
        if entry.basket_expires is not None and services.clock() > conclusive_at:
            return None
        raise NotFoundYetError("order not found by its code yet", code=ORDER_NOT_FOUND,
                               step="get_order",
                               retry_after=max(conclusive_at - services.clock(), 0.0)) from exc


def _finish_confirmed(services: Services, entry: Entry, order: Order) -> None:
    result = _result(services, entry, CONFIRMED, order_code=order.code or entry.code,
                     order_id=order.id)
    stands = services.ledger.finish(entry.reference, result)
    log.info("order %s confirmed", (stands or result).order_code)


def _publish(services: Services, reference: str) -> None:
    entry = _reread(services, reference)
    if entry.published:
        return
    assert entry.outcome is not None
    with bound(step="publish"):
        services.publisher.publish(entry.outcome)
    services.ledger.mark_published(reference)


# --- when things go wrong --------------------------------------------------------
def _after_unknown(services: Services, reference: str, exc: OutcomeUnknownError) -> Decision:
    entry = _reread(services, reference)
    if entry.confirm_sent:
        # The next attempt reads the order by code first; it cannot double-confirm.
        return _retry_or_fail(services, reference, exc)
    log.warning("basket call's outcome unknown (%s): abandoning basket", exc.code)
    return _restart_basket(services, reference, exc)


def _after_transient(services: Services, reference: str, exc: TransientError) -> Decision:
    log.warning("transient failure: %s", exc)
    return _retry_or_fail(services, reference, exc,
                          counts=not isinstance(exc, NotFoundYetError))


def _restart_basket(services: Services, reference: str, exc: FulfilmentError) -> Decision:
    entry = _reread(services, reference)
    if entry.baskets >= services.policy.max_attempts:
        return _fail(services, reference, exc)
    # Only a seats call adds items we may not know of; a lost pre-confirm adds none.
    unknown_items = isinstance(exc, OutcomeUnknownError) and exc.step in {"seats", "seats_auto"}
    released_all = _release(services, entry, probe=unknown_items)
    # Every call naming the basket (our release attempt too) restarts its timer.
    ttl = entry.basket_ttl or DEFAULT_BASKET_TTL
    orphan = {} if released_all else {"orphan_expires": services.clock() + ttl + 1.0}
    services.ledger.record(reference, order_id=None, item_ids=[], items_done=0, buyer_set=False,
                           code=None, confirm_sent=False, pending=None, **orphan)
    return _retry_or_fail(services, reference, exc)


def _retry_or_fail(services: Services, reference: str, exc: FulfilmentError, *,
                   counts: bool = True) -> Decision:
    """Retry after a backoff, unless failures without progress or time ran out.

    Failures are counted in the ledger and reset by progress, so waiting for a
    lease or a redelivery does not use up an intent's attempts.
    """
    entry = _reread(services, reference)
    failures = services.ledger.count_failure(reference) if counts else 1
    delay = services.policy.delay(failures, exc.retry_after)
    elapsed = services.clock() - entry.submitted_at.timestamp()
    if services.policy.gives_up(failures if counts else 0, elapsed, delay):
        return _fail(services, reference, exc)
    services.ledger.record(reference)  # a retry is scheduled: alive, not stuck
    return RetryIn(delay, exc.code)


def _fail(services: Services, reference: str, exc: FulfilmentError) -> Decision:
    """Record a failed outcome, unless Onebox says the order was confirmed after all.

    The outcome is written before the seats are released: a worker dying in
    between leaves a failed purchase whose basket expires, never a purchase
    that resumes with seats missing. Where a confirm may have been sent, the
    order is first fenced (releasing its seats takes it back to BASKET, where a
    late confirm cannot land) and read again: "failed" only if not confirmed.
    """
    entry = _reread(services, reference)
    if entry.confirm_sent and entry.code:
        try:
            order = _fence_and_read(services, entry)
        except FulfilmentError as check:
            # We cannot tell whether it was bought: keep asking, never guess "failed".
            log.warning("cannot settle an uncertain confirm yet: %s", check)
            services.ledger.record(reference)  # alive: the sweep need not resume it
            return RetryIn(services.policy.cap, "CONFIRM_UNSETTLED")
        if order is not None and order.status == "CONFIRM":
            _finish_confirmed(services, entry, order)
            return Proceed()
    error = ResultError(code=exc.code, message=exc.message, step=exc.step,
                        retryable=exc.retryable, trace_id=exc.trace_id)
    services.ledger.finish(reference, _result(services, entry, FAILED, error=error))
    with bound(order_id=entry.order_id):
        log.warning("purchase failed: %s", exc)
    if not entry.confirm_sent:
        _release(services, entry)
    return Proceed()


def _fence_and_read(services: Services, entry: Entry) -> Order | None:
    """Read the order; if not confirmed, release its seats and read it once more."""
    order = _settle(services, entry)
    if order is None or order.status == "CONFIRM":
        return order
    if entry.order_id is not None and entry.item_ids:
        try:
            services.client.release_seats(entry.order_id, entry.item_ids)
        except PermanentError as exc:
            log.info("fence release refused (%s); reading the order again", exc.code)
    return _settle(services, entry)


def _release(services: Services, entry: Entry, *, probe: bool = False) -> bool:
    """Give the basket's seats back; True when all it may hold was released.

    Best effort: an abandoned basket expires by itself. With ``probe``, a call
    whose outcome is unknown may have added seats we have no item ids for.
    Setting the buyer again changes nothing but answers with the whole order,
    so its items, the unknown ones included, are released too.
    """
    if entry.order_id is None:
        return True
    item_ids, known = list(entry.item_ids), not probe
    with bound(step="release", order_id=entry.order_id):
        if probe:
            try:
                order = services.client.set_buyer(entry.order_id, entry.intent.buyer)
                item_ids, known = sorted(set(item_ids) | set(_item_ids(order))), True
            except FulfilmentError as exc:
                log.info("could not list basket %s before releasing: %s", entry.order_id, exc.code)
        if not item_ids:
            return known
        try:
            services.client.release_seats(entry.order_id, item_ids)
        except FulfilmentError as exc:
            log.warning("could not release basket %s (it will expire): %s", entry.order_id, exc)
            return False
        log.info("released %d items of basket %s", len(item_ids), entry.order_id)
        return known


# --- helpers -----------------------------------------------------------------------
@contextmanager
def _sending(ledger: Ledger, reference: str, step: str) -> Iterator[None]:
    """Mark a non-repeatable basket call as sent before sending it.

    If the call fails in a way that says it was not done, the mark is cleared;
    if its outcome is unknown, or the worker dies, the mark stays and the next
    run abandons the basket. The caller clears it with the call's result.
    """
    ledger.record(reference, pending=step)
    try:
        yield
    except (TransientError, PermanentError):
        ledger.record(reference, pending=None)
        raise


def _reread(services: Services, reference: str) -> Entry:
    entry = services.ledger.get(reference)
    if entry is None:
        raise UnknownIntentError(f"ledger entry for {reference} vanished")
    return entry


def _orphan_left(services: Services, reference: str) -> float:
    """Seconds until an abandoned basket of this intent, of unknown contents, expires."""
    orphan = _reread(services, reference).orphan_expires
    return max(orphan - services.clock(), 0.0) if orphan else 0.0


def _expiry(services: Services, order: Order) -> dict[str, float]:
    """When the basket expires if left alone, and its time to live, as Onebox reports."""
    if order.expires_at is None:
        return {}
    expires = order.expires_at.timestamp()
    return {"basket_expires": expires, "basket_ttl": max(expires - services.clock(), 0.0)}


def _clip(value: str | None, length: int = 64) -> str | None:
    """An identifier from Onebox, bounded as the result contract wants it."""
    return value[:length] if value else None


def _item_ids(order: Order) -> list[int]:
    return [item.id for item in order.items]


def _result(services: Services, entry: Entry, status: str, *, order_code: str | None = None,
            order_id: str | None = None, error: ResultError | None = None) -> OrderResult:
    return OrderResult(
        result_id=result_id_for(entry.reference),
        reference=entry.reference,
        status=status,
        batch=entry.intent.batch,
        order_code=_clip(order_code),
        order_id=_clip(order_id if status == CONFIRMED else entry.order_id),
        error=error,
        attempts=entry.attempts,
        submitted_at=entry.submitted_at,
        finished_at=datetime.fromtimestamp(services.clock(), UTC),
        metadata=entry.intent.metadata,
    )
