"""Refunds, exactly once: recorded before sent, read back when the answer is lost.

A refund request (``schemas.refund``) is admitted to its own ledger entry,
``<prefix>:refund:{<id>}``, before anything is sent: the same id again is a
duplicate (the same refund), the same id for another refund a conflict. The
entry then moves through

    recorded --(mark, as the POST goes out)--> sent --(answer)--> refunded | failed
        ^                                        |
        +------ a refusal: nothing was done -----+

``advance_refund`` does what is owed, under a short lease (one worker at a
time), and records each step before the next:

- ``recorded``: the order code is found (given, or the purchase's: only a
  confirmed purchase can be refunded), then the refund is marked ``sent``
  just before it goes out (``before_send``: after the token and the rate
  limit's wait) and posted. Its answer settles it: ``refunded``; a 409
  ``PRODUCT_STATE_INVALID`` (the items were refunded already) is success too;
  a refusal (4xx) is ``failed``; a call the guard held back, a 429 or a 503
  did nothing, so the mark goes back to ``recorded`` and the refund is retried.
- ``sent`` with no answer recorded (lost in a timeout, a 5xx, or the worker
  died): the order is read by its code first. Every item refunded: done,
  nothing sent again. Not refunded: the lost call did not take, and the
  refund is sent again. A read Onebox refuses (401, 403, 404) proves nothing
  either way; then the refund is sent again, which the contract makes safe:
  an item refunded already answers 409, never a second refund.

Exactly one outcome per refund id is written (the first stands) and then
published, ``refund.refunded`` or ``refund.failed`` on the results exchange.
The entry stays in ``Keys.open_refunds`` until it is published, so the
refunds owed something can always be found (``stuck``).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from marshmallow import ValidationError

from fulfilment.errors import (
    AlreadyRefundedError,
    FulfilmentError,
    HeldBackError,
    InvalidMessageError,
    OutcomeUnknownError,
    PermanentError,
    TransientError,
)
from fulfilment.flow import Services
from fulfilment.keys import Keys
from fulfilment.lease import Lease
from fulfilment.ledger import UNREADABLE, Entry, LeaseLostError
from fulfilment.logcontext import bound
from fulfilment.onebox.auth import AuthRefusedError
from fulfilment.onebox.guard import before_send
from fulfilment.redact import scrub
from fulfilment.redis_text import text
from schemas.onebox import ITEM_REFUNDED, Order
from schemas.refund import (
    REFUND_FAILED,
    REFUNDED,
    RefundRequest,
    RefundResult,
    dump_refund,
    dump_refund_result,
    load_refund,
    load_refund_result,
    refund_fingerprint,
    refund_result_id,
)
from schemas.result import CONFIRMED, UNSETTLED, ResultError

log = logging.getLogger(__name__)

#: The states of a refund entry (see the module docstring).
RECORDED, SENT = "recorded", "sent"
#: Onebox answered "an item refunded already" for several items: read, never send, until
#: the order shows which were.
CONFLICT = "conflict"
#: Ours: why a refund of a purchase is refused (at submission, or by the worker).
UNKNOWN_PURCHASE = "UNKNOWN_PURCHASE"
PURCHASE_NOT_FINISHED = "PURCHASE_NOT_FINISHED"
PURCHASE_UNSETTLED = "PURCHASE_UNSETTLED"
PURCHASE_NOT_CONFIRMED = "PURCHASE_NOT_CONFIRMED"
ITEMS_NOT_IN_ORDER = "ITEMS_NOT_IN_ORDER"
#: Ours: a refund was sent and Onebox never said, by the deadline, whether it was done.
REFUND_OUTCOME_UNKNOWN = "REFUND_OUTCOME_UNKNOWN"
#: Ours: refused as refunded already, and the order unreadable, for a refund of several items.
REFUND_UNREADABLE = "REFUND_UNREADABLE"
ORDER_NOT_FOUND = "ORDER_NOT_FOUND"
#: Seconds a worker waits for another that holds the refund's lease.
HELD_RETRY = 1.0


class UnreadableYetError(TransientError):
    """Onebox answered "an item refunded already" for a refund of several, and will not
    let the order be read: asked again until the deadline, without using up attempts."""


class Admission(enum.Enum):
    """What admitting a refund request made of it."""

    NEW = "new"
    DUPLICATE = "duplicate"  # the same refund id and refund: taken once already
    CONFLICT = "conflict"  # the same refund id for another refund: refused


class RefundRefusedError(PermanentError):
    """The refund cannot be taken: the purchase is unknown, not confirmed, or lacks the items."""

    default_code = "REFUND_REFUSED"


class RefundConflictError(PermanentError):
    """The refund id was used before for another refund (other target, items or surcharges)."""

    default_code = "REFUND_ID_CONFLICT"


class UnknownRefundError(PermanentError):
    """No ledger entry for this refund id (never admitted, or past its retention)."""

    default_code = "UNKNOWN_REFUND"


# --- the refund's ledger entry --------------------------------------------------------

# KEYS: entry, open set. ARGV: fingerprint, request json, retention, id, submission id,
# now (Redis's clock). The submission id makes a call redis-py retried after a timeout
# answer "new" again rather than "duplicate" of itself.
_ADMIT = """
local existing = redis.call('HGET', KEYS[1], 'fingerprint')
if existing then
  if existing ~= ARGV[1] then return 'conflict' end
  if redis.call('HGET', KEYS[1], 'submission') == ARGV[5] then return 'new' end
  return 'duplicate'
end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'request', ARGV[2], 'submission', ARGV[5],
           'state', 'recorded', 'created_at', ARGV[6], 'updated_at', ARGV[6], 'sends', 0,
           'failures', 0, 'published', 0)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[4])
return 'new'
"""

# Every later write: never re-creates a gone entry (-1), refuses a worker whose lease
# passed to another (-2). KEYS: entry, open set, lease. ARGV: now, retention, id, lease
# token, field to increment or ''.
_GUARD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('GET', KEYS[3]) ~= ARGV[4] then return -2 end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
"""

# ARGV[6..]: field/value pairs. Returns the incremented count, or 0.
_RECORD = _GUARD + """
if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[3])
if ARGV[5] ~= '' then return redis.call('HINCRBY', KEYS[1], ARGV[5], 1) end
return 0
"""

# ARGV[6]: the outcome (JSON), ARGV[7]: its status. The first outcome stands: returned.
_FINISH = _GUARD + """
local stands = redis.call('HGET', KEYS[1], 'outcome')
if not stands then
  redis.call('HSET', KEYS[1], 'outcome', ARGV[6], 'state', ARGV[7])
  stands = ARGV[6]
end
return stands
"""

# The outcome is on the results exchange: the refund is owed nothing more.
_PUBLISHED = _GUARD + """
redis.call('HSET', KEYS[1], 'published', 1)
redis.call('ZREM', KEYS[2], ARGV[3])
return 0
"""


@dataclass(frozen=True)
class RefundEntry:
    """Where one refund stands."""

    refund_id: str
    request: RefundRequest
    state: str
    created_at: float
    #: The order code, once found (the request's, or its purchase's).
    code: str | None = None
    sends: int = 0
    failures: int = 0
    outcome: RefundResult | None = None
    published: bool = False


class RefundLedger:
    """Reads and writes refund entries; every write one atomic script."""

    def __init__(self, client: redis.Redis, keys: Keys, retention: int,
                 clock: Callable[[], float]) -> None:
        self.redis = client
        self.keys = keys
        self._retention = retention
        self._clock = clock
        self._admit = client.register_script(_ADMIT)
        self._record = client.register_script(_RECORD)
        self._finish = client.register_script(_FINISH)
        self._published = client.register_script(_PUBLISHED)

    @classmethod
    def of(cls, services: Services) -> RefundLedger:
        """The refund ledger beside the purchase ledger: same Redis, prefix, retention, clock."""
        return cls(services.ledger.redis, services.ledger.keys,
                   services.settings.ledger_retention, services.clock)

    def admit(self, request: RefundRequest) -> Admission:
        """Record a new refund, or say it is a duplicate or a conflicting reuse of its id."""
        document = json.dumps(dump_refund(request), separators=(",", ":"))
        answer = self._admit(
            keys=[self.keys.refund(request.id), self.keys.open_refunds],
            args=[refund_fingerprint(request), document, self._retention, request.id,
                  uuid.uuid4().hex, repr(self._clock())])
        return Admission(text(answer))

    def get(self, refund_id: str) -> RefundEntry | None:
        raw = self.redis.hgetall(self.keys.refund(refund_id))
        if not raw:
            return None
        fields = {text(k): text(v) for k, v in raw.items()}
        outcome = fields.get("outcome")
        return RefundEntry(
            refund_id=refund_id,
            request=load_refund(fields["request"]),
            state=fields.get("state", RECORDED),
            created_at=float(fields.get("created_at", 0)),
            code=fields.get("code") or None,
            sends=int(fields.get("sends", 0)),
            failures=int(fields.get("failures", 0)),
            outcome=load_refund_result(outcome) if outcome else None,
            published=fields.get("published") == "1",
        )

    def record(self, lease: Lease, refund_id: str, *, count: str = "",
               **changes: str) -> int:
        """Write fields (and, with ``count``, add one to that field: its new value)."""
        pairs = [str(part) for name, value in changes.items() for part in (name, value)]
        return int(self._write(self._record, lease, refund_id, count, *pairs))

    def finish(self, lease: Lease, refund_id: str, outcome: RefundResult) -> RefundResult:
        """Write the outcome unless one stands already; return the one that stands."""
        document = json.dumps(dump_refund_result(outcome), separators=(",", ":"))
        return load_refund_result(text(self._write(self._finish, lease, refund_id, "",
                                                   document, outcome.status)))

    def mark_published(self, lease: Lease, refund_id: str) -> None:
        self._write(self._published, lease, refund_id, "")

    def _write(self, script: Any, lease: Lease, refund_id: str, *args: Any) -> Any:
        answer = script(keys=[self.keys.refund(refund_id), self.keys.open_refunds, lease.key],
                        args=[repr(self._clock()), self._retention, refund_id, lease.token,
                              *args])
        if answer == -1:
            raise UnknownRefundError(f"no ledger entry for refund {refund_id}")
        if answer == -2:
            raise LeaseLostError(f"the lease on refund {refund_id} passed to another worker")
        return answer

    def take_lease(self, services: Services, refund_id: str) -> Lease | None:
        """The refund's lease (renewed while held, as an intent's), or None while another
        worker holds it."""
        key, token = self.keys.refund_lease(refund_id), uuid.uuid4().hex
        taken = self.redis.set(key, token, nx=True, px=int(services.leases.ttl * 1000))
        if taken or text(self.redis.get(key)) == token:
            return Lease(services.leases, key, token)
        return None

    def stuck(self, older_than: float, limit: int = 500) -> list[str]:
        """Refund ids owed something whose last progress is older than ``older_than``."""
        found = self.redis.zrangebyscore(self.keys.open_refunds, "-inf", older_than,
                                          start=0, num=limit)
        return [text(refund_id) for refund_id in found]

    def touch(self, refund_id: str) -> None:
        """Count now as progress (the sweep, as it dispatches the refund again), so the
        next sweep gives that dispatch ``stuck_after`` to work; never re-adds a finished one."""
        self.redis.zadd(self.keys.open_refunds, {refund_id: self._clock()}, xx=True)

    def forget_open(self, refund_id: str) -> None:
        """Take a refund out of the open set: its entry is gone, published, or unreadable."""
        self.redis.zrem(self.keys.open_refunds, refund_id)


# --- taking a request in ---------------------------------------------------------------

@dataclass(frozen=True)
class RefundSubmission:
    """What became of one refund request handed in."""

    refund_id: str
    status: str  # accepted | duplicate
    #: The outcome of a duplicate whose refund is done already.
    outcome: RefundResult | None = None


def parse_refund(raw: RefundRequest | Mapping[str, Any] | str | bytes) -> RefundRequest:
    """The request, or ``InvalidMessageError`` naming each bad field."""
    if isinstance(raw, RefundRequest):
        return raw
    try:
        return load_refund(raw)
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        raise InvalidMessageError("invalid refund request",
                                  {scrub(k) if isinstance(k, str) else k: v
                                   for k, v in messages.items()}) from None


def purchase_refusal(purchase: Entry | None, request: RefundRequest) -> PermanentError | None:
    """Why a refund of this purchase cannot be done, or None (it is confirmed, with the items)."""
    reference = request.reference
    if purchase is None:
        return RefundRefusedError(f"no purchase {reference} in the ledger (unknown, or past "
                                  "its retention): name the order code instead",
                                  code=UNKNOWN_PURCHASE)
    outcome = purchase.outcome
    if outcome is None:
        return RefundRefusedError(f"purchase {reference} has no outcome yet: only a confirmed "
                                  "purchase can be refunded", code=PURCHASE_NOT_FINISHED)
    if outcome.status == UNSETTLED:
        return RefundRefusedError(f"purchase {reference} is unsettled: settle it first "
                                  f"(fulfilment settle {reference})", code=PURCHASE_UNSETTLED)
    if outcome.status != CONFIRMED or not (outcome.order_code or purchase.code):
        return RefundRefusedError(f"purchase {reference} was not confirmed: nothing was bought, "
                                  "nothing to refund", code=PURCHASE_NOT_CONFIRMED)
    foreign = sorted(set(request.items) - set(purchase.item_ids)) if purchase.item_ids else []
    if foreign:
        return RefundRefusedError(f"items {foreign} are not in purchase {reference}'s order "
                                  f"(its items: {list(purchase.item_ids)})",
                                  code=ITEMS_NOT_IN_ORDER)
    return None


def submit_refund(services: Services, raw: RefundRequest | Mapping[str, Any] | str | bytes,
                  dispatch: Callable[[Mapping[str, Any]], None]) -> RefundSubmission:
    """Validate, check the purchase, admit, then hand the request to ``dispatch``.

    Raises ``InvalidMessageError``, ``RefundRefusedError`` (nothing admitted) or
    ``RefundConflictError``. A duplicate that has no outcome yet is dispatched
    again: harmless (one worker at a time acts on it, and its entry says where
    it stands), and it restarts one whose first dispatch was lost.
    """
    request = parse_refund(raw)
    if request.reference is not None:
        refusal = purchase_refusal(services.ledger.get(request.reference), request)
        if refusal is not None:
            raise refusal
    store = RefundLedger.of(services)
    admission = store.admit(request)
    if admission is Admission.CONFLICT:
        raise RefundConflictError(f"refund id {request.id} was used before for another refund")
    entry = store.get(request.id) if admission is Admission.DUPLICATE else None
    if entry is not None and entry.outcome is not None and entry.published:
        return RefundSubmission(request.id, "duplicate", entry.outcome)
    dispatch(dump_refund(request))
    return RefundSubmission(request.id, "accepted" if admission is Admission.NEW
                            else "duplicate")


# --- doing it -------------------------------------------------------------------------

@dataclass(frozen=True)
class Finished:
    """The refund has its outcome, published."""

    outcome: RefundResult


@dataclass(frozen=True)
class RetryLater:
    """Not now: run again after ``delay`` seconds."""

    delay: float
    reason: str


Decision = Finished | RetryLater


def take_and_advance(services: Services, request: RefundRequest) -> Decision:
    """Admit the request (a message may come from anywhere) and do what is owed."""
    if RefundLedger.of(services).admit(request) is Admission.CONFLICT:
        raise RefundConflictError(f"refund id {request.id} was used before for another refund")
    return advance_refund(services, request.id)


def advance_refund(services: Services, refund_id: str) -> Decision:
    """Bring the refund to a published outcome, or say when to try again."""
    store = RefundLedger.of(services)
    entry = store.get(refund_id)
    if entry is None:
        raise UnknownRefundError(f"no ledger entry for refund {refund_id}")
    if entry.outcome is not None and entry.published:
        return Finished(entry.outcome)
    lease = store.take_lease(services, refund_id)
    if lease is None:
        return RetryLater(HELD_RETRY, "another worker holds this refund")
    with lease, bound(reference=entry.request.reference or refund_id, order_id=entry.code,
                      step="refund"):
        run = _Run(services, store, lease, refund_id)
        try:
            return run.attempt()
        except LeaseLostError as exc:
            log.warning("%s; handing the refund over", exc)
            return RetryLater(services.leases.ttl, exc.code)


class _Run:
    """One worker's turn at one refund, holding its lease."""

    def __init__(self, services: Services, store: RefundLedger, lease: Lease,
                 refund_id: str) -> None:
        self.services, self.store, self.lease, self.refund_id = services, store, lease, refund_id
        self.client = services.client

    def entry(self) -> RefundEntry:
        entry = self.store.get(self.refund_id)
        if entry is None:
            raise UnknownRefundError(f"ledger entry of refund {self.refund_id} vanished")
        return entry

    def record(self, **changes: str) -> None:
        self.store.record(self.lease, self.refund_id, **changes)

    def attempt(self) -> Decision:
        try:
            self.run()
        except (LeaseLostError, UnknownRefundError):
            raise  # not about the refund: about this worker's right to work on it
        except (OutcomeUnknownError, TransientError) as exc:
            return self.retry_or_fail(exc)
        except PermanentError as exc:
            self.fail(exc)
        return Finished(self.publish())

    # --- the states -------------------------------------------------------------
    def run(self) -> None:
        entry = self.entry()
        if entry.outcome is not None:
            return
        code = entry.code or self.order_code(entry)
        if code is None:
            return  # refused: the outcome is written
        items = entry.request.items
        with bound(order_id=code):
            if entry.state == CONFLICT:
                self.already_refunded(entry, code, items)
                return
            if entry.state == SENT:
                # A refund may have been done: ask Onebox before sending another.
                order = self.read_back(code)
                if order is not None and order.refunded(items):
                    log.info("read back order %s: refunded; nothing sent again", code)
                    self.refunded(entry, code, order, already=False)
                    return
                if order is not None:
                    log.info("read back order %s: not refunded; sending the refund again", code)
                self.record(state=RECORDED)
            self.send(entry, code, items)

    def order_code(self, entry: RefundEntry) -> str | None:
        """The order to refund: the request's, or its purchase's (confirmed only)."""
        request = entry.request
        code: str | None = request.order_code
        if code is None:
            assert request.reference is not None
            purchase = self.services.ledger.get(request.reference)
            refusal = purchase_refusal(purchase, request)
            if refusal is not None:
                self.fail(refusal)
                return None
            assert purchase is not None and purchase.outcome is not None
            code = purchase.outcome.order_code or purchase.code
        assert code is not None
        self.record(code=code)
        return code

    def read_back(self, code: str) -> Order | None:
        """The order by code; None when Onebox will not say (401, 403, 404)."""
        try:
            return self.client.get_order(code)
        except AuthRefusedError as exc:
            unread: FulfilmentError = exc
        except PermanentError as exc:
            if exc.code != ORDER_NOT_FOUND:
                raise
            unread = exc
        # Sending again is safe: Onebox answers 409 for an item refunded already.
        log.info("order %s cannot be read back (%s): sending the refund again", code,
                 unread.code)
        return None

    def send(self, entry: RefundEntry, code: str, items: tuple[int, ...], *,
             again: bool = False) -> None:
        def mark_sent() -> None:
            # As the request goes out (after the token and the rate limit's wait),
            # never after: a worker killed while it waits has sent nothing.
            self.store.record(self.lease, self.refund_id, count="sends", state=SENT)

        try:
            with before_send(mark_sent):
                order = self.client.refund(code, items, surcharges=entry.request.surcharges)
        except AlreadyRefundedError as exc:
            # Nothing done now, and the items named were refunded before: success,
            # once the order shows every item of this refund refunded.
            self.record(state=RECORDED)
            if again:  # refused twice in one run: the order changes under us; later
                raise TransientError(exc.message, code=exc.code, status=exc.status,
                                     trace_id=exc.trace_id, step="refund") from None
            self.already_refunded(entry, code, items)
            return
        except (TransientError, PermanentError):
            # Never sent, or refused (429, 503, 4xx): nothing was done. An unknown
            # outcome keeps the mark: the next run reads the order back first.
            self.record(state=RECORDED)
            raise
        self.refunded(entry, code, order, already=False)

    def already_refunded(self, entry: RefundEntry, code: str, items: tuple[int, ...]) -> None:
        try:
            order = self.client.get_order(code)
        except FulfilmentError as exc:
            if len(items) == 1:
                # The contract's word: 409 PRODUCT_STATE_INVALID is "already refunded",
                # and it names the one item asked for.
                log.info("order %s answered already refunded; it cannot be read (%s)", code,
                         exc.code)
                self.finish(entry, REFUNDED, code=code, items=items, already=True)
                return
            # One of several items was refunded before: which, the read must say. Sending
            # again would only be refused again (or, lost, leave us where we are).
            self.record(state=CONFLICT)
            raise UnreadableYetError(
                f"order {code} answered 409 (an item refunded already) and cannot be read "
                f"({exc.code}): which of the items were refunded is unknown; read again later",
                code=REFUND_UNREADABLE, step="refund", trace_id=exc.trace_id,
                retry_after=exc.retry_after) from None
        if order.refunded(items):
            log.info("order %s was refunded already", code)
            self.refunded(entry, code, order, already=True)
            return
        # Some of the items were refunded before, by another request: refund the rest.
        states = {item.id: item.state for item in order.items}
        rest = tuple(item_id for item_id in (items or tuple(states))
                     if states.get(item_id) != ITEM_REFUNDED)
        log.info("order %s: %d of the items refunded before; refunding the other %d", code,
                 len(items or states) - len(rest), len(rest))
        self.send(entry, code, rest, again=True)

    def refunded(self, entry: RefundEntry, code: str, order: Order, *, already: bool) -> None:
        items = entry.request.items or tuple(item.id for item in order.items)
        self.finish(entry, REFUNDED, code=order.code or code, items=items, already=already)

    # --- when things go wrong ---------------------------------------------------------
    def retry_or_fail(self, exc: FulfilmentError) -> Decision:
        """Retry after a backoff unless failures or time ran out (``FULFILMENT_RETRY_*``)."""
        policy = self.services.policy
        # Never sent, or waiting for Onebox to let us read: waiting, not failing.
        counts = not isinstance(exc, HeldBackError | UnreadableYetError)
        failures = (self.store.record(self.lease, self.refund_id, count="failures")
                    if counts else 1)
        delay = policy.delay(failures, exc.retry_after)
        elapsed = max(self.services.clock() - self.entry().created_at, 0.0)
        if policy.gives_up(failures if counts else 0, elapsed, delay):
            self.fail(exc)
            return Finished(self.publish())
        with bound(trace=exc.trace_id):
            log.warning("refund not done yet (%s); retrying in %.2fs", exc.code, delay)
        return RetryLater(delay, exc.code)

    def fail(self, exc: FulfilmentError) -> None:
        entry = self.entry()
        if entry.state == SENT and entry.code is not None:
            # It may have been done: failed only if Onebox shows it not done.
            order: Order | None = None
            with contextlib.suppress(FulfilmentError):
                order = self.client.get_order(entry.code)
            if order is not None and order.refunded(entry.request.items):
                self.refunded(entry, entry.code, order, already=False)
                return
            if order is None:
                exc = OutcomeUnknownError(
                    f"a refund of order {entry.code} was sent and Onebox never said whether "
                    f"it was done ({exc.code}): read the order before refunding again",
                    code=REFUND_OUTCOME_UNKNOWN, step="refund", trace_id=exc.trace_id)
        with bound(trace=exc.trace_id):
            log.warning("refund failed: %s", exc)
        error = ResultError(code=exc.code, message=exc.message, step=exc.step or "refund",
                            retryable=exc.retryable, trace_id=exc.trace_id)
        self.finish(entry, REFUND_FAILED, code=entry.code, error=error)

    # --- the outcome ------------------------------------------------------------------
    def finish(self, entry: RefundEntry, status: str, *, code: str | None,
               items: tuple[int, ...] = (), already: bool = False,
               error: ResultError | None = None) -> None:
        request = entry.request
        outcome = RefundResult(
            result_id=refund_result_id(entry.refund_id), refund_id=entry.refund_id,
            status=status, reference=request.reference, order_code=code[:64] if code else None,
            items=tuple(items), already_refunded=already, error=error,
            attempts=max(entry.sends, 1),
            requested_at=datetime.fromtimestamp(entry.created_at, UTC),
            finished_at=datetime.fromtimestamp(self.services.clock(), UTC),
            metadata=request.metadata)
        stands = self.store.finish(self.lease, self.refund_id, outcome)
        log.info("refund %s %s", self.refund_id, stands.status)

    def publish(self) -> RefundResult:
        entry = self.entry()
        assert entry.outcome is not None
        if not entry.published:
            with bound(step="publish"):
                self.services.publisher.publish_refund(entry.outcome)
            self.store.mark_published(self.lease, self.refund_id)
        return entry.outcome


def resume_stuck(services: Services, dispatch: Callable[[Mapping[str, Any]], None], *,
                 older_than: float, limit: int = 500) -> list[str]:
    """Dispatch again every refund owed something with no progress for ``older_than``
    seconds (its message was lost): the recovery sweep's part for refunds.

    Each is marked as progressing before it is dispatched, so the next sweep leaves
    it be for ``older_than``; the refund's lease keeps a late original from racing it.
    A passing Redis error drops nothing (it is raised; the next sweep finds it again).
    """
    store = RefundLedger.of(services)
    resumed = []
    for refund_id in store.stuck(services.clock() - older_than, limit=limit):
        try:
            entry = store.get(refund_id)
        except UNREADABLE as exc:
            log.exception("refund entry %s is unreadable; sent to the failures queue",
                          refund_id)
            services.publisher.publish_failure(
                f"unreadable refund entry: {type(exc).__name__}", {"refund_id": [refund_id]},
                None)
            store.forget_open(refund_id)
            continue
        if entry is None or (entry.outcome is not None and entry.published):
            store.forget_open(refund_id)  # expired, or done meanwhile
            continue
        store.touch(refund_id)
        with bound(reference=entry.request.reference or refund_id, step="sweep"):
            log.info("refund %s stuck (%s): dispatched again", refund_id, entry.state)
        dispatch(dump_refund(entry.request))
        resumed.append(refund_id)
    return resumed


__all__ = ["Admission", "Decision", "Finished", "RefundConflictError", "RefundEntry",
           "RefundLedger", "RefundRefusedError", "RefundSubmission", "RetryLater",
           "UnknownRefundError", "advance_refund", "parse_refund", "purchase_refusal",
           "resume_stuck", "submit_refund", "take_and_advance"]
