"""Refunds on the queue: the ``fulfilment.refund`` task and the ``refund()`` Python API.

The task's one argument is the refund request itself (JSON, ``schemas.refund``),
so any producer that can put a Celery message on the queue can ask for a
refund. The task validates it (an invalid one goes to the failures queue with
its reasons, as an invalid intent does), admits it to the refund ledger (a
duplicate of an admitted request is the same refund) and asks
``fulfilment.refunds`` to do what is owed; it only schedules the retries the
answer asks for. It runs on the continue queue: a refund is short, and must
not wait behind a backlog of new purchases.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from fulfilment import refunds
from fulfilment.errors import InvalidMessageError
from fulfilment.logcontext import bound
from fulfilment.refunds import RefundConflictError, RefundSubmission, RetryLater
from fulfilment.results import summary
from schemas.refund import RefundRequest
from tasks import runtime
from tasks.app import app
from tasks.brokerwatch import INFRA_ERRORS, broker_errors

log = logging.getLogger(__name__)

AnyTask = Task[Any, Any]


@app.task(name="fulfilment.refund", bind=True, acks_late=True, autoretry_for=INFRA_ERRORS,
          retry_backoff=True, retry_backoff_max=30, max_retries=None)
def refund_task(self: AnyTask, request: object) -> str:
    """Bring one refund request to its published outcome (``refunded`` or ``failed``)."""
    services = runtime.services()
    try:
        parsed = refunds.parse_refund(request if isinstance(request, dict | str) else "")
    except InvalidMessageError as exc:
        services.publisher.publish_failure(exc.message, exc.errors, _text(request))
        raise Ignore() from None
    try:
        with bound(reference=parsed.reference or parsed.id, attempt=self.request.retries + 1):
            decision = refunds.take_and_advance(services, parsed)
    except RefundConflictError as exc:
        services.publisher.publish_failure(exc.message, {"refund_id": ["Used before for "
                                                                       "another refund."]},
                                           _text(request))
        raise Ignore() from None
    except SoftTimeLimitExceeded:
        # What was sent is recorded; the next run reads it back first.
        raise self.retry(countdown=1.0, max_retries=None) from None
    if isinstance(decision, RetryLater):
        with bound(reference=parsed.reference or parsed.id):
            log.info("retrying refund %s in %.2fs (%s)", parsed.id, decision.delay,
                     decision.reason)
        raise self.retry(countdown=decision.delay, max_retries=None)
    return summary(decision.outcome)


def dispatch_refund(document: Mapping[str, Any]) -> None:
    """Put an admitted refund request on the continue queue (its task's route)."""
    refund_task.apply_async(args=(dict(document),))


def refund(reference: str | None = None, *, order_code: str | None = None,
           items: list[int] | tuple[int, ...] | None = None, refund_id: str | None = None,
           reason: str | None = None, surcharges: bool = True,
           metadata: Mapping[str, Any] | None = None) -> RefundSubmission:
    """Refund a confirmed purchase (by ``reference``) or an order (``order_code``).

    Whole, or only ``items`` (Onebox item ids). Validated, checked against the
    purchase ledger (only a confirmed purchase can be refunded) and recorded
    before it is queued. Raises ``InvalidMessageError``, ``RefundRefusedError``
    (nothing recorded) or ``RefundConflictError`` (``refund_id`` used for
    another refund); the broker's error if it cannot take the message (the
    refund is recorded: calling again with the same id sends it again).
    """
    document: dict[str, Any] = {}
    for key, value in (("reference", reference), ("order_code", order_code),
                       ("refund_id", refund_id), ("reason", reason)):
        if value is not None:
            document[key] = value
    if items:
        document["items"] = list(items)
    if not surcharges:
        document["surcharges"] = False
    if metadata:
        document["metadata"] = dict(metadata)
    return submit_refund(document)


def submit_refund(request: RefundRequest | Mapping[str, Any] | str | bytes) -> RefundSubmission:
    """``refund`` for a request document (JSON text or a mapping)."""
    services = runtime.services()
    runtime.check_durable_once()
    try:
        return refunds.submit_refund(services, request, dispatch_refund)
    except broker_errors():
        log.warning("the broker did not take the refund; it is recorded, and submitting it "
                    "again sends it")
        raise


def _text(request: object) -> str:
    if isinstance(request, str):
        return request
    try:
        return json.dumps(request)
    except (TypeError, ValueError):
        return repr(request)[:200]
