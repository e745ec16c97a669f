"""The order result: what the worker publishes once an intent is settled.

Exactly one result per intent reaches consumers' hands in the end, but a
broker may deliver it more than once; ``result_id`` is the same for every copy
(it is derived from the reference alone), so consumers de-duplicate on it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, cast

from marshmallow import ValidationError, fields, validate, validates_schema

from schemas._fields import (
    MAX_MESSAGE_BYTES,
    FullMatch,
    StrictBoolean,
    StrictInteger,
    StrictSchema,
    Text,
    UtcDateTime,
    metadata_field,
    parse_message,
    reference_field,
    schema_version_field,
)

__all__ = [
    "CANCELLED", "CONFIRMED", "EXPIRED", "FAILED", "HELD", "RESULT_ID_NAMESPACE", "STATUSES",
    "UNSETTLED", "OrderResult",
    "ResultError", "dump_result", "load_result", "result_id_for",
]

CONFIRMED = "confirmed"
FAILED = "failed"
#: A confirm was sent and Onebox could not say, by the deadline, whether it went
#: through: maybe bought. ``fulfilment settle`` publishes the settled outcome later.
UNSETTLED = "unsettled"
#: Stopped by the shop before a confirm was sent; its seats released.
CANCELLED = "cancelled"
#: A hold the shop never confirmed: released once its time passed.
EXPIRED = "expired"
#: Interim: the seats are held for the shop, which confirms or cancels.
HELD = "held"
STATUSES = (CONFIRMED, FAILED, UNSETTLED, CANCELLED, EXPIRED, HELD)
#: Fixed forever: changing it would change every result_id and break consumers' de-duplication.
RESULT_ID_NAMESPACE = uuid.UUID("756d0722-8bd1-481a-bd58-a77305cc550a")
UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def result_id_for(reference: str) -> str:
    """The result id of an intent: a UUID 5 of the reference, the same on every redelivery."""
    return str(uuid.uuid5(RESULT_ID_NAMESPACE, reference))


MAX_ERROR_MESSAGE = 2048


@dataclass(frozen=True)
class ResultError:
    """Why an intent failed: a stable ``code`` to branch on, a ``message`` for people.

    A long message is cut to ``MAX_ERROR_MESSAGE`` characters here, so an error
    text from far away can never make a result unpublishable.
    """

    code: str
    message: str
    step: str | None = None
    retryable: bool = False
    trace_id: str | None = None

    def __post_init__(self) -> None:
        if len(self.message) > MAX_ERROR_MESSAGE:
            object.__setattr__(self, "message", self.message[:MAX_ERROR_MESSAGE - 1] + "\u2026")


@dataclass(frozen=True)
class OrderResult:
    """The outcome of one intent. Built by our own code, so a wrong one fails at construction."""

    result_id: str
    reference: str
    status: str
    batch: str | None = None
    order_code: str | None = None
    order_id: str | None = None
    error: ResultError | None = None
    attempts: int = 1
    submitted_at: datetime | None = None
    finished_at: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = 1
    #: The intent's shop, if it named one.
    shop: str | None = None
    #: ``held`` only: when the hold lapses.
    hold_expires_at: datetime | None = None

    def __post_init__(self) -> None:
        problems = _status_problems(self.status, self.order_code is not None,
                                    self.error is not None, self.order_id is not None)
        for moment in (self.submitted_at, self.finished_at):
            if moment is not None and moment.utcoffset() is None:
                problems["time"] = ["submitted_at and finished_at must be timezone-aware."]
        if problems:
            raise ValueError(f"inconsistent OrderResult: {problems}")


def _status_problems(status: str, has_code: bool, has_error: bool,
                     has_order_id: bool) -> dict[str, list[str]]:
    """What contradicts the status; shared by the schema and the dataclass."""
    problems: dict[str, list[str]] = {}
    if status not in STATUSES:
        problems["status"] = [f"Must be one of: {', '.join(STATUSES)}."]
    elif status == HELD:
        if not has_code:
            problems["order_code"] = ["Required when status is 'held'."]
    elif status == CONFIRMED:
        if not has_code:
            problems["order_code"] = ["Required when status is 'confirmed'."]
        if has_error:
            problems["error"] = ["Must be absent when status is 'confirmed'."]
    elif not has_error:
        problems["error"] = [f"Required when status is '{status}'."]
    if status == UNSETTLED and not (has_code or has_order_id):
        problems["order_code"] = ["order_code or order_id is required when status is "
                                  "'unsettled'."]
    return problems


class ResultErrorSchema(StrictSchema):
    model = ResultError
    json_title = "ResultError"

    code = Text(required=True, validate=validate.Length(min=1, max=64), metadata={
        "description": "Stable machine-readable reason, e.g. ORDER_SEAT_NOT_AVAILABLE."})
    message = Text(required=True, validate=validate.Length(max=MAX_ERROR_MESSAGE), metadata={
        "description": "Human-readable explanation; holds no personal data."})
    step = Text(validate=validate.Length(min=1, max=64), metadata={
        "description": "The purchase step that failed (create, seats, buyer_data, ...)."})
    retryable = StrictBoolean(load_default=False, metadata={
        "description": "True when the failure was transient (Onebox unavailable or throttling) "
                       "and the worker gave up: a new intent may succeed later."})
    trace_id = Text(validate=validate.Length(min=1, max=128), metadata={
        "description": "Onebox's ob-audit-trace-id of the failing call, for Onebox support."})


class OrderResultSchema(StrictSchema):
    model = OrderResult
    json_title = "OrderResult"
    omit_when_empty = frozenset({"metadata"})
    json_extra: ClassVar[Mapping[str, Any]] = {"allOf": [
        {"if": {"properties": {"status": {"const": CONFIRMED}}, "required": ["status"]},
         "then": {"required": ["order_code"], "not": {"required": ["error"]}}},
        {"if": {"properties": {"status": {"const": FAILED}}, "required": ["status"]},
         "then": {"required": ["error"]}},
        {"if": {"properties": {"status": {"const": UNSETTLED}}, "required": ["status"]},
         "then": {"required": ["error"],
                  "anyOf": [{"required": ["order_code"]}, {"required": ["order_id"]}]}},
    ]}

    result_id = Text(required=True, validate=FullMatch(UUID_PATTERN, "Not a lower-case UUID."),
                     metadata={"description": "Stable id of this intent's outcome (a UUID 5 of "
                                              "the reference): de-duplicate on it."})
    reference = reference_field("The intent's reference.", required=True)
    status = Text(required=True, validate=validate.OneOf(STATUSES), metadata={
        "description": "confirmed: the order is bought. failed: nothing was bought. "
                       "unsettled: a confirm was sent and Onebox could not tell by the "
                       "deadline whether it went through (maybe bought: see order_code); "
                       "a settled result with the same result_id follows once it can."})
    batch = reference_field("The intent's batch, if it had one.")
    shop = reference_field("The intent's shop, if it named one.")
    hold_expires_at = UtcDateTime(metadata={"description": "held: when the hold lapses."})
    order_code = Text(validate=validate.Length(min=1, max=64), metadata={
        "description": "Onebox's order code; present when confirmed, and when unsettled "
                       "once pre-confirmed."})
    order_id = Text(validate=validate.Length(min=1, max=64), metadata={
        "description": "Onebox's order id, when an order was created."})
    error = fields.Nested(ResultErrorSchema, metadata={
        "description": "Why the intent failed, or why it is unsettled; present exactly "
                       "when status is failed or unsettled."})
    attempts = StrictInteger(load_default=1, validate=validate.Range(min=1), metadata={
        "description": "How many task runs the purchase took (one or more per stage)."})
    submitted_at = UtcDateTime(metadata={"description": "When the intent was first admitted."})
    finished_at = UtcDateTime(metadata={"description": "When the outcome was settled."})
    metadata = metadata_field("The intent's metadata, copied unchanged.")
    schema_version = schema_version_field()

    @validates_schema
    def _consistent(self, data: dict[str, Any], **kwargs: Any) -> None:
        problems = _status_problems(data["status"], "order_code" in data, "error" in data,
                                    "order_id" in data)
        if problems:
            raise ValidationError(problems)


_SCHEMA = OrderResultSchema()


def result_schema() -> OrderResultSchema:
    """The (reusable, stateless) result schema."""
    return _SCHEMA


def load_result(data: Mapping[str, Any] | str | bytes) -> OrderResult:
    """Check and load a result, or raise ``ValidationError`` naming every bad field."""
    return cast(OrderResult, _SCHEMA.load(parse_message(data, MAX_MESSAGE_BYTES)))


def dump_result(result: OrderResult) -> dict[str, Any]:
    """The JSON-ready form of a result; ``load_result`` gives back an equal one."""
    return cast(dict[str, Any], _SCHEMA.dump(result))
