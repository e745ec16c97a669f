"""The order result contract: stable ids, the status rules, timestamps in UTC."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from marshmallow import ValidationError

from schemas import (
    CANCELLED,
    CONFIRMED,
    EXPIRED,
    FAILED,
    HELD,
    MAX_MESSAGE_BYTES,
    UNSETTLED,
    OrderResult,
    ResultError,
    dump_result,
    is_interim,
    load_result,
    result_id_for,
)
from schemas.jsonschema import json_schema_errors, result_json_schema
from schemas.result import (
    CANCELLED_CODE,
    FINAL_STATUSES,
    HOLD_EXPIRED_CODE,
    MAX_ERROR_MESSAGE,
    RESULT_ID_NAMESPACE,
    STATUSES,
)

SUBMITTED = datetime(2026, 11, 26, 17, 0, tzinfo=UTC)
FINISHED = datetime(2026, 11, 26, 17, 0, 2, 250000, tzinfo=UTC)


def confirmed(**changes: Any) -> OrderResult:
    fields: dict[str, Any] = {
        "result_id": result_id_for("order-1"), "reference": "order-1", "status": CONFIRMED,
        "order_code": "AX59SJ29392X", "order_id": "3f2c9a5e0b7d4e1f8a6c2b9d0e4f7a1c",
        "submitted_at": SUBMITTED, "finished_at": FINISHED,
    }
    return OrderResult(**{**fields, **changes})


def failed(**changes: Any) -> OrderResult:
    fields: dict[str, Any] = {
        "result_id": result_id_for("order-2"), "reference": "order-2", "status": FAILED,
        "batch": "night-1", "error": ResultError(code="ORDER_SEAT_NOT_AVAILABLE",
                                                 message="seat taken", step="seats",
                                                 trace_id="0e1d2c3b4a596877"),
        "attempts": 3, "metadata": {"campaign": "x", "n": None},
    }
    return OrderResult(**{**fields, **changes})


HOLD_EXPIRES = datetime(2026, 11, 26, 17, 10, tzinfo=UTC)


def held(**changes: Any) -> OrderResult:
    fields: dict[str, Any] = {
        "result_id": result_id_for("order-3"), "reference": "order-3", "status": HELD,
        "order_code": "AX59SJ29392X", "order_id": "3f2c9a5e0b7d4e1f8a6c2b9d0e4f7a1c",
        "hold_expires_at": HOLD_EXPIRES, "submitted_at": SUBMITTED, "finished_at": FINISHED,
    }
    return OrderResult(**{**fields, **changes})


def cancelled(**changes: Any) -> OrderResult:
    fields: dict[str, Any] = {
        "result_id": result_id_for("order-3"), "reference": "order-3", "status": CANCELLED,
        "error": ResultError(code=CANCELLED_CODE, message="cancelled by the shop", step="seats"),
    }
    return OrderResult(**{**fields, **changes})


def expired(**changes: Any) -> OrderResult:
    fields: dict[str, Any] = {
        "result_id": result_id_for("order-3"), "reference": "order-3", "status": EXPIRED,
        "order_code": "AX59SJ29392X", "order_id": "3f2c9a5e0b7d4e1f8a6c2b9d0e4f7a1c",
        "error": ResultError(code=HOLD_EXPIRED_CODE, message="the hold lapsed unconfirmed",
                             step="confirm"),
    }
    return OrderResult(**{**fields, **changes})


def unsettled(**changes: Any) -> OrderResult:
    fields: dict[str, Any] = {
        "result_id": result_id_for("order-4"), "reference": "order-4", "status": UNSETTLED,
        "order_code": "AX59SJ29392X",
        "error": ResultError(code="CONFIRM_UNSETTLED", message="no answer", step="confirm"),
    }
    return OrderResult(**{**fields, **changes})


def test_result_id_is_a_stable_uuid5_of_the_reference() -> None:
    result_id = result_id_for("order-1")
    assert result_id == result_id_for("order-1")
    assert result_id != result_id_for("order-2")
    assert uuid.UUID(result_id).version == 5
    assert result_id == str(uuid.uuid5(RESULT_ID_NAMESPACE, "order-1"))


def test_result_id_namespace_never_changes() -> None:
    # Consumers de-duplicate on result_id: a new namespace would make every old result look new.
    assert result_id_for("shop-42") == "81747fdf-fc83-59e0-820a-456b2d45b62f"


@pytest.mark.parametrize("result", [
    confirmed(), failed(), confirmed(error=None, attempts=4), unsettled(),
    unsettled(order_code=None, order_id="o-1"), held(), cancelled(),
    cancelled(order_code="AX59SJ29392X", error=ResultError(CANCELLED_CODE, "by the shop",
                                                           step="confirm")),
    expired(),
], ids=lambda result: result.status)
def test_results_round_trip(result: OrderResult) -> None:
    dumped = dump_result(result)
    assert load_result(dumped) == result
    assert load_result(json.dumps(dumped)) == result
    assert load_result(json.dumps(dumped).encode()) == result
    assert json_schema_errors(dumped, result_json_schema()) == []


#: Results as the worker published them before held, cancelled and expired existed.
OLD_RESULTS = [
    {"result_id": result_id_for("r"), "reference": "r", "status": "confirmed",
     "order_code": "AX1", "attempts": 1, "schema_version": 1},
    {"result_id": result_id_for("r"), "reference": "r", "status": "failed",
     "error": {"code": "ORDER_SEAT_NOT_AVAILABLE", "message": "m", "retryable": False}},
    {"result_id": result_id_for("r"), "reference": "r", "status": "unsettled",
     "order_id": "o-1", "error": {"code": "CONFIRM_UNSETTLED", "message": "m"}},
]


@pytest.mark.parametrize("document", OLD_RESULTS, ids=lambda document: document["status"])
def test_results_from_before_holds_are_still_valid(document: dict[str, Any]) -> None:
    result = load_result(document)
    assert result.hold_expires_at is None
    assert "hold_expires_at" not in dump_result(result)
    assert json_schema_errors(document, result_json_schema()) == []


def test_a_held_result_dumps_its_code_and_expiry() -> None:
    assert dump_result(held()) == {
        "result_id": result_id_for("order-3"), "reference": "order-3", "status": "held",
        "order_code": "AX59SJ29392X", "order_id": "3f2c9a5e0b7d4e1f8a6c2b9d0e4f7a1c",
        "attempts": 1, "submitted_at": "2026-11-26T17:00:00Z",
        "finished_at": "2026-11-26T17:00:02.250000Z", "hold_expires_at": "2026-11-26T17:10:00Z",
        "schema_version": 1,
    }


def test_held_and_unsettled_are_interim_the_others_final() -> None:
    assert [status for status in STATUSES if is_interim(status)] == [UNSETTLED, HELD]
    assert [status for status in STATUSES if not is_interim(status)] == list(FINAL_STATUSES)
    assert set(FINAL_STATUSES) == {CONFIRMED, FAILED, CANCELLED, EXPIRED}


def test_a_confirmed_result_dumps_as_documented() -> None:
    assert dump_result(confirmed()) == {
        "result_id": result_id_for("order-1"), "reference": "order-1", "status": "confirmed",
        "order_code": "AX59SJ29392X", "order_id": "3f2c9a5e0b7d4e1f8a6c2b9d0e4f7a1c",
        "attempts": 1, "submitted_at": "2026-11-26T17:00:00Z",
        "finished_at": "2026-11-26T17:00:02.250000Z", "schema_version": 1,
    }


def test_a_failed_result_dumps_its_error() -> None:
    dumped = dump_result(failed())
    assert dumped["error"] == {"code": "ORDER_SEAT_NOT_AVAILABLE", "message": "seat taken",
                               "step": "seats", "retryable": False,
                               "trace_id": "0e1d2c3b4a596877"}
    assert dumped["metadata"] == {"campaign": "x", "n": None}
    assert "order_code" not in dumped


def test_times_in_other_zones_are_written_in_utc() -> None:
    madrid = timezone(timedelta(hours=1))
    result = confirmed(submitted_at=datetime(2026, 11, 26, 18, 0, tzinfo=madrid))
    assert dump_result(result)["submitted_at"] == "2026-11-26T17:00:00Z"
    document = {**dump_result(confirmed()), "submitted_at": "2026-11-26T18:00:00+01:00"}
    loaded = load_result(document).submitted_at
    assert loaded == SUBMITTED
    assert loaded is not None
    assert loaded.tzinfo == UTC


def test_defaults() -> None:
    minimal = {"result_id": result_id_for("r"), "reference": "r", "status": "failed",
               "error": {"code": "X", "message": ""}}
    result = load_result(minimal)
    assert (result.attempts, result.schema_version, result.metadata) == (1, 1, {})
    assert result.error == ResultError(code="X", message="")


def test_a_long_error_message_is_cut_so_the_result_stays_publishable() -> None:
    error = ResultError(code="HTTP_500", message="x" * 10_000)
    assert len(error.message) == MAX_ERROR_MESSAGE
    assert load_result(dump_result(failed(error=error))).error == error


def _doc(**changes: Any) -> dict[str, Any]:
    document = dump_result(failed())
    document.update(changes)
    return {key: value for key, value in document.items() if value is not ...}


BAD_CASES: list[tuple[str, dict[str, Any], tuple[Any, ...]]] = [
    ("confirmed without order code", _doc(status="confirmed", error=...), ("order_code",)),
    ("confirmed with an error", _doc(status="confirmed", order_code="AX1"), ("error",)),
    ("failed without error", _doc(error=...), ("error",)),
    ("failed with hold_expires_at", _doc(hold_expires_at="2026-11-26T17:10:00Z"),
     ("hold_expires_at",)),
    ("held without order code", _doc(status="held", error=...,
                                     hold_expires_at="2026-11-26T17:10:00Z"), ("order_code",)),
    ("held without expiry", _doc(status="held", error=..., order_code="AX1"),
     ("hold_expires_at",)),
    ("held with an error", _doc(status="held", order_code="AX1",
                                hold_expires_at="2026-11-26T17:10:00Z"), ("error",)),
    ("held expiry naive", _doc(status="held", error=..., order_code="AX1",
                               hold_expires_at="2026-11-26T17:10:00"), ("hold_expires_at",)),
    ("cancelled without error", _doc(status="cancelled", error=...), ("error",)),
    ("cancelled with another code", _doc(status="cancelled"), ("error", "code")),
    ("expired without order code", _doc(status="expired", error={"code": "HOLD_EXPIRED",
                                                                  "message": "m"}),
     ("order_code",)),
    ("expired with another code", _doc(status="expired", order_code="AX1",
                                       error={"code": "CANCELLED", "message": "m"}),
     ("error", "code")),
    ("expired with hold_expires_at", _doc(status="expired", order_code="AX1",
                                          error={"code": "HOLD_EXPIRED", "message": "m"},
                                          hold_expires_at="2026-11-26T17:10:00Z"),
     ("hold_expires_at",)),
    ("unknown status", _doc(status="done"), ("status",)),
    ("status missing", _doc(status=...), ("status",)),
    ("result_id missing", _doc(result_id=...), ("result_id",)),
    ("result_id not a uuid", _doc(result_id="order-2"), ("result_id",)),
    ("result_id upper case", _doc(result_id=result_id_for("order-2").upper()), ("result_id",)),
    ("reference missing", _doc(reference=...), ("reference",)),
    ("reference bad pattern", _doc(reference="a b"), ("reference",)),
    ("attempts 0", _doc(attempts=0), ("attempts",)),
    ("attempts true", _doc(attempts=True), ("attempts",)),
    ("attempts as a string", _doc(attempts="2"), ("attempts",)),
    ("naive time", _doc(submitted_at="2026-11-26T17:00:00"), ("submitted_at",)),
    ("date only", _doc(finished_at="2026-11-26"), ("finished_at",)),
    ("not a time", _doc(finished_at="yesterday"), ("finished_at",)),
    ("impossible time", _doc(finished_at="2026-13-40T25:00:00Z"), ("finished_at",)),
    ("time as a number", _doc(finished_at=1764176400), ("finished_at",)),
    ("order_code empty", _doc(order_code=""), ("order_code",)),
    ("order_code null", _doc(order_code=None), ("order_code",)),
    ("error not an object", _doc(error="boom"), ("error",)),
    ("error without code", _doc(error={"message": "m"}), ("error", "code")),
    ("error with unknown field", _doc(error={"code": "X", "message": "m", "http": 500}),
     ("error", "http")),
    ("retryable as a string", _doc(error={"code": "X", "message": "m", "retryable": "yes"}),
     ("error", "retryable")),
    ("retryable as 1", _doc(error={"code": "X", "message": "m", "retryable": 1}),
     ("error", "retryable")),
    ("unknown field", _doc(order_total=90), ("order_total",)),
    ("metadata too big", _doc(metadata={"blob": "x" * 3000}), ("metadata",)),
    ("schema_version 2", _doc(schema_version=2), ("schema_version",)),
]


@pytest.mark.parametrize(("document", "path"), [case[1:] for case in BAD_CASES],
                         ids=[case[0] for case in BAD_CASES])
def test_a_bad_result_is_refused_naming_the_field(document: dict[str, Any],
                                                  path: tuple[Any, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        load_result(document)
    node: Any = caught.value.messages
    for key in path:
        assert isinstance(node, dict), caught.value.messages
        assert key in node, caught.value.messages
        node = node[key]
    assert node
    if path != ("metadata",):  # metadata's 2 KiB: a limit JSON Schema cannot say
        assert json_schema_errors(document, result_json_schema()), "the JSON Schema accepts it"


@pytest.mark.parametrize("data", ["nope", "[]", b"\xff", 7, "x" * (MAX_MESSAGE_BYTES + 1)])
def test_what_is_not_a_result_object_is_refused(data: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        load_result(data)
    assert list(caught.value.messages) == ["_schema"]


@pytest.mark.parametrize(("changes", "problem"), [
    ({"order_code": None}, "order_code"),
    ({"error": ResultError("X", "m")}, "error"),
    ({"status": "done"}, "status"),
    ({"submitted_at": datetime(2026, 1, 1)}, "time"),  # naive on purpose
])
def test_an_inconsistent_result_cannot_be_built(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        confirmed(**changes)


def test_a_failed_result_needs_an_error() -> None:
    with pytest.raises(ValueError, match="error"):
        failed(error=None)


@pytest.mark.parametrize(("build", "changes", "problem"), [
    (held, {"order_code": None}, "order_code"),
    (held, {"hold_expires_at": None}, "hold_expires_at"),
    (held, {"error": ResultError("X", "m")}, "error"),
    (held, {"hold_expires_at": datetime(2026, 11, 26, 17, 10)}, "time"),  # naive on purpose
    (cancelled, {"error": None}, "error"),
    (cancelled, {"error": ResultError("ORDER_SEAT_NOT_AVAILABLE", "m")}, "CANCELLED"),
    (cancelled, {"hold_expires_at": HOLD_EXPIRES}, "hold_expires_at"),
    (expired, {"order_code": None}, "order_code"),
    (expired, {"error": ResultError(CANCELLED_CODE, "m")}, "HOLD_EXPIRED"),
    (confirmed, {"hold_expires_at": HOLD_EXPIRES}, "hold_expires_at"),
])
def test_an_inconsistent_hold_result_cannot_be_built(build: Any, changes: dict[str, Any],
                                                     problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build(**changes)
