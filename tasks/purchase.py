"""The purchase as a Celery chain of thin tasks: basket -> confirm.

``basket`` (on the live queue for a live intent, the bulk queue for a bulk
one) creates the order, adds the seats of every item and attaches the buyer;
``confirm`` (on the continue queue, so purchases under way are not held behind
a backlog of new ones) pre-confirms, confirms and publishes the outcome, then
releases the next bulk intent (``fulfilment.release``). A broker hop costs
about 2.5 ms of worker CPU and buys nothing between those steps: the ledger
records progress after every call, so a retry resumes at the call it stopped
on. Each task decodes its argument, asks ``fulfilment.flow.advance`` to bring
the intent up to its stage, and either passes the reference on or schedules
its own retry.
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
from fulfilment.flow import Held, RetryIn, Stage, UnknownIntentError
from fulfilment.keys import Keys
from fulfilment.owed import OwedDispatches
from fulfilment.release import BulkGate, BulkRelease
from fulfilment.results import summary
from schemas.intent import BULK, LIVE
from tasks import runtime
from tasks.app import app
from tasks.brokerwatch import INFRA_ERRORS, broker_errors, caused_by_broker

log = logging.getLogger(__name__)

_REFERENCE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


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
    if isinstance(decision, Held):
        # Waiting for the shop takes no worker: its bulk slot goes to the next intent.
        tracing.annotate(status=decision.result.status, order_code=decision.result.order_code)
        top_up(reference)
        return summary(decision.result)
    if stage is Stage.PUBLISHED and decision.outcome is not None:
        tracing.annotate(status=decision.outcome.status, order_code=decision.outcome.order_code)
        top_up(reference)
        return summary(decision.outcome)
    return reference


def top_up(finished: str) -> None:
    """A purchase has its outcome: out of the bulk in-flight set, and release the next.

    Never fails the task (its work is done and recorded): a lost top-up costs a
    slot until celery beat's release tidies the in-flight set.
    """
    try:
        bulk_gate().top_up(finished=finished, limit=BULK_TOP_UP)
    except Exception as exc:
        if not isinstance(exc, (*INFRA_ERRORS, *broker_errors())):
            raise
        log.warning("could not release the next bulk intents (%s): celery beat's release "
                    "does", type(exc).__name__)


#: Most bulk intents a worker releases when one purchase ends (one frees one slot; a few
#: more make up for a top-up lost earlier).
BULK_TOP_UP = 4


def bulk_gate() -> BulkGate:
    """The deployment's bulk flow control, sending what it releases to the bulk queue."""
    services = runtime.services()
    release = _releases.get(id(services))
    if release is None:
        release = BulkRelease(services.ledger.redis, Keys(services.settings.key_prefix),
                              in_flight=services.settings.bulk_in_flight, clock=services.clock)
        _releases.clear()
        _releases[id(services)] = release
    return BulkGate(release, dispatch_released)


def dispatch_released(references: Sequence[str]) -> None:
    """Send released bulk intents: a few as chains (a worker's top-up), many as fan-outs."""
    if len(references) > BULK_TOP_UP:
        dispatch_many(references)
        return
    for index, reference in enumerate(references):
        try:
            dispatch(reference, new_trace=True)
        except broker_errors() as exc:
            owe(references[index + 1:], exc)  # dispatch owed its own already
            raise


_releases: dict[int, BulkRelease] = {}


def _stage_task(name: str, stage: Stage) -> AnyTask:
    """A bound task that brings an intent up to ``stage``; Redis blips retry with backoff."""

    def run(self: AnyTask, reference: str) -> str:
        return _advance(self, reference, stage)

    run.__name__ = run.__qualname__ = name.rsplit(".", 1)[-1]
    run.__doc__ = f"Bring an intent up to {stage.name}."
    return app.task(name=name, bind=True, acks_late=True, autoretry_for=INFRA_ERRORS,
                    retry_backoff=True, retry_backoff_max=30, max_retries=None)(run)


basket = _stage_task("fulfilment.basket", Stage.BASKET)
confirm = _stage_task("fulfilment.confirm", Stage.PUBLISHED)
#: No longer in the chain (``confirm`` pre-confirms, and publishes the outcome it
#: recorded); kept so that chains an earlier version queued still finish.
pre_confirm = _stage_task("fulfilment.pre_confirm", Stage.PRE_CONFIRMED)
publish = _stage_task("fulfilment.publish", Stage.PUBLISHED)


def purchase_chain(reference: str, lane: str = BULK) -> Signature[Any]:
    """basket on the lane's queue, then confirm on the continue queue (its route)."""
    first = basket.si(reference)
    if lane == LIVE:
        keys = Keys(runtime.services().settings.key_prefix)
        first = first.set(queue=keys.live_queue, routing_key=keys.live_queue)
    return chain(first, confirm.s())


def dispatch_live(reference: str) -> None:
    """Start the purchase of an admitted live intent (on the live queue)."""
    dispatch(reference, lane=LIVE)


def dispatch_many_live(references: Sequence[str]) -> None:
    """Start the purchases of admitted live intents with one message on the live queue."""
    dispatch_many(references, lane=LIVE)


def dispatch(reference: str, *, new_trace: bool = False, lane: str = BULK) -> None:
    """Start (or restart) the purchase of an admitted intent.

    If the broker cannot take it, the intent is marked as owed a dispatch
    (``fulfilment.owed``) and the error raised: a worker sends it as soon as it
    has the broker back, not after the recovery sweep's wait. ``new_trace``: the
    intent gets a trace of its own (dispatched among many by a fan-out or a
    sweep) rather than joining the caller's.
    """
    with tracing.intent_span(reference, new_trace=new_trace):
        try:
            purchase_chain(reference, lane).apply_async()
        except broker_errors() as exc:
            owe([reference], exc)
            raise


def resume(reference: str) -> None:
    """Dispatch again an intent the recovery sweep found stuck: in a trace of its own."""
    dispatch(reference, new_trace=True)


@app.task(name="fulfilment.dispatch_batch", bind=True, acks_late=True,
          autoretry_for=INFRA_ERRORS, retry_backoff=True, retry_backoff_max=30, max_retries=None)
def dispatch_batch(self: AnyTask, references: object, lane: object = BULK) -> int:
    """Start the purchase chain of each admitted reference: a fan-out.

    A producer admits a chunk of live intents in one Redis round trip and sends
    this one small message for all of them (on the live queue), instead of one
    chain per intent; flow control releases bulk intents the same way (on the
    bulk queue); a worker turns it into the chains, on the same lane. Delivered
    again (a worker died midway), it starts them again: harmless, as any
    redelivered chain is (the ledger and the lease make the work happen once).
    Lost before it ran, its intents are resumed by the recovery sweep, as any
    admitted intent without a task.
    """
    items = references if isinstance(references, list) else [references]
    lane = LIVE if lane == LIVE else BULK
    started = 0
    for index, reference in enumerate(items):
        if isinstance(reference, str) and _REFERENCE.fullmatch(reference):
            try:
                with tracing.intent_span(reference, new_trace=True):
                    purchase_chain(reference, lane).apply_async()
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


def dispatch_many(references: Sequence[str], lane: str = BULK) -> None:
    """Start the purchases of many admitted intents with one broker message
    (marked as owed, as ``dispatch`` does, if the broker cannot take it)."""
    try:
        if lane == LIVE:
            keys = Keys(runtime.services().settings.key_prefix)
            dispatch_batch.apply_async(args=(list(references),), kwargs={"lane": LIVE},
                                       queue=keys.live_queue, routing_key=keys.live_queue)
        else:
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


@app.task(name="fulfilment.maintenance.release_bulk", ignore_result=True)
def release_bulk() -> int:
    """celery beat's safety net: tidy the bulk in-flight set, release what there is room for."""
    return bulk_gate().safety_net(runtime.services().settings)
