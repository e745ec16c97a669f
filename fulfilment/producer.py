"""Taking intents in: validate, admit to the ledger, then dispatch.

Nothing is enqueued for an intent that fails its contract (the error names
each bad field), nor twice for one reference: the same reference with the same
payload is a duplicate and is taken once; with a different payload it is a
conflict and is refused, as payment APIs treat a reused idempotency key.
How an admitted intent is dispatched (a Celery chain) is the caller's business:
this module never imports Celery.

Lanes: a ``live`` intent is dispatched at once (to the live queue, served
before bulk work); a ``bulk`` intent is parked in Redis behind its shop's and
released as capacity frees (``fulfilment.release``). ``submit`` defaults to
live, ``submit_many`` to bulk; ``lane=`` changes the default, and an intent's
own ``lane`` wins over both.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis
from kombu.exceptions import OperationalError
from marshmallow import ValidationError

from fulfilment.errors import InvalidMessageError, PermanentError
from fulfilment.ledger import Admission, Ledger
from fulfilment.redact import scrub
from fulfilment.release import BulkGate
from schemas.intent import BULK, LANES, LIVE, MAX_MESSAGE_BYTES, PurchaseIntent, load_intent

log = logging.getLogger(__name__)

ACCEPTED, DUPLICATE, REFUSED = "accepted", "duplicate", "refused"

RawIntent = PurchaseIntent | Mapping[str, Any] | str | bytes


class ReferenceConflictError(PermanentError):
    """The reference was used before for a different purchase."""

    default_code = "REFERENCE_CONFLICT"


@dataclass(frozen=True)
class Submission:
    """What became of one submitted intent."""

    reference: str | None
    status: str  # accepted | duplicate | refused
    errors: Mapping[str, Any] = field(default_factory=dict)
    reason: str | None = None
    #: Accepted (admitted), but the broker did not take its purchase: it waits in the
    #: ledger, and the recovery sweep starts it (``FULFILMENT_STUCK_AFTER``).
    awaiting_dispatch: bool = False
    #: The lane it was admitted in (accepted only).
    lane: str | None = None


def parse_intent(raw: RawIntent, *, max_quantity: int) -> PurchaseIntent:
    """The intent, or ``InvalidMessageError`` with the errors of each field."""
    if isinstance(raw, PurchaseIntent):
        return raw
    try:
        return load_intent(raw, max_quantity=max_quantity)
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        raise InvalidMessageError("invalid purchase intent", _scrub_keys(messages)) from None


def _scrub_keys(messages: Mapping[Any, Any]) -> dict[Any, Any]:
    """Field errors keep the producer's field names; one may be an e-mail typed as a key."""
    return {scrub(key) if isinstance(key, str) else key:
            _scrub_keys(value) if isinstance(value, Mapping) else value
            for key, value in messages.items()}


def reference_of(raw: RawIntent) -> str | None:
    """The reference of a possibly invalid intent, for error reports."""
    if isinstance(raw, PurchaseIntent):
        return raw.reference
    if isinstance(raw, str | bytes):
        if len(raw) > MAX_MESSAGE_BYTES:
            return None  # refused unread: not parsed here either
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deeply
            return None
    value = raw.get("reference") if isinstance(raw, Mapping) else None
    return value if isinstance(value, str) and len(value) <= 64 else None


#: Intents admitted per Redis round trip (and dispatched per fan-out message).
CHUNK = 500
#: What a dispatch raises when the broker did not take the message: the
#: intents stay admitted (admission is the acceptance) and wait for the sweep.
DISPATCH_ERRORS: tuple[type[Exception], ...] = (OperationalError, ConnectionError,
                                                TimeoutError, redis.RedisError)
#: Seconds a producer stops trying the broker after it refused a dispatch.
DISPATCH_RETRY_AFTER = 5.0


class Producer:
    """Validates, admits and dispatches intents.

    ``dispatch`` starts the purchase of one admitted reference; ``dispatch_many``
    of many at once (one broker message for all: see ``tasks.purchase``). Either
    may fail after admission: the intents stay admitted, and the recovery sweep
    resumes any admitted intent whose dispatch was lost. A dispatch the broker
    refuses (``DISPATCH_ERRORS``) is no failure of the submission: its intents
    are reported accepted, ``awaiting_dispatch``, with one warning when the
    broker starts refusing and one line when it takes messages again; the
    producer tries it again ``DISPATCH_RETRY_AFTER`` seconds later, not sooner,
    so a file goes on at Redis's pace while the broker is away.

    ``dispatch`` and ``dispatch_many`` start live intents. With ``bulk``, bulk
    intents are parked and released through it (flow control and fair shares);
    without it (tests, the embedded demo) they are dispatched as live ones.
    """

    def __init__(self, ledger: Ledger, dispatch: Callable[[str], None], *,
                 max_quantity: int,
                 dispatch_many: Callable[[Sequence[str]], None] | None = None,
                 bulk: BulkGate | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ledger = ledger
        self._dispatch = dispatch
        self._dispatch_many = dispatch_many
        self._bulk = bulk
        self._max_quantity = max_quantity
        self._clock = clock
        self._broker_refused_at: float | None = None

    @property
    def max_quantity(self) -> int:
        """The largest ``quantity`` an intent may ask for here (``FULFILMENT_MAX_QUANTITY``)."""
        return self._max_quantity

    def submit(self, raw: RawIntent, *, lane: str = LIVE) -> Submission:
        """Take one intent in; raise ``InvalidMessageError`` or ``ReferenceConflictError``.

        ``lane``: the lane of an intent that names none (live: a checkout)."""
        intent = _in_lane(parse_intent(raw, max_quantity=self._max_quantity), lane)
        admission = self._ledger.admit(intent)
        if admission is Admission.CONFLICT:
            raise ReferenceConflictError(_conflict(intent.reference))
        if admission is Admission.DUPLICATE:
            log.info("intent %s is a duplicate; taken once already", intent.reference)
            return Submission(intent.reference, DUPLICATE)
        started = self._start([intent.reference], intent.lane, intent.shop) and \
            self._release_bulk(intent.lane)
        return Submission(intent.reference, ACCEPTED, awaiting_dispatch=not started,
                          lane=intent.lane)

    def submit_many(self, intents: Iterable[RawIntent], *, batch: str | None = None,
                    chunk: int = CHUNK, lane: str = BULK) -> Iterator[Submission]:
        """Take each intent in, in order; a refused one is reported, never raised.

        Streams: ``chunk`` intents are validated, admitted in one Redis round
        trip, dispatched, and only then reported (``accepted`` means admitted).
        While one chunk's admission is in flight (a thread waiting on the socket)
        the next chunk is validated and prepared here, so the round trip (an
        fsync, on a durable Redis) costs no validation time; at most two chunks
        are held at once. With ``batch``, an intent without a
        batch joins it, and one naming another batch is refused. ``lane``: the
        lane of intents that name none (bulk: an upload).
        """
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="admit") as admitting:
            in_flight: tuple[Future[list[Admission]], _Chunk] | None = None
            for group in _groups(intents, chunk):
                prepared = self._prepare(group, batch, lane)
                if in_flight is not None:
                    yield from self._complete(*in_flight)
                in_flight = (admitting.submit(self._ledger.send_admissions,
                                              self._ledger.prepare_admissions(prepared.intents)),
                             prepared)
            if in_flight is not None:
                yield from self._complete(*in_flight)

    def take_in(self, messages: Sequence[str | bytes]) -> list[Submission]:
        """Raw messages from the intake (any language): one chunk of ``submit_many``.

        One admission round trip and one fan-out for all; an answer for each, in
        order, never raised. A conflict names the ``reference`` field; a message
        no parser can read is refused with its error's type only (its text may
        quote the message), so no message can stall the intake.
        """
        answers: list[Submission | None] = []
        intents: list[PurchaseIntent] = []
        for message in messages:
            answer: Submission | None = None
            try:
                intents.append(parse_intent(message, max_quantity=self._max_quantity))
            except InvalidMessageError as exc:
                answer = Submission(reference_of(message), REFUSED, exc.errors, exc.message)
            except Exception as exc:  # noqa: BLE001 - no message may stall the intake
                log.error("intake: a message could not be parsed (%s)", type(exc).__name__)
                answer = Submission(None, REFUSED, {}, f"unreadable message: {type(exc).__name__}")
            answers.append(answer)
        # Intake intents are checkouts of other backends: live, unless they say bulk.
        admitted = iter(list(self.submit_many(intents, chunk=max(len(intents), 1), lane=LIVE)))
        return [answer or _as_conflict(next(admitted)) for answer in answers]

    def _prepare(self, raws: Sequence[RawIntent], batch: str | None, lane: str) -> _Chunk:
        prepared = _Chunk([None] * len(raws))
        for index, raw in enumerate(raws):
            try:
                intent = _in_lane(_in_batch(parse_intent(raw, max_quantity=self._max_quantity),
                                            batch), lane)
            except InvalidMessageError as exc:
                prepared.answers[index] = Submission(reference_of(raw), REFUSED, exc.errors,
                                                     exc.message)
            else:
                prepared.indexes.append(index)
                prepared.intents.append(intent)
        return prepared

    def _complete(self, admitting: Future[list[Admission]],
                  prepared: _Chunk) -> list[Submission]:
        answers = prepared.answers
        #: (lane, shop): index in the chunk -> reference
        accepted: dict[tuple[str | None, str | None], dict[int, str]] = {}
        for index, intent, admission in zip(prepared.indexes, prepared.intents,
                                            admitting.result(), strict=True):
            if admission is Admission.CONFLICT:
                answers[index] = Submission(intent.reference, REFUSED, {},
                                            _conflict(intent.reference))
            elif admission is Admission.DUPLICATE:
                log.info("intent %s is a duplicate; taken once already", intent.reference)
                answers[index] = Submission(intent.reference, DUPLICATE)
            else:
                accepted.setdefault((intent.lane, intent.shop), {})[index] = intent.reference
        started = {group: self._start(list(references.values()), *group, fan_out=True)
                   for group, references in accepted.items()}
        # Once every shop's intents are parked: the release takes turns between them.
        released = self._release_bulk(*(lane for lane, _ in accepted))
        for (lane, shop), group in accepted.items():
            sent = started[lane, shop] and (released or lane != BULK)
            for index, reference in group.items():
                answers[index] = Submission(reference, ACCEPTED, awaiting_dispatch=not sent,
                                            lane=lane)
        return [answer for answer in answers if answer is not None]

    def _release_bulk(self, *lanes: str | None) -> bool:
        """Release parked bulk intents as far as there is room (after parking some); False
        if the broker refused (or lately refused) what was released: the parked wait for
        it to be back, the released are owed."""
        if BULK in lanes and self._bulk is not None:
            return self._send(self._bulk.top_up)
        return True

    def _start(self, references: Sequence[str], lane: str | None, shop: str | None, *,
               fan_out: bool = False) -> bool:
        """Dispatch admitted intents, or park bulk ones; False if neither was done.

        Parked bulk intents are released (``_release_bulk``) as far as there
        is room; a release the broker refuses leaves them in flight and owed
        (sent again when the broker is back, or resumed by the sweep). A
        fan-out is one message: the broker takes all of it or none. One by
        one, the first refusal stops the rest (those sent are started twice at
        worst, by the sweep: harmless, as any redelivered chain is).
        """
        bulk = self._bulk
        if lane == BULK and bulk is not None:
            try:
                bulk.release.park(shop, references)
            except redis.RedisError as exc:
                # Admitted, not parked: open in the ledger, the sweep starts them.
                log.warning("admitted bulk intents could not be queued in Redis (%s): the "
                            "recovery sweep starts them", type(exc).__name__)
                return False
            return True
        return self._send(lambda: self._dispatch_now(references, fan_out))

    def _dispatch_now(self, references: Sequence[str], fan_out: bool) -> None:
        if fan_out and self._dispatch_many is not None:
            self._dispatch_many(references)
        else:
            for reference in references:
                self._dispatch(reference)

    def _send(self, send: Callable[[], object]) -> bool:
        """Run a send to the broker unless it refused one lately; False if it did not take it."""
        now = self._clock()
        refused_at = self._broker_refused_at
        if refused_at is not None and now - refused_at < DISPATCH_RETRY_AFTER:
            return False
        try:
            send()
        except DISPATCH_ERRORS as exc:
            if refused_at is None:
                log.warning("the broker did not take a dispatch (%s): admitted intents wait "
                            "in the ledger for the recovery sweep until it is back",
                            type(exc).__name__)
            self._broker_refused_at = now
            return False
        if refused_at is not None:
            log.warning("the broker takes dispatches again")
            self._broker_refused_at = None
        return True


@dataclass
class _Chunk:
    """One chunk on its way in: answers known so far, and the intents to admit."""

    answers: list[Submission | None]
    indexes: list[int] = field(default_factory=list)
    intents: list[PurchaseIntent] = field(default_factory=list)


def _groups(items: Iterable[RawIntent], size: int) -> Iterator[list[RawIntent]]:
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield group


def _as_conflict(answer: Submission) -> Submission:
    """A refusal at admission (a conflict: the intent was valid) names its field."""
    if answer.status != REFUSED:
        return answer
    return dataclasses.replace(answer, errors={"reference": [answer.reason]})


def _in_lane(intent: PurchaseIntent, lane: str) -> PurchaseIntent:
    """The intent with its lane said: its own, else ``lane``."""
    if lane not in LANES:
        raise ValueError(f"lane must be one of {', '.join(LANES)}")
    return intent if intent.lane is not None else dataclasses.replace(intent, lane=lane)


def _conflict(reference: str) -> str:
    return f"reference {reference} was already used for a different purchase"


def _in_batch(intent: PurchaseIntent, batch: str | None) -> PurchaseIntent:
    """The intent in ``batch``: given it when it names none, refused when it names another."""
    if batch is None or intent.batch == batch:
        return intent
    if intent.batch is None:
        return dataclasses.replace(intent, batch=batch)
    raise InvalidMessageError("invalid purchase intent", {
        "batch": [f"Names another batch than this upload's ({batch})."]})


def describe_errors(errors: Mapping[Any, Any] | list[Any], path: str = "") -> list[str]:
    """Marshmallow's nested messages as lines: ``buyer.email: Not a valid email address.``"""
    if isinstance(errors, list):
        return [f"{path or 'message'}: {message}" for message in errors if isinstance(message, str)]
    lines = []
    for key, value in errors.items():
        name = path if key == "_schema" else (f"{path}.{key}" if path else str(key))
        lines.extend(describe_errors(value, name))
    return lines
