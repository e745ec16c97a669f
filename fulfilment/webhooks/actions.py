"""What a webhook's task does: settle a purchase, or tell the shop of a refund or cancel.

Each is safe to run twice (the receiver may hand one webhook over twice: see
``fulfilment.webhooks.receiver``):

- PURCHASE: the intent whose order has this code (``Ledger.reference_for_code``)
  is settled if its outcome is ``unsettled`` (``flow.settle``), and left alone
  otherwise. A code we never recorded (an order sold elsewhere, or one whose
  code is past the retention) is nothing to do. Webhooks are a hint: what a
  dropped one missed, the scheduled settling still settles.
- REFUND, CANCEL: one after-sale event per (code, action) on the results
  exchange (``schemas.aftersale``). A worker takes a short lock, looks for the
  published mark, publishes, then writes the mark: a worker killed between
  publishing and marking leaves the event to be published again by the
  redelivered task, with the same ``event_id`` (at least once, as results are).
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from fulfilment import flow
from fulfilment.errors import TransientError
from fulfilment.flow import Services
from fulfilment.ledger import UnknownIntentError
from fulfilment.logcontext import bound
from fulfilment.webhooks.notice import ACTED_ON, CANCEL, PURCHASE, REFUND, Notice
from schemas.aftersale import CANCEL as EVENT_CANCEL
from schemas.aftersale import REFUND as EVENT_REFUND
from schemas.aftersale import AftersaleEvent, aftersale_id_for

log = logging.getLogger(__name__)

#: Milliseconds one worker holds the right to publish an after-sale event; a worker
#: killed while holding it delays the event by at most this.
LOCK_MS = 30_000
_EVENT_ACTIONS = {REFUND: EVENT_REFUND, CANCEL: EVENT_CANCEL}

# Delete the lock only if it is still ours (it may have expired and passed on).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def act(services: Services, notice: Notice) -> str:
    """Do what ``notice`` asks; a word saying what came of it (for the task's log)."""
    if notice.action == PURCHASE:
        return settle_purchase(services, notice)
    if notice.action in ACTED_ON:
        return publish_aftersale(services, notice)
    log.debug("webhook %s for order %s: nothing to do", notice.action, notice.code)
    return "ignored"


def settle_purchase(services: Services, notice: Notice) -> str:
    """Settle the purchase of this order if it is unsettled; raises ``TransientError`` (BUSY)
    while a worker holds the intent."""
    reference = services.ledger.reference_for_code(notice.code)
    if reference is None:
        log.info("PURCHASE webhook for order %s: not an order of ours (or past the retention)",
                 notice.code)
        return "unknown order"
    with bound(reference=reference, step="webhook"):
        try:
            outcome = flow.settle(services, reference, notified=True)
        except UnknownIntentError:
            log.info("PURCHASE webhook for order %s: its ledger entry is gone", notice.code)
            return "unknown order"
        # Still running: the receiver's mark stays, and settling takes it as Onebox's
        # word should the purchase end unsettled (``flow.settle``).
        status = outcome.status if outcome is not None else "in progress"
        log.info("PURCHASE webhook for order %s: %s", notice.code, status)
        return status


def publish_aftersale(services: Services, notice: Notice) -> str:
    """Publish the after-sale event of (code, action) unless it is published already;
    raises ``TransientError`` (BUSY) while another worker is publishing it."""
    ledger = services.ledger
    client, keys = ledger.redis, ledger.keys
    action = _EVENT_ACTIONS[notice.action]
    lock = keys.aftersale_lock(notice.code, notice.action)
    token = uuid.uuid4().hex
    if not client.set(lock, token, nx=True, px=LOCK_MS):
        raise TransientError(f"another worker is publishing the {action} of {notice.code}",
                             code="BUSY")
    try:
        done = keys.aftersale_published(notice.code, notice.action)
        if client.exists(done):
            log.info("%s webhook for order %s: published already", notice.action, notice.code)
            return "duplicate"
        event = _event(services, notice, action)
        with bound(reference=event.reference, step="webhook"):
            services.publisher.publish_aftersale(event)
            client.set(done, event.event_id, ex=services.settings.ledger_retention)
        return "published"
    finally:
        client.eval(_RELEASE, 1, lock, token)


def _event(services: Services, notice: Notice, action: str) -> AftersaleEvent:
    """The event: the intent's reference and shop when this deployment bought the order."""
    reference = services.ledger.reference_for_code(notice.code)
    shop = None
    if reference is not None:
        entry = services.ledger.get(reference)
        if entry is not None:
            intent, outcome = entry.stored_intent, entry.outcome
            shop = intent.shop if intent is not None else outcome.shop if outcome else None
    return AftersaleEvent(
        event_id=aftersale_id_for(notice.code, action), order_code=notice.code, action=action,
        received_at=datetime.fromtimestamp(notice.received_at, UTC), reference=reference,
        shop=shop, subtype=notice.subtype)
