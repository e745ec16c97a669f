"""The shop's say over a purchase under way: cancel it, confirm a hold; and holds that lapse.

Each request is answered by the purchase table (``fulfilment.states``) in one
Redis script on the intent's entry, so it is atomic against a worker mid-step:

- **cancel** records a stop while no confirm is marked sent (else: too late,
  and nothing changes). An intent no worker can be acting on (no basket, no
  call owed, no lease: it waits in its lane) gets its ``cancelled`` outcome in
  the same script, published here; any other is finished by a worker, which
  sees the stop at its next step (every ledger write tells it), releases the
  basket and writes the outcome. Those are sent on at once (``send_on``), so a
  purchase waiting out a backoff does not keep the shop waiting.
- **confirm** of a hold records the shop's confirm unless a stop is recorded
  or the hold's time has passed (on Redis's clock), and sends the purchase on.
- **lapsed holds** (celery beat, every ``FULFILMENT_RELEASE_INTERVAL``) get a
  stop ``expire`` unless the shop confirmed first, and are sent on; a worker
  releases the seats and writes ``expired``.

Asking twice gives the same answer: a stop is recorded once, an outcome once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial

from fulfilment.flow import Services, stopped_result
from fulfilment.ledger import Entry, UnknownIntentError
from fulfilment.logcontext import bound
from fulfilment.results import ResultPublisher
from fulfilment.wiring import broker_connection
from schemas.result import OrderResult

log = logging.getLogger(__name__)

#: References per pipelined round trip when cancelling many.
CHUNK = 500
#: Threads publishing the outcomes a big cancel wrote (see ``Stops._publish``).
PUBLISHERS = 4


@dataclass(frozen=True)
class Answer:
    """What became of one request: ``ok`` False means refused (or unknown: exit 1)."""

    reference: str
    verdict: str
    message: str
    ok: bool

    def __str__(self) -> str:
        return f"{self.reference}: {self.message}"


#: verdict -> (ok, message). The verdicts are the stop script's and the confirm script's.
_CANCEL = {
    "finished": (True, "cancelled"),
    "stopping": (True, "cancelled: the worker releases its seats and publishes the outcome"),
    "too_late": (False, "not cancelled: too late, confirm was sent"),
    "unknown": (False, "not cancelled: no such intent"),
}
_CONFIRM = {
    "accepted_held": (True, "confirming: the hold's confirm is being sent"),
    "accepted": (True, "confirm noted: it will not stop at the hold"),
    "too_late": (True, "already confirming"),
    "lapsed": (False, "not confirmed: the hold lapsed; its seats are being released"),
    "not_hold": (False, "not confirmed: this intent is not a hold (it confirms by itself)"),
    "stopped:cancel": (False, "not confirmed: it was cancelled"),
    "stopped:expire": (False, "not confirmed: the hold lapsed"),
    "unknown": (False, "not confirmed: no such intent"),
}


def _done(verdict: str, action: str) -> tuple[bool, str]:
    """An outcome stands: the same answer as the first time for what it asked."""
    status = verdict.split(":", 1)[1]
    if action == "cancel":
        return status == "cancelled", ("cancelled" if status == "cancelled" else
                                       f"not cancelled: {_already(status)}")
    return status == "confirmed", ("already confirmed" if status == "confirmed" else
                                   f"not confirmed: {_already(status)}")


def _already(status: str) -> str:
    if status in {"confirmed", "unsettled"}:
        return f"too late, confirm was sent (it is {status})"
    if status == "expired":
        return "the hold expired"
    return f"it is {status} already"


def _answer(reference: str, verdict: str, table: dict[str, tuple[bool, str]],
            action: str) -> Answer:
    ok, message = _done(verdict, action) if verdict.startswith("done:") else table[verdict]
    return Answer(reference, verdict, message, ok)


class Stops:
    """Cancel, confirm and lapse, on one deployment's ledger."""

    def __init__(self, services: Services, send_on: Callable[[Sequence[str]], None]) -> None:
        """``send_on``: dispatch these references to a worker now (the continue queue)."""
        self._services = services
        self._ledger = services.ledger
        self._send_on = send_on

    def cancel(self, references: Iterable[str]) -> Iterator[Answer]:
        """Cancel each reference; answers in order, ``CHUNK`` per round trip.

        Every stop is recorded first, chunk after chunk, and the outcomes written
        here are published after the last (also when the caller stops reading):
        publishing is one broker round trip each, and a batch's stops should not
        wait for it. An outcome not yet published is the sweep's to publish if
        this process dies first (its open set's score).
        """
        chunk: list[str] = []
        written: list[tuple[OrderResult, str | None]] = []
        try:
            for reference in references:
                chunk.append(reference)
                if len(chunk) >= CHUNK:
                    yield from self._cancel_chunk(chunk, written)
                    chunk = []
            if chunk:
                yield from self._cancel_chunk(chunk, written)
        finally:
            self._publish(written)

    def cancel_batch(self, batch: str) -> Iterator[Answer]:
        """Cancel every intent of the batch still without an outcome."""
        keys = self._ledger.keys
        open_ones = [reference.decode() if isinstance(reference, bytes) else str(reference)
                     for reference in self._ledger.redis.zrange(keys.batch_open(batch), 0, -1)]
        return self.cancel(open_ones)

    def confirm(self, reference: str) -> Answer:
        """The shop confirms a hold (it took the payment): the confirm is sent."""
        verdict = self._verdict(lambda: self._ledger.request_confirm(reference))
        if verdict in {"accepted_held", "lapsed"}:
            self._send_on([reference])
        with bound(reference=reference, step="confirm request"):
            log.info("shop's confirm: %s", verdict)
        return _answer(reference, verdict, _CONFIRM, "confirm")

    def expire_lapsed(self, limit: int = 500) -> int:
        """Record the stop of every hold whose time passed; send them on. How many."""
        ledger, lapsed = self._ledger, []
        for reference in ledger.lapsed_holds(self._services.clock(), limit=limit):
            verdict = self._verdict(partial(ledger.request_stop, reference, "expire", None,
                                            None))
            ledger.forget_hold(reference)
            if verdict == "stopping":
                lapsed.append(reference)
        if lapsed:
            self._send_on(lapsed)
            log.info("%d holds lapsed: released and published as expired", len(lapsed))
        return len(lapsed)

    def _cancel_chunk(self, references: Sequence[str],
                      written: list[tuple[OrderResult, str | None]]) -> list[Answer]:
        """Record a chunk's stops; the outcomes written now go to ``written``."""
        entries = self._ledger.get_many(references)
        outcomes = [self._outcome_now(entry) for entry in entries]
        verdicts = self._ledger.request_stops(list(zip(references, outcomes, strict=True)))
        answers, send = [], []
        for reference, (batch, outcome), verdict in zip(references, outcomes, verdicts,
                                                        strict=True):
            if verdict == "finished" and outcome is not None:
                written.append((outcome, batch))  # the script wrote this one, as it is
            elif verdict == "stopping":
                send.append(reference)
            answers.append(_answer(reference, verdict, _CANCEL, "cancel"))
        if send:
            self._send_on(send)
        return answers

    def _outcome_now(self, entry: Entry | None) -> tuple[str | None, OrderResult | None]:
        """The batch to count in, and the ``cancelled`` outcome to write at once if no
        worker can be acting on it (the script checks; None when it surely cannot)."""
        if entry is None or entry.finished:
            return None, None
        if entry.order_id is not None or entry.pending is not None:
            return entry.batch, None
        return entry.batch, stopped_result(self._services, replace(entry, stop="cancel"))

    def _publish(self, outcomes: Sequence[tuple[OrderResult, str | None]]) -> None:
        """Publish outcomes written here, then mark them published (a round trip a chunk);
        if this process dies between the two, the sweep publishes them again.

        More than a chunk: ``PUBLISHERS`` threads share them, each on a broker
        connection of its own (a publish is a round trip, an fsync on a durable
        Redis: they overlap).
        """
        if len(outcomes) <= CHUNK:
            self._publish_with(self._services.publisher, outcomes)
            return
        share = -(-len(outcomes) // PUBLISHERS)
        with ThreadPoolExecutor(PUBLISHERS, thread_name_prefix="cancel-publish") as pool:
            running = [pool.submit(self._publish_own, outcomes[start:start + share])
                       for start in range(0, len(outcomes), share)]
        for each in running:
            each.result()

    def _publish_own(self, outcomes: Sequence[tuple[OrderResult, str | None]]) -> None:
        with broker_connection(self._services.settings) as connection:
            self._publish_with(self._services.publisher.on(connection), outcomes)

    def _publish_with(self, publisher: ResultPublisher,
                      outcomes: Sequence[tuple[OrderResult, str | None]]) -> None:
        for start in range(0, len(outcomes), CHUNK):
            chunk = outcomes[start:start + CHUNK]
            for outcome, _ in chunk:
                publisher.publish(outcome)
            self._ledger.mark_many_published([(o.reference, batch) for o, batch in chunk])

    @staticmethod
    def _verdict(ask: Callable[[], str]) -> str:
        try:
            return ask()
        except UnknownIntentError:
            return "unknown"


__all__ = ["CHUNK", "PUBLISHERS", "Answer", "Stops"]
