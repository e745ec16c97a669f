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

import contextvars
import enum
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from fulfilment import metrics, sessioncap
from fulfilment.config import Settings
from fulfilment.errors import (
    FulfilmentError,
    HeldBackError,
    OutcomeUnknownError,
    PermanentError,
    TransientError,
)
from fulfilment.lease import Leases
from fulfilment.ledger import (
    Begun,
    Entry,
    LeaseLostError,
    Ledger,
    StopRecordedError,
    UnknownIntentError,
)
from fulfilment.logcontext import bound
from fulfilment.onebox.auth import AuthRefusedError
from fulfilment.onebox.client import OneboxClient
from fulfilment.onebox.guard import before_send
from fulfilment.redact import masking_buyer
from fulfilment.results import ResultPublisher
from fulfilment.retry import RetryPolicy
from fulfilment.sessioncap import SessionCap
from fulfilment.states import state_of
from fulfilment.unsettled import UnsettledIndex, answer_of
from schemas import result
from schemas.intent import NumberedItem
from schemas.onebox import Order
from schemas.result import (
    CANCELLED,
    CONFIRMED,
    FAILED,
    HELD,
    UNSETTLED,
    OrderResult,
    ResultError,
    result_id_for,
)

log = logging.getLogger(__name__)

#: Onebox's answer when a basket is gone (expired or never existed).
ORDER_NOT_FOUND = "ORDER_NOT_FOUND"
SEAT_NOT_AVAILABLE = "ORDER_SEAT_NOT_AVAILABLE"
#: Onebox's answer when the order's status does not allow the call.
STATUS_CONFLICT = "DIST0004"
#: Ours: the order's seats were released, so no confirm can land on it any more.
ORDER_FENCED = "ORDER_FENCED"
#: Ours: Onebox refuses to let us read the order and would not release it.
CONFIRM_UNREADABLE = "CONFIRM_UNREADABLE"
#: Ours: the order read in a status that proves nothing either way.
ORDER_STATUS_UNEXPECTED = "ORDER_STATUS_UNEXPECTED"
#: Ours: the order read as expired, unconfirmed.
ORDER_EXPIRED = "ORDER_EXPIRED"
#: Onebox's answer to a field it refuses (a release naming items the order lacks).
INVALID_FIELD = "DIST0005"
#: Giving up on these, a confirm that may have landed is "unsettled" at once: asking
#: again until the deadline would not change the answer.
SAY_AT_ONCE = frozenset({CONFIRM_UNREADABLE, ORDER_STATUS_UNEXPECTED})
#: The status an expired basket may still be read with (or it is simply gone).
EXPIRED = "EXPIRED"
#: How long an abandoned basket is assumed to live when Onebox did not say.
DEFAULT_BASKET_TTL = 600.0
#: Abandoned baskets of one intent remembered, to clear seats they may still hold.
MAX_ORPHANS = 8
#: Allowance for Onebox's clock and ours disagreeing about an expiry.
CLOCK_SKEW_MARGIN = 5.0
#: A hold lapses this long before Onebox's basket would: time for the confirm to land.
HOLD_MARGIN = 2 * CLOCK_SKEW_MARGIN
#: Tries to release a stopped purchase's basket before leaving it to expire.
STOP_RELEASE_TRIES = 3
#: The outcome of a stop, by what was recorded: the shop's cancel, or a lapsed hold.
STOPPED = {"cancel": (CANCELLED, "CANCELLED", "cancelled by the shop before a confirm was "
                                              "sent; nothing was bought"),
           "expire": (result.EXPIRED, "HOLD_EXPIRED", "the hold lapsed without the shop's confirm; "
                                               "nothing was bought")}


class Stage(enum.IntEnum):
    """How far a purchase has come; each task brings it up to one of these."""

    BASKET = 1  # order created, every item added, buyer attached
    PRE_CONFIRMED = 2  # order code known
    FINISHED = 3  # outcome (confirmed or failed) recorded in the ledger
    PUBLISHED = 4  # outcome on the results queue


@dataclass(frozen=True)
class Proceed:
    """The stage is reached (or the purchase is finished): go on.

    Once published, ``outcome`` is the outcome that went out.
    """

    outcome: OrderResult | None = None


@dataclass(frozen=True)
class Held:
    """Pre-confirmed and held for the shop: the interim ``held`` result is out; nothing
    more until the shop confirms or cancels, or the hold lapses."""

    result: OrderResult


@dataclass(frozen=True)
class RetryIn:
    """Not now: run this stage again after ``delay`` seconds."""

    delay: float
    reason: str


Decision = Proceed | RetryIn | Held


class NotFoundYetError(TransientError):
    """Onebox cannot find the order yet; conclusive once its basket's expiry has passed.

    Waiting for that is not failing: it does not use up attempts.
    """


class OutOfTimeError(TransientError):
    """This task run is near its time limit: hand over to a retry, progress recorded.

    Not a failure: it does not use up attempts.
    """

    default_code = "HANDED_OVER"


__all__ = ["Held", "Proceed", "RetryIn", "Services", "Stage", "UnknownIntentError", "advance",
           "settle", "stopped_result"]


def _ledgers_clock() -> float:
    """``Services.clock`` left out: ``__post_init__`` puts the ledger's there."""
    raise NotImplementedError


@dataclass(frozen=True)
class Services:
    """What the steps work with; built once per worker process."""

    settings: Settings
    client: OneboxClient
    ledger: Ledger
    publisher: ResultPublisher
    leases: Leases
    policy: RetryPolicy
    #: Redis's clock (``fulfilment.clock``): every stamp another process compares
    #: (``basket_expires``, ``orphan_expires``) is on it. Left out: the ledger's.
    clock: Callable[[], float] = _ledgers_clock
    #: ``FULFILMENT_SESSION_CAP``'s slots; None when there is no cap.
    session_cap: SessionCap | None = None

    def __post_init__(self) -> None:
        if self.clock is _ledgers_clock:
            object.__setattr__(self, "clock", self.ledger.clock)


def advance(services: Services, reference: str, target: Stage, attempt: int = 1) -> Decision:
    """Do what is owed for ``reference`` up to ``target``; see the module docstring.

    ``attempt`` (the task's delivery count) is only for the logs: retry limits
    count failures without progress in the ledger, not deliveries.
    """
    lease = services.leases.offer(reference)
    # One round trip: the entry, and (unless there is nothing to do) the lease.
    state, entry = services.ledger.begin(reference, lease.key, lease.token, services.leases.ttl,
                                         done_when_finished=target < Stage.PUBLISHED)
    with bound(reference=reference, order_id=entry and entry.order_id, attempt=attempt):
        if state is Begun.DONE:
            return Proceed(entry.outcome if entry is not None else None)
        if entry is None:
            return metrics.decided(RetryIn(1.0, "another worker holds this intent"))
        with lease, services.ledger.fenced(lease.key, lease.token, entry), \
                _masking_buyer_of(entry):
            try:
                return metrics.decided(_advance_leased(services, entry, target))
            except LeaseLostError as exc:
                log.warning("%s; handing the intent over", exc)
                return metrics.decided(RetryIn(services.leases.ttl, exc.code))


def _masking_buyer_of(entry: Entry) -> AbstractContextManager[None]:
    """Mask the buyer's name in what Onebox echoes; a finished entry has no buyer left."""
    intent = entry.stored_intent
    return masking_buyer(intent.buyer) if intent is not None else nullcontext()


def _time_budget(settings: Settings) -> float:
    """Seconds a run may send calls for: one full call must fit before the soft limit.

    A call's wait for the shared rate limit is spent before it is sent, so it
    counts: the time is checked again when the call goes out (``_RunTime``).
    """
    call = settings.onebox_connect_timeout + settings.onebox_read_timeout
    return max(settings.task_soft_time_limit - call - 1.0, 1.0)


@dataclass
class _RunTime:
    """A run's time budget, checked when a stage's call goes out (after any wait)."""

    clock: Callable[[], float]
    until: float
    reference: str = ""
    #: Set by ``_in_time``: the next call sent is a stage's, bound by the budget.
    armed: bool = False
    #: The session cap's slots for this run (taken before a new basket).
    slots: sessioncap.RunSlots | None = None

    def sending(self) -> None:
        armed, self.armed = self.armed, False
        if armed and self.clock() > self.until:
            raise OutOfTimeError("this run's time ran out waiting for its turn; nothing sent")


_RUN: contextvars.ContextVar[_RunTime | None] = contextvars.ContextVar("flow_run", default=None)


def _advance_leased(services: Services, entry: Entry, target: Stage) -> Decision:
    until = services.clock() + _time_budget(services.settings)
    intent = entry.stored_intent
    slots = sessioncap.RunSlots(services.session_cap, entry.reference,
                                sessioncap.sessions_of(intent)
                                if intent is not None and services.session_cap else (),
                                basket_open=entry.order_id is not None and not entry.finished)
    run = _RunTime(services.clock, until, entry.reference, slots=slots)
    token = _RUN.set(run)
    try:
        with before_send(run.sending), slots:
            decision = _attempt(services, entry, target, until)
            if slots.cap is not None:  # given back with the outcome, else held over the wait
                now = _reread(services, entry.reference)
                slots.done(finished=now.finished, basket_open=now.order_id is not None,
                           wait=decision.delay if isinstance(decision, RetryIn) else 0.0)
    finally:
        _RUN.reset(token)
    if isinstance(decision, Held):
        return Held(_publish_held(services, entry.reference))
    if isinstance(decision, Proceed) and target >= Stage.PUBLISHED:
        return Proceed(_publish(services, entry.reference))
    return decision


def _attempt(services: Services, entry: Entry, target: Stage,  # noqa: PLR0911 - one per kind
             until: float) -> Decision:
    """Run the stages; turn each kind of failure into what happens next."""
    try:
        if _run(services, entry, target, until):
            return Held(_held_result(services, _reread(services, entry.reference)))
    except (UnknownIntentError, LeaseLostError):
        raise  # not about the purchase: about this worker's right to work on it
    except StopRecordedError:
        return _stop(services, entry.reference)
    except OutOfTimeError as exc:
        log.info("%s; a retry carries on", exc.message)
        return RetryIn(0.0, exc.code)
    except OutcomeUnknownError as exc:
        return _after_unknown(services, entry.reference, exc)
    except TransientError as exc:
        return _after_transient(services, entry.reference, exc)
    except PermanentError as exc:
        return _after_permanent(services, entry.reference, exc)
    return Proceed()


def _after_permanent(services: Services, reference: str, exc: PermanentError) -> Decision:
    if exc.code == STATUS_CONFLICT and exc.step != "release":
        # Never a failure by itself: ask Onebox where our order stands.
        return _reconcile(services, reference, exc)
    if exc.code == ORDER_NOT_FOUND and _reread(services, reference).confirm_sent:
        # A confirm may have landed before the order went missing: a 404 proves
        # nothing. The next run reads the order, or fences it, before anything else.
        return _retry_or_fail(services, reference, exc)
    if exc.code in {ORDER_NOT_FOUND, ORDER_FENCED, ORDER_EXPIRED}:
        # The basket expired under us, or Onebox shows it unconfirmed for good
        # (expired, or fenced by us): nothing was bought, start anew.
        return _restart_basket(services, reference, exc)
    if exc.code == SEAT_NOT_AVAILABLE and _orphan_left(services, reference) <= 0 and \
            _free_orphans(services, reference):
        # Past its expiry our abandoned basket still held seats: a call of ours
        # landed there late. They are released, or it is waited for once more.
        freed = TransientError(exc.message, code=exc.code, status=exc.status,
                               trace_id=exc.trace_id, step=exc.step, retry_after=0.2)
        return _retry_or_fail(services, reference, freed, counts=False)
    orphan_left = _orphan_left(services, reference)
    if exc.code == SEAT_NOT_AVAILABLE and orphan_left > 0:
        # Our own abandoned basket may hold the seat until it expires: wait for it.
        log.info("seat held, maybe by our abandoned basket for %.0fs more", orphan_left)
        waiting = TransientError(exc.message, code=exc.code, status=exc.status,
                                 trace_id=exc.trace_id, step=exc.step,
                                 retry_after=orphan_left + 1.0)
        # Bounded by the deadline only: waiting is not trying again.
        return _retry_or_fail(services, reference, waiting, counts=False)
    return _fail(services, reference, exc)


def _run(services: Services, entry: Entry, target: Stage, until: float) -> bool:
    """The stages up to ``target``; True when the purchase stopped, held for the shop."""
    if entry.finished:
        return False
    if entry.stop and not entry.confirm_sent:
        raise StopRecordedError(f"stop recorded: {entry.stop}")
    _fill_basket(services, entry, until)
    if target >= Stage.PRE_CONFIRMED:
        _pre_confirm(services, entry.reference, until)
    if target >= Stage.FINISHED:
        if _hold(services, entry.reference):
            return True
        _confirm(services, entry.reference, until)
    return False


def _in_time(services: Services, until: float) -> None:
    """Before each call: stop while a whole call still fits before the soft time limit,
    and stop for good once the shop's cancel is recorded (every write tells of it).

    Checked once more as the call goes out, so a wait for the rate limit counts.
    """
    if services.clock() > until:
        raise OutOfTimeError("this run's time is up")
    run = _RUN.get()
    if run is not None:
        stop = services.ledger.get(run.reference) if run.reference else None
        if stop is not None and stop.stop and not stop.confirm_sent:
            raise StopRecordedError(f"stop recorded: {stop.stop}")
        run.armed = True


# --- the stages ----------------------------------------------------------------
def _fill_basket(services: Services, entry: Entry, until: float) -> None:
    ledger, client, reference = services.ledger, services.client, entry.reference
    if entry.pending:
        # A seats or pre-confirm call was sent and its answer never recorded (the
        # worker died, or hit its time limit): what the basket holds is unknown.
        raise OutcomeUnknownError(f"interrupted {entry.pending} call", code="INTERRUPTED",
                                  step=entry.pending)
    order_id = entry.order_id
    if order_id is None:
        run = _RUN.get()
        if run is not None and run.slots is not None:
            run.slots.take()  # FULFILMENT_SESSION_CAP: a slot in each session, or wait
        _in_time(services, until)
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
            _in_time(services, until)
            with bound(step="seats"), _sending(ledger, reference, "seats"):
                if isinstance(item, NumberedItem):
                    order = client.add_seats(order_id, item.seats)
                else:
                    order = client.add_seats_auto(order_id, item)
            ledger.record(reference, item_ids=_item_ids(order), items_done=index + 1, pending=None,
                          **_expiry(services, order), failures=0)
        if not (entry.buyer_set and entry.order_id):
            _in_time(services, until)
            # Safe to repeat: buyer data is set, not added.
            with bound(step="buyer_data"):
                client.set_buyer(order_id, entry.intent.buyer)
            ledger.record(reference, buyer_set=True, failures=0)


def _pre_confirm(services: Services, reference: str, until: float) -> None:
    entry = _reread(services, reference)
    if entry.code is not None:
        return
    assert entry.order_id is not None
    _in_time(services, until)
    with bound(step="pre_confirm", order_id=entry.order_id):
        with _sending(services.ledger, reference, "pre_confirm"):
            order = services.client.pre_confirm(entry.order_id, entry.intent.delivery_method)
        if not order.code:
            raise OutcomeUnknownError("pre-confirm answered without an order code",
                                      code="MALFORMED_RESPONSE", step="pre_confirm")
        services.ledger.record(reference, code=order.code, item_ids=_item_ids(order), pending=None,
                               failures=0, **_expiry(services, order))
        services.ledger.index_code(reference, order.code)
        log.info("order pre-confirmed, code %s", order.code)


def _confirm(services: Services, reference: str, until: float) -> None:
    entry = _reread(services, reference)
    assert entry.order_id is not None and entry.code is not None
    client, ledger = services.client, services.ledger
    with bound(step="confirm", order_id=entry.order_id):
        _in_time(services, until)
        if entry.confirm_sent:
            # A confirm may have been done: ask Onebox before sending another.
            order, fenced = _where_it_stands(services, entry)
            log.info("reconciled order %s: %s", entry.code, order.status)
            if order.status == "CONFIRM":
                _finish_confirmed(services, entry, order)
                return
            if order.status != "PRE_CONFIRM":
                raise _not_confirmed(services, entry, order, fenced=fenced)
        assert entry.order_id is not None
        ttl = entry.basket_ttl or DEFAULT_BASKET_TTL

        def mark_sent() -> None:
            # As the request goes out (after the token and the rate limit's wait),
            # never after: a worker killed while it waits has sent no confirm. The
            # call restarts the basket's timer, so the expiry is counted from here.
            # Refused once the shop's cancel is recorded: then nothing goes out.
            ledger.record_unless_stopped(reference, confirm_sent=True,
                                         basket_expires=services.clock() + ttl)

        try:
            with before_send(mark_sent):
                order = client.confirm(entry.order_id, reference, entry.intent.payments)
        except (TransientError, PermanentError) as exc:
            # Never sent, or refused (429, 503, 4xx): this confirm did nothing, so
            # the order stands as before it. An unknown outcome keeps the mark, and
            # so does DIST0004: the order may be confirmed already (read it first).
            if exc.code != STATUS_CONFLICT:
                ledger.record(reference, confirm_sent=entry.confirm_sent)
            raise
        _finish_confirmed(services, entry, order)


# --- held for the shop, and stopped ---------------------------------------------------
def _hold(services: Services, reference: str) -> bool:
    """Hold a pre-confirmed order for the shop, if its intent asks; True while held.

    The hold lapses ``HOLD_MARGIN`` before Onebox's basket would expire (its
    expiry as Onebox last reported it, on Redis's clock), so a confirm asked
    for just in time still lands. A run that finds its hold lapsed records the
    stop itself (the beat's scan is the prompt way; this is the sure one).
    """
    entry = _reread(services, reference)
    if not entry.intent.hold or entry.confirm_requested:
        return False
    now = services.clock()
    expires = entry.basket_expires or now + (entry.basket_ttl or DEFAULT_BASKET_TTL)
    until = max(expires - HOLD_MARGIN, now + (expires - now) / 2)
    if entry.held_until is None:
        answer = services.ledger.hold(reference, until, entry.result_batch)
        if answer == -5:
            return False  # the shop confirmed meanwhile: go on
        if answer == -4:
            raise StopRecordedError("stop recorded before the hold")
        log.info("order %s held for the shop until %s", entry.code,
                 datetime.fromtimestamp(until, UTC).isoformat(timespec="seconds"))
        return True
    if now > entry.held_until:
        stop = services.ledger.request_stop(reference, "expire", None, entry.result_batch)
        if stop == "stopping" or stop.startswith("done:"):
            raise StopRecordedError("the hold lapsed")
        return stop != "confirming"
    services.ledger.hold(reference, entry.held_until, entry.result_batch)  # re-park it
    return True


def _held_result(services: Services, entry: Entry) -> OrderResult:
    assert entry.held_until is not None
    return _result(services, entry, HELD, order_code=entry.code,
                   hold_expires_at=datetime.fromtimestamp(entry.held_until, UTC))


def _publish_held(services: Services, reference: str) -> OrderResult:
    """Put the interim ``held`` result out once (the final one follows, same result_id)."""
    entry = _reread(services, reference)
    result = _held_result(services, entry)
    if not entry.held_published:
        with bound(step="publish"):
            services.publisher.publish(result)
        services.ledger.hold(reference, entry.held_until or 0.0, entry.result_batch,
                             published=True)
    return result


def _stop(services: Services, reference: str) -> Decision:
    """The shop's cancel (or a lapsed hold) is recorded: release the basket, then the outcome.

    Released first: a worker dying in between leaves the stop recorded, and the
    next run releases again (an empty release is harmless) before writing it.
    A release that does not take is tried ``STOP_RELEASE_TRIES`` times; then
    the basket is left to expire and the outcome written all the same.
    """
    entry = _reread(services, reference)
    if entry.finished:
        return Proceed()
    with bound(step="stop"):
        # Refused for good (the basket gone, or an order Onebox will not release) is
        # Onebox's last word: nothing more to release, its seats are left to expire.
        released = _release(services, entry, probe=entry.pending is not None,
                            refusal_is_final=True)
        if not released:
            failures = services.ledger.count_failure(reference)
            if failures < STOP_RELEASE_TRIES:
                return RetryIn(services.policy.delay(failures, None), "RELEASE_NOT_DONE")
            log.warning("basket %s not released: its seats are held until it expires",
                        entry.order_id)
        outcome = services.ledger.finish(reference, stopped_result(services, entry))
        log.info("purchase stopped: %s", outcome.status)
    return Proceed()


def stopped_result(services: Services, entry: Entry) -> OrderResult:
    """The outcome of a stopped purchase: ``cancelled``, or ``expired`` for a lapsed hold."""
    status, code, message = STOPPED[entry.stop or "cancel"]
    error = ResultError(code=code, message=message,
                        step=state_of(replace(entry, stop=None)).value)
    return _result(services, entry, status, order_code=entry.code, error=error)


def _where_it_stands(services: Services, entry: Entry) -> tuple[Order, bool]:
    """Where an order a confirm may have reached stands, and whether we fenced it to know.

    Only a positive answer counts. First the order read by its code. A read that
    gives none (refused with 401 or 403, or 404: Onebox may answer 404 for an
    order this channel may not read, so a 404 proves nothing, expiry or not) is
    replaced by the fence: releasing the order's seats by id. Onebox releases no
    confirmed order's seats, and a release that takes sends a PRE_CONFIRM order
    back to BASKET, where a late confirm cannot land. The release's answer shows
    the order as a read would (BASKET: fenced; still PRE_CONFIRM: it did not
    take, and confirming again is as safe as after such a read).

    Returns an order in CONFIRM, PRE_CONFIRM, BASKET or EXPIRED. Otherwise
    raises: ``TransientError`` to ask again later (``CONFIRM_UNREADABLE`` when
    Onebox refuses both the read and the fence; ``CONFIRM_UNSETTLED`` when the
    fence got no answer), ``PermanentError`` for a status we do not know.
    """
    assert entry.code is not None
    try:
        order = services.client.get_order(entry.code)
    except AuthRefusedError as exc:
        unread: FulfilmentError = exc
    except PermanentError as exc:
        if exc.code != ORDER_NOT_FOUND:
            raise
        unread = exc
    else:
        if order.status not in {"CONFIRM", "PRE_CONFIRM", "BASKET", EXPIRED}:
            # Not a status that proves anything either way (refunded? cancelled?).
            raise PermanentError(f"order in unexpected status {order.status}",
                                 code=ORDER_STATUS_UNEXPECTED, step="confirm")
        return order, False
    log.info("no answer from the order read by code (%s): fencing it", unread.code)
    fence = _fence(services, entry)
    if isinstance(fence, Order):
        return fence, fence.status == "BASKET"
    if not isinstance(fence, PermanentError):
        raise TransientError(f"the order cannot be read ({unread.code}) and releasing its "
                             f"seats got no answer ({fence.code})", code="CONFIRM_UNSETTLED",
                             step="confirm", trace_id=fence.trace_id,
                             retry_after=fence.retry_after or unread.retry_after)
    conclusive_at = (entry.basket_expires or services.clock()) + CLOCK_SKEW_MARGIN
    if unread.code == ORDER_NOT_FOUND and services.clock() <= conclusive_at:
        # A read lagging behind, or an order confirmed (so not released): ask again
        # until the basket would have expired. Waiting is not failing.
        raise NotFoundYetError("order not found by its code yet", code=ORDER_NOT_FOUND,
                               step="get_order",
                               retry_after=max(conclusive_at - services.clock(), 0.0))
    # Onebox answers both, and neither says where the order stands. A refusal may
    # pass (auth trouble): asked again within the attempts, then "unsettled".
    raise TransientError(f"the order can neither be read ({unread.code}) nor fenced "
                         f"({fence.code})", code=CONFIRM_UNREADABLE, status=unread.status,
                         trace_id=unread.trace_id or fence.trace_id, step="confirm",
                         retry_after=unread.retry_after)


def _not_confirmed(services: Services, entry: Entry, order: Order, *,
                   fenced: bool) -> FulfilmentError:
    """Onebox shows the order unconfirmed for good: record it, and say how to start anew."""
    ledger, reference = services.ledger, entry.reference
    if order.status == EXPIRED:
        # Expired: its seats are free again, nothing left to release.
        ledger.record(reference, confirm_sent=False, item_ids=[], failures=0)
        return PermanentError("the order expired unconfirmed", code=ORDER_EXPIRED,
                              step="confirm")
    if fenced:
        # Our release took it back to BASKET: the answer lists what it still holds.
        ledger.record(reference, confirm_sent=False, item_ids=_item_ids(order), failures=0)
        return PermanentError("the order could not be read; its seats were released (fenced)",
                              code=ORDER_FENCED, step="confirm")
    # Read back in BASKET (a release of ours may have emptied it): not confirmed,
    # and its content unknown. Start again with a new basket.
    ledger.record(reference, confirm_sent=False)
    return OutcomeUnknownError("the order went back to BASKET", code="ORDER_BACK_IN_BASKET",
                               step="seats")


def _fence(services: Services, entry: Entry) -> Order | FulfilmentError:
    """Release the order's seats by id; its answer shows where the order stands.

    An answer in BASKET is a fence (see ``_where_it_stands``); any other status
    is only a read. An earlier release whose answer was lost may have freed the
    items already, so Onebox refuses them (DIST0005): the buyer data is then set
    again, which answers with the whole order. Returns the error otherwise: a
    ``PermanentError`` is Onebox's refusal, anything else no answer.
    """
    if entry.order_id is None or not entry.item_ids:
        return PermanentError("no seats known to release", code="NOTHING_TO_RELEASE",
                              step="release")
    with bound(step="release"):
        try:
            try:
                order = services.client.release_seats(entry.order_id, entry.item_ids)
            except PermanentError as exc:
                if exc.code != INVALID_FIELD:
                    raise
                order = services.client.set_buyer(entry.order_id, entry.intent.buyer)
        except FulfilmentError as exc:
            log.info("fence release refused or failed (%s)", exc.code)
            return exc
    if order.status == "BASKET":
        log.info("order %s fenced: its seats are released", entry.code)
    else:
        log.warning("release answered with order %s still %s: not fenced", entry.code,
                    order.status)
    return order


def _finish_confirmed(services: Services, entry: Entry, order: Order) -> None:
    result = _result(services, entry, CONFIRMED, order_code=order.code or entry.code,
                     order_id=order.id)
    stands = services.ledger.finish(entry.reference, result)
    log.info("order %s confirmed", stands.order_code)


def _publish(services: Services, reference: str) -> OrderResult:
    """Put the outcome on the results queue (once); return it."""
    entry = _reread(services, reference)
    assert entry.outcome is not None
    if not entry.published:
        with bound(step="publish"):
            services.publisher.publish(entry.outcome)
        services.ledger.mark_published(reference)
    return entry.outcome


# --- when things go wrong --------------------------------------------------------
def _after_unknown(services: Services, reference: str, exc: OutcomeUnknownError) -> Decision:
    entry = _reread(services, reference)
    if entry.confirm_sent:
        # The next attempt reads the order by code first; it cannot double-confirm.
        return _retry_or_fail(services, reference, exc)
    with bound(trace=exc.trace_id):
        log.warning("basket call's outcome unknown (%s): abandoning basket", exc.code)
    return _restart_basket(services, reference, exc)


def _after_transient(services: Services, reference: str, exc: TransientError) -> Decision:
    if isinstance(exc, HeldBackError):
        # Never sent (the breaker is open, or no rate-limit slot soon): waiting, not
        # failing. The guard logs the breaker's changes; one line per intent is noise.
        log.debug("held back: %s", exc)
    else:
        with bound(trace=exc.trace_id):
            log.warning("transient failure: %s", exc)
    return _retry_or_fail(services, reference, exc,
                          counts=not isinstance(exc, NotFoundYetError | HeldBackError))


def _restart_basket(services: Services, reference: str, exc: FulfilmentError) -> Decision:
    entry = _reread(services, reference)
    if entry.baskets >= services.policy.max_attempts:
        return _fail(services, reference, exc)
    # Only a seats call adds items we may not know of; a lost pre-confirm adds none.
    unknown_items = isinstance(exc, OutcomeUnknownError) and exc.step in {"seats", "seats_auto"}
    released_all = _release(services, entry, probe=unknown_items)
    # Every call naming the basket (our release attempt too) restarts its timer. A
    # seats call of unknown outcome may still land after we listed and released
    # the basket (Onebox finishing it late), so its seats may be held until then.
    ttl = entry.basket_ttl or DEFAULT_BASKET_TTL
    orphan: dict[str, object] = {}
    if not released_all or unknown_items:
        orphan = {"orphan_expires": services.clock() + ttl + 1.0,
                  "orphans": [*entry.orphans[-(MAX_ORPHANS - 1):], entry.order_id]}
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
    elapsed = services.ledger.age(entry)  # on Redis's clock, from admission
    if services.policy.gives_up(failures if counts else 0, elapsed, delay):
        return _fail(services, reference, exc)
    services.ledger.record(reference)  # a retry is scheduled: alive, not stuck
    return RetryIn(delay, exc.code)


def _fail(services: Services, reference: str, exc: FulfilmentError) -> Decision:
    """Record a failed outcome, unless Onebox says the order was confirmed after all.

    The outcome is written before the seats are released: a worker dying in
    between leaves a failed purchase whose basket expires, never a purchase
    that resumes with seats missing. Where a confirm may have been sent, the
    order is first read or fenced (``_settle_for_failure``): "failed" only if
    Onebox shows it unconfirmed for good. Then, unless the failure is one
    another try cannot help, it is no failure at all: the purchase starts again
    with a new basket, as for any fenced order (within the attempts and time left).
    """
    entry = _reread(services, reference)
    if entry.confirm_sent and entry.code:
        order, settled = _settle_for_failure(services, entry)
        if order is not None and order.status == "CONFIRM":
            _finish_confirmed(services, entry, order)
            return Proceed()
        if not settled:
            # We cannot tell whether it was bought: never guess "failed".
            return _unsettled_or_wait(services, entry, exc, at_once=exc.code in SAY_AT_ONCE)
        # What the order holds now, as Onebox showed it (an expired one holds nothing).
        held = _item_ids(order) if order is not None and order.status == "BASKET" else []
        services.ledger.record(reference, confirm_sent=False, item_ids=held, failures=0)
        exc = _known_unconfirmed(exc)
        if exc.retryable:
            return _restart_basket(services, reference, exc)
        entry = _reread(services, reference)
    error = ResultError(code=exc.code, message=exc.message, step=exc.step,
                        retryable=exc.retryable, trace_id=exc.trace_id)
    services.ledger.finish(reference, _result(services, entry, FAILED, error=error))
    with bound(order_id=entry.order_id, trace=exc.trace_id):
        log.warning("purchase failed: %s", exc)
    if not entry.confirm_sent:
        _release(services, entry)
    return Proceed()


def _known_unconfirmed(exc: FulfilmentError) -> FulfilmentError:
    """``exc``, its message saying that Onebox shows the order unconfirmed, nothing bought."""
    message = f"{exc.message}; Onebox shows the order unconfirmed (read, or fenced by " \
              f"releasing its seats): nothing was bought"
    return type(exc)(message, code=exc.code, status=exc.status, trace_id=exc.trace_id,
                     step=exc.step, retry_after=exc.retry_after)


def _settle_for_failure(services: Services, entry: Entry) -> tuple[Order | None, bool]:
    """Before giving up on a purchase whose confirm may have been sent: was it bought?

    Returns whether the question is settled, and if so the order as Onebox
    showed it (confirmed, or not). Settled unconfirmed means read in BASKET or EXPIRED, or fenced (a
    release whose answer shows the order back in BASKET). An order still in
    PRE_CONFIRM is fenced now (a late confirm could land); if that does not
    take, it is read once more, and unless it reads confirmed, BASKET or
    EXPIRED, the answer stays open. A 404 or a refusal settles nothing.
    """
    try:
        order, _ = _where_it_stands(services, entry)
    except FulfilmentError as exc:
        # One answer lost (a fault, a blip) should not decide: ask once more.
        log.warning("cannot tell yet whether the confirm went through: %s", exc)
        return _read_again(services, entry)
    if order.status != "PRE_CONFIRM":
        return order, True
    fence = _fence(services, entry)
    if isinstance(fence, Order) and fence.status == "BASKET":
        return fence, True
    return _read_again(services, entry)


def _read_again(services: Services, entry: Entry) -> tuple[Order | None, bool]:
    """A last read by code, settled only by a positive answer."""
    try:
        again = services.client.get_order(entry.code or "")
    except FulfilmentError as exc:
        log.warning("cannot read the order to settle its confirm: %s", exc)
        return None, False
    settled = again.status in {"CONFIRM", "BASKET", EXPIRED}
    return (again, True) if settled else (None, False)


def _unsettled_or_wait(services: Services, entry: Entry, exc: FulfilmentError, *,
                       at_once: bool = False) -> Decision:
    """Keep asking until the deadline; then say so: ``unsettled``, never ``failed``."""
    now = services.clock()
    remaining = services.policy.deadline - services.ledger.age(entry)
    if remaining > 0 and not at_once:
        services.ledger.record(entry.reference)  # alive: the sweep need not resume it
        wait = (entry.basket_expires or now) + CLOCK_SKEW_MARGIN - now
        return RetryIn(min(max(wait, 1.0), services.policy.cap, remaining), "CONFIRM_UNSETTLED")
    error = ResultError(code="CONFIRM_UNSETTLED",
                        message=f"a confirm was sent and Onebox could not tell whether it "
                                f"went through: {exc.message} ({exc.code}); it is read again by "
                                f"itself, or settle it with 'fulfilment settle "
                                f"{entry.reference}'",
                        step="confirm", retryable=False, trace_id=exc.trace_id)
    # Indexed first (read again on a schedule, fulfilment.settlement): never an
    # unsettled outcome that nobody reads again.
    UnsettledIndex(services.ledger.redis, services.ledger.keys).mark(
        entry.reference, now=now, first=services.settings.settle_first,
        answer=answer_of(exc.code, exc.status), order_code=entry.code, batch=entry.result_batch)
    services.ledger.finish(entry.reference, _result(services, entry, UNSETTLED,
                                                    order_code=entry.code, error=error))
    log.error("purchase unsettled: confirm sent, outcome unknown (%s)", exc.code)
    return Proceed()


def _reconcile(services: Services, reference: str, exc: PermanentError) -> Decision:
    """Onebox says our order is past the status the call needs: act on what it holds.

    Only a ledger that lost progress (or an Onebox that moved the order on its
    own) gets here: typically a pre-confirm sent again after its answer was
    lost. Without the order's code it cannot be read; if no confirm was ever
    sent for it, nothing can have been bought: it is released by id and the
    purchase starts again with a new basket. Otherwise it is read (or fenced).
    """
    entry = _reread(services, reference)
    log.warning("Onebox says order %s is past this step (%s): reading it", entry.order_id,
                exc.code)
    if entry.code is None:
        return _reconcile_uncoded(services, entry, exc)
    try:
        found, fenced = _where_it_stands(services, entry)
    except TransientError as error:
        return _after_transient(services, reference, error)  # NotFoundYet waits
    except FulfilmentError as error:  # a status that proves nothing: ask again
        return _retry_or_fail(services, reference, error)
    if found.status == "CONFIRM" or fenced or found.status == EXPIRED:
        return _settled_by(services, entry, found, fenced=fenced)
    if exc.step == "confirm" or found.status == "BASKET":
        # The read contradicts the refusal: it lags behind. Ask again shortly.
        stale = TransientError("Onebox's read lags behind its answer", code="ORDER_STATUS_STALE",
                               step=exc.step, trace_id=exc.trace_id, retry_after=1.0)
        return _retry_or_fail(services, reference, stale)
    # Pre-confirmed already (our ledger lost that step): carry on from there.
    services.ledger.record(reference, code=found.code or entry.code, pending=None,
                           item_ids=_item_ids(found), items_done=len(entry.intent.items),
                           buyer_set=True, failures=0)
    return RetryIn(0.0, "reconciled with Onebox")


def _settled_by(services: Services, entry: Entry, order: Order, *, fenced: bool) -> Decision:
    """Onebox shows where the order stands for good: confirmed, or never (start anew)."""
    if order.status == "CONFIRM":
        _finish_confirmed(services, entry, order)
        return Proceed()
    gone = _not_confirmed(services, entry, order, fenced=fenced)
    return _restart_basket(services, entry.reference, gone)


def _reconcile_uncoded(services: Services, entry: Entry, exc: PermanentError) -> Decision:
    """Past BASKET, code never recorded: unsettled only if a confirm may have gone out."""
    if entry.confirm_sent:
        return _unsettled_or_wait(services, entry, exc)
    lost = PermanentError("the order was pre-confirmed but its code never recorded; no "
                          "confirm was sent, so it was released and a new basket started",
                          code=exc.code, status=exc.status, trace_id=exc.trace_id,
                          step=exc.step)
    return _restart_basket(services, entry.reference, lost)


def _release(services: Services, entry: Entry, *, probe: bool = False,
             refusal_is_final: bool = False) -> bool:
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
            answer = services.client.release_seats(entry.order_id, item_ids)
        except PermanentError as exc:
            log.warning("release of basket %s refused (it will expire): %s", entry.order_id,
                        exc)
            return refusal_is_final
        except FulfilmentError as exc:
            log.warning("could not release basket %s (it will expire): %s", entry.order_id, exc)
            return False
        kept = set(item_ids) & set(_item_ids(answer))
        if kept:
            # Answered, yet not done (Onebox may ignore a release outside BASKET):
            # the seats stay held until the order expires, so they are waited out.
            log.warning("release of basket %s did not take: %d items still held (%s); "
                        "it will expire", entry.order_id, len(kept), answer.status)
            return False
        log.info("released %d items of basket %s", len(item_ids), entry.order_id)
        return known


# --- helpers -----------------------------------------------------------------------
@contextmanager
def _sending(ledger: Ledger, reference: str, step: str) -> Iterator[None]:
    """Mark a non-repeatable basket call as sent just before it goes out.

    That is once the rate limit's wait is over (``before_send``): a worker
    stopped while it waits (a soft time limit) has sent nothing, and its basket
    is not abandoned. If the call fails in a way that says it was not done, the
    mark is cleared; if its outcome is unknown, or the worker dies, the mark
    stays and the next run abandons the basket. The caller clears it with the
    call's result.
    """
    marked = False

    def mark() -> None:
        nonlocal marked
        if not marked:
            ledger.record(reference, pending=step)
            marked = True

    with before_send(mark):
        try:
            yield
        except (TransientError, PermanentError):
            if marked:
                ledger.record(reference, pending=None)
            raise


def _reread(services: Services, reference: str) -> Entry:
    entry = services.ledger.get(reference)
    if entry is None:
        raise UnknownIntentError(f"ledger entry for {reference} vanished")
    return entry


def _free_orphans(services: Services, reference: str) -> bool:
    """Clear our abandoned baskets once; True if the seat is worth asking for again (one
    was released, holds on, or is gone: an expiry Onebox had not swept yet).

    An abandoned basket's content is unknown, and a call of ours may land there
    late (Onebox finishing it after we gave up), holding seats and restarting
    its expiry, so waiting out the expiry we computed is not always enough.
    Once it has passed, each abandoned basket is listed (setting the buyer
    again answers with the whole order) and its items released. A basket that
    cannot be listed or released is waited for once more (our call touched
    it). Each is tried once: probing for ever would keep it alive for ever.
    """
    entry = _reread(services, reference)
    if not entry.orphans:
        return False
    released = held_on = gone = False
    for order_id in entry.orphans:
        with bound(step="release", order_id=order_id):
            try:
                items = _item_ids(services.client.set_buyer(order_id, entry.intent.buyer))
                if items:
                    services.client.release_seats(order_id, items)
                    log.info("released %d items our abandoned basket still held", len(items))
                    released = True
            except PermanentError as exc:
                if exc.code == ORDER_NOT_FOUND:
                    gone = True  # expired just now, maybe: its seats are free to ask for
                else:
                    log.info("abandoned basket %s holds on (%s): waiting for it", order_id,
                             exc.code)
                    held_on = True
            except FulfilmentError as exc:
                log.info("could not clear abandoned basket %s (%s): waiting for it", order_id,
                         exc.code)
                held_on = True
    ttl = entry.basket_ttl or DEFAULT_BASKET_TTL
    wait = {"orphan_expires": services.clock() + ttl + 1.0} if held_on else {}
    services.ledger.record(reference, orphans=[], **wait)
    return released or held_on or gone


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
            order_id: str | None = None, error: ResultError | None = None,
            hold_expires_at: datetime | None = None) -> OrderResult:
    return OrderResult(
        result_id=result_id_for(entry.reference),
        reference=entry.reference,
        status=status,
        batch=entry.result_batch,
        order_code=_clip(order_code),
        order_id=_clip(order_id if status == CONFIRMED else entry.order_id),
        error=error,
        attempts=max(entry.attempts, 1),  # cancelled before any run: none yet
        submitted_at=entry.submitted_at,
        finished_at=datetime.fromtimestamp(services.clock(), UTC),
        metadata=entry.result_metadata,
        # The intent's shop (a settled outcome: the unsettled one's, the intent is gone).
        shop=entry.stored_intent.shop if entry.stored_intent is not None
        else entry.outcome.shop if entry.outcome is not None else None,
        hold_expires_at=hold_expires_at,
    )


# --- the operator's settlement -------------------------------------------------------
def settle(services: Services, reference: str, *, notified: bool = False) -> OrderResult | None:
    """Settle an ``unsettled`` purchase now that Onebox may answer; publish the outcome.

    Reads the order by its code (fencing it if it is still pre-confirmed), and
    replaces the unsettled outcome by ``confirmed`` or ``failed``, published
    with the same ``result_id``. Returns the outcome that stands: still
    ``unsettled`` when Onebox cannot tell yet. Anything else is left as it is.
    ``notified``: Onebox's PURCHASE webhook for the order came (signature checked).
    """
    entry = _reread(services, reference)
    if entry.outcome is None or entry.outcome.status != UNSETTLED or entry.code is None:
        return entry.outcome
    lease = services.leases.take(reference)
    if lease is None:
        raise TransientError("a worker holds this intent; try again", code="BUSY")
    with lease, services.ledger.fenced(lease.key, lease.token), bound(reference=reference,
                                                                       step="settle"):
        order, settled = _settle_for_failure(services, entry)
        if order is not None and order.status == "CONFIRM":
            outcome = _result(services, entry, CONFIRMED, order_code=order.code or entry.code,
                              order_id=order.id)
        elif settled:
            error = ResultError(code="CONFIRM_NOT_DONE", step="confirm",
                                message="settled later: Onebox never confirmed the order")
            outcome = _result(services, entry, FAILED, error=error)
        elif notified or _purchase_notified(services, entry.code):
            # No read answers, but Onebox said so itself: its signed PURCHASE webhook.
            outcome = _result(services, entry, CONFIRMED, order_code=entry.code,
                              order_id=entry.order_id)
            log.warning("Onebox's PURCHASE webhook for order %s settles it", entry.code)
        else:
            log.warning("still unsettled: Onebox cannot tell yet")
            return entry.outcome
        stands = services.ledger.settle(reference, outcome)
        _publish(services, reference)
        log.warning("settled: %s", stands.status)
        return stands


def _purchase_notified(services: Services, code: str) -> bool:
    """Did Onebox's PURCHASE webhook for this order code come (signature checked)?

    Onebox sends it as the order is bought, often before the purchase has its
    outcome; the receiver keeps the mark (``fulfilment.webhooks``), so the
    scheduled settling takes it as Onebox's positive answer when reads give none.
    """
    return bool(services.ledger.redis.exists(services.ledger.keys.webhook_seen(code,
                                                                               "PURCHASE")))
