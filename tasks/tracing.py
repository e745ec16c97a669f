"""Traces for the Celery side: the worker's and the producer's set-up.

``fulfilment.tracing`` holds the tracer set-up and the attributes; this adds
Celery's own instrumentation, which carries the trace from the producer's
publish through every task of the chain (in the message headers) and opens a
span for each task run. Nothing here runs unless ``FULFILMENT_TRACES`` is set.
"""

from __future__ import annotations

from fulfilment import tracing
from fulfilment.config import Settings


def setup(settings: Settings, service_name: str) -> None:
    """Traces on for this process (a worker, or a producer), if configured."""
    if not tracing.setup(settings, service_name):
        return
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()  # type: ignore[no-untyped-call]
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
