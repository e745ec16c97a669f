"""The shop's cancel and confirm, and the holds that lapse: ``fulfilment.stops`` with the
worker's dispatch. A purchase a worker must act on is sent to the continue queue (the
``confirm`` task brings any intent to its outcome, whatever stage it is at)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from fulfilment.stops import Answer, Stops
from tasks import runtime
from tasks.app import app


def send_on(references: Sequence[str]) -> None:
    """Bring each intent to its outcome now (a retry's backoff may be long)."""
    from tasks.purchase import confirm as continue_purchase  # the app configured by now

    for reference in references:
        continue_purchase.si(reference).apply_async()


def stops() -> Stops:
    return Stops(runtime.services(), send_on)


def cancel(*references: str) -> list[Answer]:
    """Cancel purchases not yet confirmed; one answer each (``ok`` False: refused)."""
    return list(stops().cancel(references))


def cancel_batch(batch: str) -> Iterator[Answer]:
    """Cancel every intent of ``batch`` without an outcome yet."""
    return stops().cancel_batch(batch)


def confirm(reference: str) -> Answer:
    """Confirm a held purchase once the shop has taken the payment."""
    return stops().confirm(reference)


@app.task(name="fulfilment.maintenance.expire_holds", ignore_result=True)
def expire_holds() -> int:
    """celery beat: release the holds whose time passed without the shop's confirm."""
    return stops().expire_lapsed()
