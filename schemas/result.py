"""The order result: what the worker publishes once an intent is settled.

Exactly one final result per intent reaches consumers' hands in the end, but a
broker may deliver it more than once; ``result_id`` is the same for every copy
(it is derived from the reference alone), so consumers de-duplicate on it.
An interim result (``held``, ``unsettled``: ``is_interim``) may come first,
with the same ``result_id``: the final one replaces it.
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
    "CANCELLED", "CANCELLED_CODE", "CONFIRMED", "EXPIRED", "FAILED", "FINAL_STATUSES", "HELD",
    "HOLD_EXPIRED_CODE", "INTERIM_STATUSES", "RESULT_ID_NAMESPACE", "STATUSES", "UNSETTLED",
    "OrderResult", "ResultError", "dump_result", "is_interim", "load_result", "result_id_for",
]

CONFIRMED = "confirmed"
FAILED = "failed"
#: A confirm was sent and Onebox could not say, by the deadline, whether it went
#: through: maybe bought. ``fulfilment settle`` publishes the settled outcome later.
UNSETTLED = "unsettled"
#: An intent with ``hold``: seats held and pre-confirmed until ``hold_expires_at``;
#: the shop's confirm or cancel, or the hold lapsing, gives the final outcome.
HELD = "held"
#: Stopped by a cancel before any confirm was sent: nothing bought.
CANCELLED = "cancelled"
#: A hold that lapsed without a confirm: its seats were released, nothing bought.
EXPIRED = "expired"
STATUSES = (CONFIRMED, FAILED, UNSETTLED, HELD, CANCELLED, EXPIRED)
#: Followed by another result with the same result_id; the others are final.
INTERIM_STATUSES = (HELD, UNSETTLED)
FINAL_STATUSES = (CONFIRMED, FAILED, CANCELLED, EXPIRED)
#: The error code a cancelled or an expired result carries, always.
CANCELLED_CODE = "CANCELLED"
HOLD_EXPIRED_CODE = "HOLD_EXPIRED"
_CODE_OF = {CANCELLED: CANCELLED_CODE, EXPIRED: HOLD_EXPIRED_CODE}
#: Fixed forever: changing it would change every result_id and break consumers' de-duplication.
RESULT_ID_NAMESPACE = uuid.UUID("756d0722-8bd1-481a-bd58-a77305cc550a")
UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def is_interim(status: str) -> bool:
    """Will another result with the same result_id follow this one (held, unsettled)?"""
    return status in INTERIM_STATUSES


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
    #: Only when held: when the hold lapses (Redis's clock) unless the shop confirms.
    hold_expires_at: datetime | None = None

    def __post_init__(self) -> None:
        problems = _status_problems(
            self.status, has_code=self.order_code is not None,
            has_order_id=self.order_id is not None,
            error_code=None if self.error is None else self.error.code,
            has_hold_expiry=self.hold_expires_at is not None)
        for moment in (self.submitted_at, self.finished_at, self.hold_expires_at):
            if moment is not None and moment.utcoffset() is None:
                problems["time"] = ["submitted_at, finished_at and hold_expires_at must be "
                                    "timezone-aware."]
        if problems:
            raise ValueError(f"inconsistent OrderResult: {problems}")


def _status_problems(status: str, *, has_code: bool, has_order_id: bool,
                     error_code: str | None, has_hold_expiry: bool) -> dict[str, Any]:
    """What contradicts the status; shared by the schema and the dataclass.

    ``error_code`` is None when there is no error. The JSON Schema says the same
    in ``OrderResultSchema.json_extra``: change both together.
    """
    problems: dict[str, Any] = {}
    if status not in STATUSES:
        problems["status"] = [f"Must be one of: {', '.join(STATUSES)}."]
        return problems
    if status in (CONFIRMED, HELD):
        if not has_code:
            problems["order_code"] = [f"Required when status is '{status}'."]
        if error_code is not None:
            problems["error"] = [f"Must be absent when status is '{status}'."]
    elif error_code is None:
        problems["error"] = [f"Required when status is '{status}'."]
    elif status in _CODE_OF and error_code != _CODE_OF[status]:
        problems["error"] = {"code": [f"Must be {_CODE_OF[status]} when status is "
                                      f"'{status}'."]}
    if status == EXPIRED and not has_code:
        problems["order_code"] = ["Required when status is 'expired'."]
    if status == UNSETTLED and not (has_code or has_order_id):
        problems["order_code"] = ["order_code or order_id is required when status is "
                                  "'unsettled'."]
    if status == HELD and not has_hold_expiry:
        problems["hold_expires_at"] = ["Required when status is 'held'."]
    elif status != HELD and has_hold_expiry:
        problems["hold_expires_at"] = ["Must be absent unless status is 'held'."]
    return problems


def _when(status: str) -> dict[str, Any]:
    """JSON Schema ``if``: the document has this status."""
    return {"properties": {"status": {"const": status}}, "required": ["status"]}


def _error_code_is(code: str) -> dict[str, Any]:
    return {"properties": {"error": {"properties": {"code": {"const": code}}}}}


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
    # The rules of ``_status_problems``, for producers and consumers in other languages.
    json_extra: ClassVar[Mapping[str, Any]] = {"allOf": [
        {"if": _when(CONFIRMED),
         "then": {"required": ["order_code"], "not": {"required": ["error"]}}},
        {"if": _when(FAILED), "then": {"required": ["error"]}},
        {"if": _when(UNSETTLED),
         "then": {"required": ["error"],
                  "anyOf": [{"required": ["order_code"]}, {"required": ["order_id"]}]}},
        {"if": _when(HELD),
         "then": {"required": ["order_code", "hold_expires_at"], "not": {"required": ["error"]}},
         "else": {"not": {"required": ["hold_expires_at"]}}},
        {"if": _when(CANCELLED),
         "then": {"required": ["error"], **_error_code_is(CANCELLED_CODE)}},
        {"if": _when(EXPIRED),
         "then": {"required": ["error", "order_code"], **_error_code_is(HOLD_EXPIRED_CODE)}},
    ]}

    result_id = Text(required=True, validate=FullMatch(UUID_PATTERN, "Not a lower-case UUID."),
                     metadata={"description": "Stable id of this intent's outcome (a UUID 5 of "
                                              "the reference): de-duplicate on it."})
    reference = reference_field("The intent's reference.", required=True)
    status = Text(required=True, validate=validate.OneOf(STATUSES), metadata={
        "description": "confirmed: the order is bought. failed: nothing was bought. "
                       "unsettled: a confirm was sent and Onebox could not tell by the "
                       "deadline whether it went through (maybe bought: see order_code); "
                       "a settled result with the same result_id follows once it can. "
                       "held (an intent with hold): the seats are held and the order "
                       "pre-confirmed until hold_expires_at; the final result, with the same "
                       "result_id, follows the shop's confirm or cancel, or the hold lapsing. "
                       "cancelled: stopped by a cancel before any confirm was sent; nothing "
                       "bought. expired: a hold lapsed without a confirm; its seats were "
                       "released, nothing bought."})
    batch = reference_field("The intent's batch, if it had one.")
    shop = reference_field("The intent's shop, if it named one.")
    order_code = Text(validate=validate.Length(min=1, max=64), metadata={
        "description": "Onebox's order code; present when confirmed, held or expired, and "
                       "when unsettled or cancelled once pre-confirmed."})
    order_id = Text(validate=validate.Length(min=1, max=64), metadata={
        "description": "Onebox's order id, when an order was created."})
    error = fields.Nested(ResultErrorSchema, metadata={
        "description": "Why the intent failed, is unsettled, was cancelled (code "
                       f"{CANCELLED_CODE}) or expired (code {HOLD_EXPIRED_CODE}); present "
                       "exactly when status is failed, unsettled, cancelled or expired."})
    attempts = StrictInteger(load_default=1, validate=validate.Range(min=1), metadata={
        "description": "How many task runs the purchase took (one or more per stage)."})
    submitted_at = UtcDateTime(metadata={"description": "When the intent was first admitted."})
    finished_at = UtcDateTime(metadata={"description": "When the outcome was settled."})
    hold_expires_at = UtcDateTime(metadata={
        "description": "Only when held, and then present: when the hold lapses (the worker's "
                       "Redis clock) unless the shop confirms it first; an expired result "
                       "follows."})
    metadata = metadata_field("The intent's metadata, copied unchanged.")
    schema_version = schema_version_field()

    @validates_schema
    def _consistent(self, data: dict[str, Any], **kwargs: Any) -> None:
        error = data.get("error")
        problems = _status_problems(
            data["status"], has_code="order_code" in data, has_order_id="order_id" in data,
            error_code=None if error is None else error.code,
            has_hold_expiry="hold_expires_at" in data)
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
