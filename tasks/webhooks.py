"""The webhook task, and the receiver's way of sending it.

``fulfilment webhooks`` (the receiver process) calls ``hand_over``; a worker
runs ``handle``, which asks ``fulfilment.webhooks.actions`` to act. Both are on
the maintenance queue: small, served before bulk purchases.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from fulfilment.errors import FulfilmentError, OutcomeUnknownError, TransientError
from fulfilment.webhooks import actions
from fulfilment.webhooks.notice import Notice, NoticeError
from tasks import runtime
from tasks.app import app
from tasks.brokerwatch import INFRA_ERRORS

log = logging.getLogger(__name__)

#: How the receiver's send rides out a broker blip before it answers Onebox 503.
SEND_RETRY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.3,
              "interval_max": 1.0}
#: Seconds before a notice whose intent is busy (or being published) is tried again.
BUSY_COUNTDOWN = 2.0


@app.task(name="fulfilment.webhooks.handle", bind=True, ignore_result=True, acks_late=True,
          autoretry_for=INFRA_ERRORS, retry_backoff=True, retry_backoff_max=30,
          max_retries=10)
def handle(task: Task[Any, Any], notice: object) -> str:
    try:
        parsed = Notice.from_dict(notice)
    except NoticeError as exc:
        runtime.services().publisher.publish_failure(
            f"webhook task argument is not a notice: {exc}", {}, repr(notice)[:200])
        raise Ignore() from None
    try:
        return actions.act(runtime.services(), parsed)
    except (TransientError, OutcomeUnknownError) as exc:
        log.info("webhook %s for order %s: %s; again in %.0f s", parsed.action, parsed.code,
                 exc.message, BUSY_COUNTDOWN)
        raise task.retry(countdown=BUSY_COUNTDOWN, max_retries=30) from None
    except FulfilmentError as exc:
        # A hint only: the scheduled settling gets to it anyway.
        log.warning("webhook %s for order %s: not acted on: %s", parsed.action, parsed.code,
                    exc.message)
        return "not acted on"


def hand_over(notice: Notice) -> None:
    """Send the notice to a worker; raises if the broker did not take it."""
    handle.apply_async(args=(notice.to_dict(),), retry=True, retry_policy=SEND_RETRY)
