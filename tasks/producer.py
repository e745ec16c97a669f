"""The Python producer API: ``submit``, ``submit_many`` and ``batch_status``; and the
shop's ``cancel``, ``cancel_batch`` and ``confirm`` (``tasks.stops``).

Both submits validate with the intent schema and admit to the ledger before
anything is enqueued; see ``fulfilment.producer`` for what each answer means.
``submit`` puts an intent in the live lane (dispatched at once, served before
bulk work); ``submit_many`` admits a chunk of intents per Redis round trip into
the bulk lane, where they wait in Redis and are released fairly between shops
as capacity frees (``fulfilment.release``). ``lane=`` changes either default;
an intent's own ``lane`` wins.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from fulfilment import batches
from fulfilment.batches import BatchStatus
from fulfilment.producer import CHUNK, Producer, RawIntent, Submission
from schemas.intent import BULK, LIVE
from tasks import runtime, tracing
from tasks.stops import cancel, cancel_batch, confirm

__all__ = ["batch_status", "cancel", "cancel_batch", "confirm", "producer", "submit",
           "submit_many"]


def producer() -> Producer:
    """The process's producer; the first call checks that Redis keeps what it accepts.

    "Accepted" is a promise: with ``appendfsync always`` Redis answers the
    admission only once it is on disk, so a host crash cannot take it back.
    """
    from tasks.purchase import bulk_gate, dispatch_live, dispatch_many_live

    services = runtime.services()
    runtime.check_durable_once()
    tracing.setup(services.settings, "fulfilment-producer")
    return Producer(services.ledger, dispatch_live, max_quantity=services.settings.max_quantity,
                    dispatch_many=dispatch_many_live, bulk=bulk_gate())


def submit(intent: RawIntent, *, lane: str = LIVE) -> Submission:
    """Validate, admit and enqueue one intent (live unless it or ``lane`` says bulk);
    raises on an invalid or conflicting one."""
    return producer().submit(intent, lane=lane)


def submit_many(intents: Iterable[RawIntent], *, batch: str | None = None,
                chunk: int = CHUNK, lane: str = BULK) -> Iterator[Submission]:
    """Validate, admit and enqueue each intent, ``chunk`` per round trip (bulk unless it
    or ``lane`` says live); refused ones are reported, not raised. With ``batch``,
    intents without one join it."""
    return producer().submit_many(intents, batch=batch, chunk=chunk, lane=lane)


def batch_status(batch: str) -> BatchStatus:
    """How the batch stands, from the ledger: counts by state, the oldest open intent."""
    services = runtime.services()
    return batches.batch_status(services.ledger.redis, services.ledger.keys, batch)
