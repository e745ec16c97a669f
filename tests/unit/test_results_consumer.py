"""Reading the results and failures queues: --count acknowledges its last message, failures
keep their details and a bounded payload, an unreadable message never stops the reader."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from kombu import Connection

from fulfilment.cli import describe_failure
from fulfilment.keys import Keys
from fulfilment.results import (
    FAILURE_PAYLOAD_LIMIT,
    ResultPublisher,
    consume_failures,
    consume_results,
    failure_body,
)
from fulfilment.topology import Topology
from schemas.result import OrderResult, result_id_for

MEMORY = "memory://localhost/"


@pytest.fixture
def topology() -> Topology:
    # The memory transport is shared by the whole process: a prefix per test.
    return Topology.for_keys(Keys(f"unit-{uuid.uuid4().hex[:8]}"))


@pytest.fixture
def connection() -> Iterator[Connection]:
    with Connection(MEMORY, transport_options={"polling_interval": 0.01}) as conn:
        yield conn


def confirmed(reference: str) -> OrderResult:
    return OrderResult(result_id=result_id_for(reference), reference=reference,
                       status="confirmed", order_code=f"CODE-{reference}")


def read(connection: Connection, topology: Topology, limit: int | None) -> list[str]:
    return [r.reference for r in consume_results(connection, topology, timeout=0.01,
                                                 idle_timeout=0.1, limit=limit)]


def test_a_limited_read_acknowledges_every_message_it_yields_the_last_too(
        connection: Connection, topology: Topology) -> None:
    publisher = ResultPublisher(connection, topology)
    for reference in ("r-1", "r-2", "r-3"):
        publisher.publish(confirmed(reference))
    # Three reads of one message each get three different messages, not the same one
    assert [read(connection, topology, 1) for _ in range(3)] == [["r-1"], ["r-2"], ["r-3"]]
    assert read(connection, topology, None) == []


def test_an_unreadable_result_goes_to_the_failures_queue_and_reading_goes_on(
        connection: Connection, topology: Topology) -> None:
    with connection.Producer() as producer:
        producer.publish({"not": "a result"}, exchange=topology.results_exchange,
                         routing_key="result.confirmed", declare=[topology.results_queue])
        producer.publish("plain text", exchange=topology.results_exchange,
                         routing_key="result.confirmed", content_type="text/plain",
                         content_encoding="utf-8", declare=[topology.results_queue])
    ResultPublisher(connection, topology).publish(confirmed("r-9"))
    assert read(connection, topology, None) == ["r-9"]
    failures = list(consume_failures(connection, topology, timeout=0.01, idle_timeout=0.1))
    assert [f["reason"].split(":")[0] for f in failures] == [
        "unreadable message on the results queue"] * 2
    assert json.loads(failures[0]["payload"]) == {"not": "a result"}


def test_a_failure_keeps_a_bounded_payload_and_says_it_was_cut() -> None:
    small = failure_body("bad", {}, b"abc")
    assert small == {"reason": "bad", "errors": {}, "payload": "abc"}
    big = failure_body("bad", {}, "x" * (FAILURE_PAYLOAD_LIMIT * 3))
    assert len(big["payload"]) == FAILURE_PAYLOAD_LIMIT
    assert big["payload_truncated"] is True and big["payload_size"] == FAILURE_PAYLOAD_LIMIT * 3
    assert len(failure_body("r" * 10_000, {}, None)["reason"]) == 500


def test_a_failure_for_people_names_each_field_and_never_the_payload() -> None:
    line = describe_failure({"reason": "invalid purchase intent",
                             "errors": {"buyer": {"email": ["Not a valid email address."]},
                                        "items": {"0": {"quantity": ["Must be >= 1."]}}},
                             "payload": '{"buyer": {"email": "secret@example.com"}}'})
    assert line == ("refused: invalid purchase intent (buyer.email: Not a valid email "
                    "address.; items.0.quantity: Must be >= 1.)")
    assert "secret" not in line
    cut = describe_failure({"reason": "r", "errors": {}, "payload": "x",
                            "payload_truncated": True, "payload_size": 99})
    assert cut == "refused: r [payload cut from 99 characters]"


def test_the_results_command_run_three_times_reads_three_results(
        connection: Connection, topology: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    from fulfilment.cli import cli

    publisher = ResultPublisher(connection, topology)
    for reference in ("c-1", "c-2", "c-3"):
        publisher.publish(confirmed(reference))
    monkeypatch.setenv("FULFILMENT_BROKER_URL", MEMORY)
    monkeypatch.setenv("FULFILMENT_KEY_PREFIX", topology.results_queue.name.split(".")[0])
    outputs = []
    for _ in range(3):
        done = CliRunner().invoke(cli, ["results", "--count", "1", "--idle-timeout", "5"])
        assert done.exit_code == 0, done.output
        outputs.append(done.stdout.strip())
    assert outputs == [f"c-{i}: confirmed, order code CODE-c-{i}" for i in (1, 2, 3)]


def test_the_failures_command_prints_the_reason_and_the_field_errors(
        connection: Connection, topology: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    from fulfilment.cli import cli

    ResultPublisher(connection, topology).publish_failure(
        "invalid purchase intent", {"items": ["Missing data for required field."]},
        '{"reference": "x"}')
    monkeypatch.setenv("FULFILMENT_BROKER_URL", MEMORY)
    monkeypatch.setenv("FULFILMENT_KEY_PREFIX", topology.results_queue.name.split(".")[0])
    done = CliRunner().invoke(cli, ["results", "--failures", "--count", "1",
                                    "--idle-timeout", "5"])
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == ("refused: invalid purchase intent (items: Missing data "
                                   "for required field.)")
