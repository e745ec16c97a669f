"""Periodic work, run by celery beat: the recovery sweep and the Redis-list intake."""

from __future__ import annotations

from fulfilment import recovery
from fulfilment.intake import Intake
from fulfilment.keys import Keys
from tasks import runtime
from tasks.app import app
from tasks.producer import producer
from tasks.purchase import resume


@app.task(name="fulfilment.maintenance.sweep", ignore_result=True)
def sweep() -> int:
    return len(recovery.sweep(runtime.services(), resume))


@app.task(name="fulfilment.maintenance.drain_intake", ignore_result=True)
def drain_intake() -> int:
    services = runtime.services()
    intake = Intake(services.ledger.redis, Keys(services.settings.key_prefix), producer(),
                    services.publisher)
    return intake.drain().total
