"""Periodic work, run by celery beat: the recovery sweep and the Redis-list intake; and the
dispatches owed, sent again by a worker as soon as it has the broker back."""

from __future__ import annotations

from fulfilment import recovery
from fulfilment.intake import Intake
from fulfilment.keys import Keys
from fulfilment.owed import OwedDispatches
from tasks import runtime
from tasks.app import app
from tasks.producer import producer
from tasks.purchase import INFRA_ERRORS, dispatch_many, resume


@app.task(name="fulfilment.maintenance.sweep", ignore_result=True)
def sweep() -> int:
    # Owed dispatches first: each claim records progress, so the sweep leaves them be.
    resend_owed()
    return len(recovery.sweep(runtime.services(), resume))


@app.task(name="fulfilment.maintenance.dispatch_owed", ignore_result=True, acks_late=True,
          autoretry_for=INFRA_ERRORS, retry_backoff=True, retry_backoff_max=30, max_retries=5)
def dispatch_owed() -> int:
    """Send again the purchases whose dispatch failed: asked by a worker that has the broker
    back (``tasks.brokerwatch``), and by every sweep."""
    return resend_owed()


def resend_owed() -> int:
    services = runtime.services()
    owed = OwedDispatches(services.ledger.redis, Keys(services.settings.key_prefix))
    return owed.resend(dispatch_many, services.clock)


@app.task(name="fulfilment.maintenance.drain_intake", ignore_result=True)
def drain_intake() -> int:
    services = runtime.services()
    intake = Intake(services.ledger.redis, Keys(services.settings.key_prefix), producer(),
                    services.publisher)
    return intake.drain().total
