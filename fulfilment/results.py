"""Publishing outcomes to the results queue, and reading them back.

Results are published with kombu, persistent, to a durable exchange, and the
publish is retried across broker hiccups. Delivery is at least once: a
consumer may see one outcome twice (a worker died between publishing and
recording that it had), and drops the second by its ``result_id``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from kombu import Connection
from kombu.exceptions import KombuError
from kombu.pools import producers
from marshmallow import ValidationError

from fulfilment.callbacks import CallbackOutbox
from fulfilment.outage import BrokerOutage
from fulfilment.topology import FAILURE_KEY, Topology, refund_routing_key, routing_key_for
from schemas.aftersale import (
    AftersaleEvent,
    dump_aftersale,
    load_aftersale,
    routing_key_for_action,
)
from schemas.refund import RefundResult, dump_refund_result, load_refund_result
from schemas.result import OrderResult, dump_result, load_result

log = logging.getLogger(__name__)

RETRY_POLICY = {"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5,
                "interval_max": 3.0}
#: Characters of a refused message's payload kept on the failures queue: any valid
#: intent (at most 65,536 bytes) fits whole; a larger message is cut.
FAILURE_PAYLOAD_LIMIT = 65_536
#: Characters of a refusal's reason.
FAILURE_REASON_LIMIT = 500


def failure_body(reason: str, errors: Any, payload: str | bytes | None) -> dict[str, Any]:
    """The failures queue's message: reason, field errors, the payload cut to its bound."""
    if isinstance(payload, bytes):
        payload = payload.decode("utf-8", "replace")
    body: dict[str, Any] = {"reason": reason[:FAILURE_REASON_LIMIT], "errors": errors,
                            "payload": payload}
    if payload is not None and len(payload) > FAILURE_PAYLOAD_LIMIT:
        body.update(payload=payload[:FAILURE_PAYLOAD_LIMIT], payload_truncated=True,
                    payload_size=len(payload))
    return body


class ResultPublisher:
    """Puts outcomes (and refused messages) on the broker; with ``callbacks``, also leaves
    each outcome in the callback outbox for the shop's URL (``fulfilment.callbacks``)."""

    def __init__(self, connection: Connection, topology: Topology,
                 callbacks: CallbackOutbox | None = None) -> None:
        self._connection = connection
        self._topology = topology
        self._callbacks = callbacks

    def on(self, connection: Connection) -> ResultPublisher:
        """This publisher on another broker connection (a thread of its own needs one)."""
        return ResultPublisher(connection, self._topology, self._callbacks)

    def publish(self, result: OrderResult) -> None:
        if self._callbacks is not None:
            # First, so that the flow's "published" mark follows both: a publish retried
            # after a broker error queues no second callback (the outbox knows it).
            self._callbacks.add(result)
        body = dump_result(result)
        self._send(body, self._topology.results_exchange, routing_key_for(result.status),
                   self._topology.results_queue, headers={"result_id": result.result_id,
                                                          "reference": result.reference})
        log.info("published %s result %s", result.status, result.result_id)

    def publish_refund(self, result: RefundResult) -> None:
        """A refund's outcome: ``refund.refunded`` or ``refund.failed`` on the results exchange."""
        body = dump_refund_result(result)
        self._send(body, self._topology.results_exchange, refund_routing_key(result.status),
                   self._topology.refunds_queue, headers={"result_id": result.result_id,
                                                          "refund_id": result.refund_id})
        log.info("published %s refund result %s", result.status, result.result_id)

    def publish_aftersale(self, event: AftersaleEvent) -> None:
        """An after-sale event (``schemas.aftersale``) for the shop, on its own queue."""
        self._send(dump_aftersale(event), self._topology.results_exchange,
                   routing_key_for_action(event.action), self._topology.aftersale_queue,
                   headers={"event_id": event.event_id, "order_code": event.order_code})
        log.info("published after-sale %s of order %s", event.action, event.order_code)

    def publish_failure(self, reason: str, errors: Any, payload: str | bytes | None) -> None:
        """A message that could not be taken in: its reason and the raw payload.

        The payload may hold personal data: it goes to this queue, where an
        operator can fix and resubmit it, and never to a log. It is cut to
        ``FAILURE_PAYLOAD_LIMIT`` characters (``payload_truncated`` then says
        so, ``payload_size`` gives the original length), so a 50 MB message
        pushed by mistake cannot make a 50 MB failure.
        """
        body = failure_body(reason, errors, payload)
        self._send(body, self._topology.failures_exchange, FAILURE_KEY,
                   self._topology.failures_queue, headers={})
        log.warning("message refused and sent to the failures queue: %s", reason)

    def _send(self, body: Any, exchange: Any, routing_key: str, queue: Any,
              headers: dict[str, str]) -> None:
        with producers[self._connection].acquire(block=True, timeout=30) as producer:
            producer.publish(
                body, exchange=exchange, routing_key=routing_key, serializer="json",
                delivery_mode=2, declare=[exchange, queue], headers=headers,
                retry=True, retry_policy=RETRY_POLICY,
            )


def consume_results(connection: Connection, topology: Topology, *, timeout: float = 1.0,
                    idle_timeout: float | None = None,
                    limit: int | None = None) -> Iterator[OrderResult]:
    """Yield results as they arrive; each is acknowledged once the caller takes the next.

    Stops after ``idle_timeout`` seconds without a message (never, if None), or
    after ``limit`` messages: the last one is acknowledged too, when the caller
    comes back for more (iterate to the end rather than ``break``: a message
    whose caller broke off is left unacknowledged and is delivered again).
    """
    return _to_failures(connection, topology, topology.results_queue, load=load_result,
                        name="results", timeout=timeout, idle_timeout=idle_timeout, limit=limit)


def consume_refund_results(connection: Connection, topology: Topology, *,
                           timeout: float = 1.0, idle_timeout: float | None = None,
                           limit: int | None = None) -> Iterator[RefundResult]:
    """Yield refund outcomes from the refunds queue, as ``consume_results`` does results."""
    return _to_failures(connection, topology, topology.refunds_queue, load=load_refund_result,
                        name="refunds", timeout=timeout, idle_timeout=idle_timeout, limit=limit)


def consume_failures(connection: Connection, topology: Topology, *, timeout: float = 1.0,
                     idle_timeout: float | None = None,
                     limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield refused messages (reason, errors, payload) from the failures queue.

    A message there that is not such an object is yielded as one, with the
    reason ``unreadable message on the failures queue`` and its text as payload.
    """
    def unreadable(raw: str | None, exc: Exception) -> dict[str, Any]:
        return failure_body(f"unreadable message on the failures queue: {type(exc).__name__}",
                            {}, raw)

    yield from _consume(connection, topology.failures_queue, _failure, timeout, idle_timeout,
                        limit=limit, unreadable=unreadable)


def consume_aftersale(connection: Connection, topology: Topology, *, timeout: float = 1.0,
                      idle_timeout: float | None = None,
                      limit: int | None = None) -> Iterator[AftersaleEvent]:
    """Yield after-sale events as ``consume_results`` yields results (same acknowledgement
    rule); an unreadable one goes to the failures queue."""
    return _to_failures(connection, topology, topology.aftersale_queue, load=load_aftersale,
                        name="after-sale", timeout=timeout, idle_timeout=idle_timeout,
                        limit=limit)


def _to_failures(connection: Connection, topology: Topology, queue: Any, *,
                 load: Callable[[Any], Any], name: str, timeout: float,
                 idle_timeout: float | None, limit: int | None) -> Iterator[Any]:
    """``_consume``, a message that does not load sent to the failures queue: not ours, or
    corrupted, it is kept for an operator, and never a reason to stop reading."""
    publisher = ResultPublisher(connection, topology)

    def unreadable(raw: str | None, exc: Exception) -> None:
        publisher.publish_failure(
            f"unreadable message on the {name} queue: {type(exc).__name__}", {}, raw)

    return _consume(connection, queue, load, timeout, idle_timeout, limit=limit,
                    unreadable=unreadable)


def _failure(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict) or not isinstance(payload.get("reason"), str):
        raise TypeError("not a failure object")
    return payload


#: What decoding and loading a message that is not ours may raise.
UNREADABLE = (ValueError, TypeError, ValidationError, KombuError)


def _consume(connection: Connection, queue: Any, load: Callable[[Any], Any], timeout: float,
             idle_timeout: float | None, *, limit: int | None = None,
             unreadable: Callable[[str | None, Exception], Any] | None = None) -> Iterator[Any]:
    """Read ``queue``; when the broker connection drops, reconnect with backoff and go on.

    A message is acknowledged only when the caller asks for the next one, that
    is after it has handled (written out) this one. A message taken but not yet
    acknowledged when the connection dropped stays unacknowledged on the broker
    and is delivered again: at least once, as the consumer contract says.
    """
    recoverable = tuple(connection.recoverable_connection_errors)
    # One warning when it goes, one when it is back (the CLI shows warnings only).
    outage = BrokerOutage("results consumer", end_level=logging.WARNING)
    last_message = time.monotonic()
    taken = 0
    if limit is not None and limit <= 0:
        return
    while True:
        simple = None
        try:
            _connect(connection, idle_timeout, last_message, outage)
            simple = connection.SimpleQueue(queue)
            outage.restored()
            while True:
                try:
                    message = simple.get(block=True, timeout=timeout)
                except simple.Empty:
                    if idle_timeout is not None and time.monotonic() - last_message >= idle_timeout:
                        return
                    continue
                last_message = time.monotonic()
                try:
                    item = load(_decoded(message))
                except UNREADABLE as exc:
                    if unreadable is None:
                        raise
                    item = unreadable(_text(message.body), exc)
                    if item is None:  # handled (sent to the failures queue): next one
                        message.ack()
                        continue
                yield item
                message.ack()
                taken += 1
                if limit is not None and taken >= limit:
                    return
        except recoverable as exc:
            outage.lost(exc, what="reconnecting; a result taken but not yet acknowledged "
                                  "comes again")
            _close_quietly(simple)
            simple = None
            _close_quietly(connection)
        finally:
            _close_quietly(simple)


def _decoded(message: Any) -> Any:
    payload = message.payload
    if isinstance(payload, str | bytes):
        payload = json.loads(payload)
    return payload


def _text(body: Any) -> str | None:
    if body is None:
        return None
    return body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)


def _connect(connection: Connection, idle_timeout: float | None, last_message: float,
             outage: BrokerOutage) -> None:
    """(Re)connect with exponential backoff: for ever, or until the idle time is up."""
    def retrying(exc: Exception, interval: float) -> None:
        outage.lost(exc, what="reconnecting")
        log.debug("broker unreachable (%s); retrying in %.1f s", type(exc).__name__, interval)

    remaining = None if idle_timeout is None else idle_timeout - (time.monotonic() - last_message)
    # kombu takes floats and None here (its type stubs say int).
    backoff: dict[str, Any] = {
        "max_retries": None, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 5.0,
        "timeout": None if remaining is None else max(remaining, 0.1)}
    connection.ensure_connection(errback=retrying, **backoff)


def _close_quietly(resource: Any) -> None:
    """Close a queue or connection whose broker may be gone; whatever it raises, it is closed."""
    if resource is None:
        return
    # kombu's Redis transport may raise AttributeError (not only connection
    # errors) while closing a channel whose connection is already torn down.
    with contextlib.suppress(Exception):
        resource.close()


def summary(outcome: OrderResult | RefundResult) -> str:
    """What a purchase chain's last task returns (a refund task too): Flower and ``celery
    events`` tell outcomes apart.

    ``confirmed: <order code>``, ``failed: <error code>`` or ``unsettled: <error
    code>``: identifiers only, never personal data. Celery puts the return value
    in the task-succeeded event (and its "succeeded" log line) even though
    results are not stored, so a failed purchase no longer reads as a success.
    """
    if outcome.error is None:
        return f"{outcome.status}: {outcome.order_code}"
    return f"{outcome.status}: {outcome.error.code}"
