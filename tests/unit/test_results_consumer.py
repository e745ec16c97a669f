"""Reading the results and failures queues: --count acknowledges its last message, failures
keep their details and a bounded payload, an unreadable message never stops the reader."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner
from kombu import Connection, Queue

from fulfilment.cli import describe_failure, describe_result
from fulfilment.keys import Keys
from fulfilment.results import (
    FAILURE_PAYLOAD_LIMIT,
    ResultPublisher,
    consume_failures,
    consume_results,
    failure_body,
)
from fulfilment.topology import CONFIRMED_KEY, FAILED_KEY, Topology, routing_key_for
from schemas.result import (
    CANCELLED_CODE,
    HOLD_EXPIRED_CODE,
    STATUSES,
    OrderResult,
    ResultError,
    result_id_for,
)

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


def one_of(status: str) -> OrderResult:
    """A valid result of this status, its reference the status's name."""
    code = {"cancelled": CANCELLED_CODE, "expired": HOLD_EXPIRED_CODE}.get(status, "X")
    return OrderResult(
        result_id=result_id_for(status), reference=status, status=status,
        order_code=None if status in ("failed", "cancelled") else "CODE",
        error=None if status in ("confirmed", "held") else ResultError(code, "m"),
        hold_expires_at=datetime(2026, 11, 26, 17, 10, tzinfo=UTC) if status == "held" else None)


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


def test_each_status_has_its_own_routing_key_and_the_results_queue_takes_them_all(
        connection: Connection, topology: Topology) -> None:
    assert [routing_key_for(status) for status in STATUSES] == [
        f"result.{status}" for status in STATUSES]
    assert (CONFIRMED_KEY, FAILED_KEY) == ("result.confirmed", "result.failed")
    # Given a consumer's own queues, one for holds and one for failures only
    own = {key: Queue(f"{topology.results_queue.name}.{key}", topology.results_exchange,
                      routing_key=f"result.{key}") for key in ("held", "failed")}
    with connection.channel() as channel:
        for queue in own.values():
            queue(channel).declare()
    # When one result of each status is published
    publisher = ResultPublisher(connection, topology)
    for status in STATUSES:
        publisher.publish(one_of(status))
    # Then the results queue has every one, and each own queue only its status
    assert read(connection, topology, None) == list(STATUSES)
    for key, queue in own.items():
        bound = queue(connection.default_channel)
        got = []
        while (message := bound.get(no_ack=True)) is not None:
            got.append((message.delivery_info["routing_key"], message.payload["status"]))
        assert got == [(f"result.{key}", key)]


def test_each_status_reads_as_one_line_saying_what_to_do_next() -> None:
    assert [describe_result(one_of(status)) for status in STATUSES] == [
        "confirmed: confirmed, order code CODE",
        "failed: failed, X",
        "unsettled: unsettled, X (order code CODE: fulfilment settle unsettled)",
        "held: held, order code CODE until 2026-11-26T17:10:00Z (confirm or cancel it by then)",
        "cancelled: cancelled, CANCELLED",
        "expired: expired, HOLD_EXPIRED (order code CODE, not bought)",
    ]
