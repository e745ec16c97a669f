"""The purchase as a Celery chain of thin tasks: basket -> confirm.

``basket`` (on the intake queue) creates the order, adds the seats of every
item and attaches the buyer; ``confirm`` (on the continue queue, so purchases
under way are not held behind a backlog of new ones) pre-confirms, confirms and
publishes the outcome. A broker hop costs about 2.5 ms of worker CPU and buys
nothing between those steps: the ledger records progress after every call, so
a retry resumes at the call it stopped on. Each task decodes its argument, asks
``fulfilment.flow.advance`` to bring the intent up to its stage, and either
passes the reference on or schedules its own retry.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import redis
from celery import Task, chain
from celery.canvas import Signature
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.signals import task_failure
from kombu.exceptions import OperationalError

from fulfilment import flow, tracing
from fulfilment.flow import RetryIn, Stage, UnknownIntentError
from fulfilment.keys import Keys
from fulfilment.owed import OwedDispatches
from schemas.result import OrderResult
from tasks import runtime
from tasks.app import app
from tasks.brokerwatch import broker_errors, caused_by_broker

log = logging.getLogger(__name__)

_REFERENCE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
#: Redis or broker blips: retried with backoff by Celery itself (nothing was recorded).
INFRA_ERRORS = (redis.RedisError, ConnectionError, OperationalError)


AnyTask = Task[Any, Any]


def _advance(task: AnyTask, reference: object, stage: Stage) -> str:
    """The reference, passed on to the next task; the last task returns ``summary``."""
    if not isinstance(reference, str) or not _REFERENCE.fullmatch(reference):
        runtime.services().publisher.publish_failure(
            "task argument is not a reference", {"reference": ["invalid"]}, repr(reference)[:200])
        raise Ignore()
    tracing.annotate(reference=reference, attempt=task.request.retries + 1)
    try:
        decision = flow.advance(runtime.services(), reference, stage,
                                attempt=task.request.retries + 1)
    except UnknownIntentError as exc:
        runtime.services().publisher.publish_failure(exc.message, {}, reference)
        raise Ignore() from None
    except SoftTimeLimitExceeded:
        # The flow recorded what it had sent; the next run settles it.
        raise task.retry(countdown=1.0, max_retries=None) from None
    if isinstance(decision, RetryIn):
        log.info("retrying %s of %s in %.2fs (%s)", stage.name, reference, decision.delay,
                 decision.reason)
        raise task.retry(countdown=decision.delay, max_retries=None)
    if stage is Stage.PUBLISHED and decision.outcome is not None:
        tracing.annotate(status=decision.outcome.status, order_code=decision.outcome.order_code)
        return summary(decision.outcome)
    return reference


def _stage_task(name: str, stage: Stage) -> AnyTask:
    """A bound task that brings an intent up to ``stage``; Redis blips retry with backoff."""

    def run(self: AnyTask, reference: str) -> str:
        return _advance(self, reference, stage)

    run.__name__ = run.__qualname__ = name.rsplit(".", 1)[-1]
    run.__doc__ = f"Bring an intent up to {stage.name}."
    return app.task(name=name, bind=True, acks_late=True, autoretry_for=INFRA_ERRORS,
                    retry_backoff=True, retry_backoff_max=30, max_retries=None)(run)


def summary(outcome: OrderResult) -> str:
    """What the chain's last task returns: Flower and ``celery events`` tell outcomes apart.

    ``confirmed: <order code>``, ``failed: <error code>`` or ``unsettled: <error
    code>``: identifiers only, never personal data. Celery puts the return value
    in the task-succeeded event (and its "succeeded" log line) even though
    results are not stored, so a failed purchase no longer reads as a success.
    """
    if outcome.error is None:
        return f"{outcome.status}: {outcome.order_code}"
    return f"{outcome.status}: {outcome.error.code}"


basket = _stage_task("fulfilment.basket", Stage.BASKET)
confirm = _stage_task("fulfilment.confirm", Stage.PUBLISHED)
#: No longer in the chain (``confirm`` pre-confirms, and publishes the outcome it
#: recorded); kept so that chains an earlier version queued still finish.
pre_confirm = _stage_task("fulfilment.pre_confirm", Stage.PRE_CONFIRMED)
publish = _stage_task("fulfilment.publish", Stage.PUBLISHED)


def purchase_chain(reference: str) -> Signature[Any]:
    return chain(basket.si(reference), confirm.s())


def dispatch(reference: str, *, new_trace: bool = False) -> None:
    """Start (or restart) the purchase of an admitted intent.

    If the broker cannot take it, the intent is marked as owed a dispatch
    (``fulfilment.owed``) and the error raised: a worker sends it as soon as it
    has the broker back, not after the recovery sweep's wait. ``new_trace``: the
    intent gets a trace of its own (dispatched among many by a fan-out or a
    sweep) rather than joining the caller's.
    """
    with tracing.intent_span(reference, new_trace=new_trace):
        try:
            purchase_chain(reference).apply_async()
        except broker_errors() as exc:
            owe([reference], exc)
            raise


def resume(reference: str) -> None:
    """Dispatch again an intent the recovery sweep found stuck: in a trace of its own."""
    dispatch(reference, new_trace=True)


@app.task(name="fulfilment.dispatch_batch", bind=True, acks_late=True,
          autoretry_for=INFRA_ERRORS, retry_backoff=True, retry_backoff_max=30, max_retries=None)
def dispatch_batch(self: AnyTask, references: object) -> int:
    """Start the purchase chain of each admitted reference: a bulk upload's fan-out.

    The producer admits a chunk of intents in one Redis round trip and sends
    this one small message for all of them, instead of one chain per intent;
    a worker turns it into the chains. Delivered again (a worker died midway),
    it starts them again: harmless, as any redelivered chain is (the ledger
    and the lease make the work happen once). Lost before it ran, its intents
    are resumed by the recovery sweep, as any admitted intent without a task.
    """
    items = references if isinstance(references, list) else [references]
    started = 0
    for index, reference in enumerate(items):
        if isinstance(reference, str) and _REFERENCE.fullmatch(reference):
            try:
                with tracing.intent_span(reference, new_trace=True):
                    purchase_chain(reference).apply_async()
            except broker_errors() as exc:
                # This one and the rest were not sent; those before it were.
                owe([r for r in items[index:] if isinstance(r, str) and _REFERENCE.fullmatch(r)],
                    exc)
                raise
            started += 1
        else:
            runtime.services().publisher.publish_failure(
                "task argument is not a reference", {"reference": ["invalid"]},
                repr(reference)[:200])
    log.info("fan-out: %d purchases started", started)
    return started


def dispatch_many(references: Sequence[str]) -> None:
    """Start the purchases of many admitted intents with one broker message
    (marked as owed, as ``dispatch`` does, if the broker cannot take it)."""
    try:
        dispatch_batch.apply_async(args=(list(references),))
    except broker_errors() as exc:
        owe(references, exc)
        raise


def owe(references: Sequence[str], exc: BaseException) -> None:
    """Mark these admitted intents as owed a dispatch; never hides the dispatch's error."""
    services = runtime.services()
    try:
        marked = OwedDispatches(services.ledger.redis, Keys(services.settings.key_prefix)
                                ).mark(references)
    except redis.RedisError as redis_exc:
        log.error("dispatch of %d intents failed (%s) and Redis could not mark them owed (%s): "
                  "the recovery sweep resumes them", len(references), type(exc).__name__,
                  type(redis_exc).__name__)
        return
    log.debug("dispatch of %d intents failed (%s); %d marked owed", len(references),
              type(exc).__name__, marked)


@task_failure.connect
def _next_step_not_sent(sender: Any = None, exception: BaseException | None = None,
                        args: Any = None, **_: Any) -> None:
    """A stage whose work is done but whose next task could not be sent (the broker went
    away after it ran) fails in Celery's trace: its intent is owed a dispatch."""
    if getattr(sender, "name", None) not in _STAGES or not caused_by_broker(exception):
        return
    reference = args[0] if isinstance(args, list | tuple) and args else None
    if isinstance(reference, str) and _REFERENCE.fullmatch(reference):
        owe([reference], exception or OperationalError())


_STAGES = {basket.name, confirm.name, pre_confirm.name, publish.name}
