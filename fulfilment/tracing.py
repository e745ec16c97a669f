"""Optional OpenTelemetry traces: one trace per intent, identifiers only.

Off unless ``FULFILMENT_TRACES`` says otherwise, and the ``trace`` extra
(``pip install '.[trace]'``) is only needed then: with it off, or the packages
absent, every function here is a no-op and nothing of OpenTelemetry is imported.

What a trace holds: the producer's dispatch span, the Celery publish and run
spans of ``basket`` and ``confirm`` (Celery's own instrumentation, installed by
``tasks.tracing``), and one client span per Onebox call (the requests
instrumentation). Our attributes are identifiers only, the same ones the log
lines carry (``fulfilment.reference``, ``fulfilment.order_id``,
``fulfilment.step``, ``fulfilment.attempt``) plus ``fulfilment.order_code`` and
``fulfilment.status``: never buyer data, never a header (the instrumentations
record no headers or bodies unless told to, and we never tell them).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from fulfilment import logcontext
from fulfilment.errors import ConfigError

if TYPE_CHECKING:
    from fulfilment.config import Settings

log = logging.getLogger(__name__)

#: The values FULFILMENT_TRACES may take.
EXPORTERS = ("none", "otlp", "console")
#: The attribute namespace of our own span attributes.
NAMESPACE = "fulfilment"
_TRACER = "fulfilment"



class _State:
    """Whether this process sends spans (set once, by ``setup``)."""

    enabled = False


_state = _State()


def enabled() -> bool:
    return _state.enabled


def setup(settings: Settings, service_name: str) -> bool:
    """Send this process's spans where ``FULFILMENT_TRACES`` says; once per process.

    A process that has set up OpenTelemetry itself (a shop's backend using our
    producer API) keeps its tracer provider: we only add the instrumentation.
    ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES`` and the
    ``OTEL_EXPORTER_OTLP_*`` variables are read by OpenTelemetry itself.
    """
    if settings.traces == "none" or _state.enabled:
        return _state.enabled
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.requests import RequestsInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
    except ImportError as exc:
        raise ConfigError(f"FULFILMENT_TRACES={settings.traces} needs the trace extra: pip "
                          f"install 'onebox-fulfilment[trace]' ({exc.name} is missing)") from None
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        exporter: SpanExporter
        if settings.traces == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            exporter = OTLPSpanExporter()
        else:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter
            exporter = ConsoleSpanExporter(out=sys.stderr)
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    instrumentor = RequestsInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(request_hook=_onebox_call, response_hook=_onebox_answer)
    _state.enabled = True
    log.info("traces on: %s exporter, service %s", settings.traces, service_name)
    return True


def shutdown() -> None:
    """Flush what is buffered (a CLI command is about to exit)."""
    if not _state.enabled:
        return
    from opentelemetry import trace

    provider: Any = trace.get_tracer_provider()
    if hasattr(provider, "force_flush"):
        provider.force_flush()


def annotate(**values: object) -> None:
    """Put identifiers on the current span (``None`` values are left out)."""
    if not _state.enabled:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"{NAMESPACE}.{key}": _plain(value)
                             for key, value in values.items() if value is not None})


def intent_span(reference: str, *, new_trace: bool) -> Any:
    """The span a purchase's dispatch runs in.

    ``new_trace``: start the intent's own trace, linked to the current span
    (a bulk fan-out or a recovery sweep dispatches many intents; each gets a
    trace of its own). Otherwise it is a child of whatever is current (a
    shop's checkout request, when the shop traces too).
    """
    if not _state.enabled:
        return nullcontext()
    return _intent_span(reference, new_trace)


@contextmanager
def _intent_span(reference: str, new_trace: bool) -> Iterator[None]:
    from opentelemetry import context, trace

    tracer = trace.get_tracer(_TRACER)
    current = trace.get_current_span().get_span_context()
    links = [trace.Link(current)] if new_trace and current.is_valid else None
    parent = context.Context() if new_trace else None
    with tracer.start_as_current_span("fulfilment.dispatch", context=parent, links=links,
                                      kind=trace.SpanKind.PRODUCER,
                                      attributes={f"{NAMESPACE}.reference": reference}):
        yield


def _onebox_call(span: Any, _request: Any) -> None:
    # Called by the requests instrumentation as each call's span opens: the
    # identifiers the log lines carry, never the request itself.
    if span.is_recording():
        span.set_attributes({f"{NAMESPACE}.{key}": _plain(value)
                             for key, value in logcontext.current().items()
                             if key != "trace" and value is not None})


def _onebox_answer(span: Any, _request: Any, response: Any) -> None:
    trace_id = getattr(response, "headers", {}).get("ob-audit-trace-id")
    if trace_id and span.is_recording():
        span.set_attribute("onebox.audit_trace_id", str(trace_id)[:128])


def _plain(value: object) -> str | int | float | bool:
    return value if isinstance(value, str | int | float | bool) else str(value)
