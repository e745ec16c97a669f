"""The Python producer API: ``submit(intent)`` and ``submit_many(intents)``.

Both validate with the intent schema and admit to the ledger before anything
is enqueued; see ``fulfilment.producer`` for what each answer means.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from fulfilment.producer import Producer, RawIntent, Submission
from tasks import runtime


def producer() -> Producer:
    """The process's producer; the first call checks that Redis keeps what it accepts.

    "Accepted" is a promise: with ``appendfsync always`` Redis answers the
    admission only once it is on disk, so a host crash cannot take it back.
    """
    from tasks.purchase import dispatch

    services = runtime.services()
    runtime.check_durable_once()
    return Producer(services.ledger, dispatch, max_quantity=services.settings.max_quantity)


def submit(intent: RawIntent) -> Submission:
    """Validate, admit and enqueue one intent; raises on an invalid or conflicting one."""
    return producer().submit(intent)


def submit_many(intents: Iterable[RawIntent]) -> Iterator[Submission]:
    """Validate, admit and enqueue each intent; refused ones are reported, not raised."""
    return producer().submit_many(intents)
