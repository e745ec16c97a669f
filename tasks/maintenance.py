"""Periodic work, run by celery beat: the recovery sweep (intents and refunds), the
Redis-list intake and the unsettled intents' reads; callbacks to shops; and the dispatches
owed, sent again by a worker as soon as it has the broker back."""

from __future__ import annotations

import re

from fulfilment import recovery, settlement
from fulfilment.callbacks import CallbackSender, SenderConfig
from fulfilment.intake import Intake
from fulfilment.intake_queue import QueueIntake
from fulfilment.keys import Keys
from fulfilment.owed import OwedDispatches
from fulfilment.topology import Topology, is_amqp
from fulfilment.wiring import broker_connection
from tasks import runtime
from tasks.app import app
from tasks.brokerwatch import INFRA_ERRORS
from tasks.producer import producer
from tasks.purchase import dispatch_many, resume
from tasks.refunds import dispatch_refund


@app.task(name="fulfilment.maintenance.sweep", ignore_result=True)
def sweep() -> int:
    """Resume the intents and the refunds stuck past ``FULFILMENT_STUCK_AFTER``."""
    # Owed dispatches first: each claim records progress, so the sweep leaves them be.
    resend_owed()
    swept = recovery.sweep_all(runtime.services(), resume, dispatch_refund)
    return len(swept.intents) + len(swept.refunds)


@app.task(name="fulfilment.maintenance.settle_unsettled", ignore_result=True)
def settle_unsettled() -> int:
    """Read again the unsettled intents whose next read is due (``fulfilment.settlement``)."""
    return sum(checked.settled for checked in settlement.settle_due(runtime.services()))


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
def drain_intake(drainer: object = None) -> int:
    """Take the intake in a chunk at a time: the Redis list, and on RabbitMQ the intake
    queue. Sent by beat; a drain that finds more than a chunk waiting sends helpers
    (``drainer``: the place reserved for one), at most ``MAX_DRAINERS`` at once."""
    services = runtime.services()
    settings = services.settings
    keys = Keys(settings.key_prefix)
    intake = Intake(services.ledger.redis, keys, producer(), services.publisher)
    mine = drainer if isinstance(drainer, str) and _DRAINER.fullmatch(drainer) else None
    if not is_amqp(settings.effective_broker_url):
        return intake.drain(drainer=mine, send_helpers=_send_helpers).total
    topology = Topology.for_keys(keys, settings.effective_broker_url)
    with broker_connection(settings) as connection, QueueIntake(connection, topology) as queue:
        return intake.drain(drainer=mine, send_helpers=_send_helpers, queue=queue).total


_DRAINER = re.compile(r"[0-9a-f]{32}")


def _send_helpers(drainers: list[str]) -> None:
    for drainer in drainers:
        drain_intake.apply_async(kwargs={"drainer": drainer})


@app.task(name="fulfilment.maintenance.deliver_callbacks", ignore_result=True)
def deliver_callbacks() -> int:
    """POST the outcomes due to shops' callback URLs (``fulfilment.callbacks``): one run at
    a time, a few seconds at most; another beat's run meanwhile returns at once."""
    services = runtime.services()
    settings = services.settings
    if not settings.callback_routes:
        return 0
    sender = CallbackSender(services.ledger.redis, Keys(settings.key_prefix),
                            SenderConfig.from_settings(settings), services.clock)
    return sender.run().delivered
