"""Traces: one per intent, from the producer through both tasks to each Onebox call.

A real worker process and a real producer process send their spans over OTLP/HTTP,
as they would to a collector, to a receiver in this test that decodes them with
OpenTelemetry's own protobuf classes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fulfilment.harness.cluster import Cluster, env_for
from fulfilment.harness.processes import wait_for
from tests.deployment import deployment

pytestmark = pytest.mark.integration

trace_service = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    reason="the trace extra is not installed")

EMAIL, PHONE, NAME = "traced.buyer@example.com", "+34 611 222 333", "Tracy Buyer"


@dataclass
class Span:
    trace_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    links: list[str] = field(default_factory=list)


class OtlpReceiver(ThreadingHTTPServer):
    """Just enough of an OpenTelemetry collector: ``POST /v1/traces``, protobuf."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[Span] = []
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def take(self, body: bytes) -> None:
        request = trace_service.ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = [Span(trace_id=span.trace_id.hex(), name=span.name, kind=span.kind,
                      attributes={a.key: _value(a.value) for a in span.attributes},
                      links=[link.trace_id.hex() for link in span.links])
                 for resource in request.resource_spans
                 for scope in resource.scope_spans for span in scope.spans]
        with self.lock:
            self.bodies.append(body)
            self.spans.extend(spans)

    def traces(self) -> dict[str, list[Span]]:
        by_trace: dict[str, list[Span]] = defaultdict(list)
        with self.lock:
            for span in self.spans:
                by_trace[span.trace_id].append(span)
        return by_trace


class _Handler(BaseHTTPRequestHandler):
    server: OtlpReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.take(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def cluster(redis_url: str, prefix: str, tmp_path: Path, receiver: OtlpReceiver,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    # OpenTelemetry's own variables: where to send, and a short export delay.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    with deployment(tmp_path, redis_url, prefix, traces="otlp") as running:
        running.start_worker(pool="threads", concurrency=4)
        yield running


def intent(reference: str) -> dict[str, Any]:
    return {"reference": reference,
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}],
            "buyer": {"email": EMAIL, "phone": PHONE, "name": NAME}}


def produce(cluster: Cluster, tmp_path: Path, script: str) -> None:
    """Run a producer as a process of its own, with the deployment's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEBOX_", "FULFILMENT_"))}
    subprocess.run([sys.executable, "-c", script], env={**env, **env_for(cluster.settings)},
                   check=True, cwd=tmp_path, timeout=60)


def trace_of(receiver: OtlpReceiver, reference: str) -> list[Span] | None:
    """The one trace that holds the intent's spans, once its confirm span has arrived."""
    traces = {trace_id for trace_id, spans in receiver.traces().items()
              if any(s.attributes.get("fulfilment.reference") == reference for s in spans)}
    if len(traces) > 1:
        raise AssertionError(f"{reference} is in {len(traces)} traces")
    if not traces:
        return None
    spans = receiver.traces()[traces.pop()]
    if not any(s.name == "run/fulfilment.confirm" and "fulfilment.order_code" in s.attributes
               for s in spans):
        return None
    return spans


def whole_trace(receiver: OtlpReceiver, reference: str) -> list[Span]:
    spans = wait_for(lambda: trace_of(receiver, reference), timeout=30,
                     what=f"the whole trace of {reference}")
    assert spans is not None
    return spans


def check_one_trace(spans: list[Span], reference: str, order_code: str | None) -> None:
    names = [s.name for s in spans]
    assert "fulfilment.dispatch" in names, names
    assert "run/fulfilment.basket" in names and "run/fulfilment.confirm" in names, names
    calls = [s for s in spans if s.attributes.get("http.request.method")
             or s.attributes.get("http.method")]
    steps = {s.attributes.get("fulfilment.step") for s in calls}
    # Each Onebox call of the purchase, each saying which step and intent it was for.
    assert {"create", "seats", "buyer_data", "pre_confirm", "confirm"} <= steps, steps
    assert all(s.attributes.get("fulfilment.reference") == reference for s in calls
               if s.attributes.get("fulfilment.step")), [s.attributes for s in calls]
    confirm = next(s for s in spans if s.name == "run/fulfilment.confirm")
    assert confirm.attributes["fulfilment.order_code"] == order_code
    assert confirm.attributes["fulfilment.status"] == "confirmed"


def test_one_trace_per_intent_from_the_producer_to_each_onebox_call(
        cluster: Cluster, receiver: OtlpReceiver, tmp_path: Path) -> None:
    produce(cluster, tmp_path, "from tasks.producer import submit; "
            f"submit({json.dumps(intent('traced-1'))})")
    # A bulk file: one fan-out message for both; each intent still gets its own trace.
    lines = "\n".join(json.dumps(intent(f"traced-bulk-{n}")) for n in (1, 2))
    (tmp_path / "bulk.jsonl").write_text(lines + "\n")
    produce(cluster, tmp_path, "from tasks.commands import main; import sys; "
            "sys.argv = ['fulfilment', 'submit', 'bulk.jsonl']; main()")
    references = {"traced-1", "traced-bulk-1", "traced-bulk-2"}
    results = cluster.collect(references)
    for reference in sorted(references):
        spans = whole_trace(receiver, reference)
        check_one_trace(spans, reference, results[reference].order_code)
    # The producer's own span is in the single intent's trace: the trace starts there.
    single = trace_of(receiver, "traced-1")
    assert single is not None
    assert any(s.name == "fulfilment.dispatch" and s.kind == 4 for s in single)  # PRODUCER
    # Bulk intents wait in Redis and are released when there is room: each starts a
    # trace of its own (linked to whatever released it, a worker's or beat's run).
    traces = {ref: trace_of(receiver, ref) for ref in references}
    assert len({spans[0].trace_id for spans in traces.values() if spans}) == len(references)


def test_no_personal_data_in_any_span(cluster: Cluster, receiver: OtlpReceiver,
                                      tmp_path: Path) -> None:
    produce(cluster, tmp_path, "from tasks.producer import submit; "
            f"submit({json.dumps(intent('traced-pii'))})")
    cluster.collect({"traced-pii"})
    whole_trace(receiver, "traced-pii")
    with receiver.lock:
        exported = b"".join(receiver.bodies)
    for secret in (EMAIL, PHONE, NAME, "sandbox-api-key", cluster.settings.onebox_api_key):
        assert secret.encode() not in exported, f"{secret!r} was exported in a span"
