"""The refund contracts: a refund request in, one refund result out.

A request names what to refund: a purchase by its ``reference`` (the worker
finds its order code in the ledger) or an Onebox ``order_code``, and which
``items`` (absent: the whole order). Its ``refund_id`` makes it happen once:
the same id again is the same refund. Left out, the id is derived from what
is refunded (target and items), so a request sent twice without one is one
refund too. ``reason`` and ``metadata`` ride along; they are not part of what
makes two requests the same refund (``refund_fingerprint``).

The result's ``result_id`` is a UUID 5 of the refund id: the same on every
copy a broker may deliver, so consumers de-duplicate on it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from marshmallow import ValidationError, fields, validate, validates_schema

from schemas._fields import (
    MAX_MESSAGE_BYTES,
    FullMatch,
    StrictBoolean,
    StrictInteger,
    StrictSchema,
    Text,
    TupleList,
    UtcDateTime,
    canonical_json,
    metadata_field,
    parse_message,
    positive_id,
    reference_field,
    schema_version_field,
)
from schemas.result import RESULT_ID_NAMESPACE, UUID_PATTERN, ResultError, ResultErrorSchema

__all__ = [
    "REFUNDED", "REFUND_FAILED", "REFUND_STATUSES", "RefundRequest", "RefundResult",
    "derive_refund_id", "dump_refund", "dump_refund_result", "load_refund",
    "load_refund_result", "refund_fingerprint", "refund_result_id",
]

REFUNDED = "refunded"
REFUND_FAILED = "failed"
REFUND_STATUSES = (REFUNDED, REFUND_FAILED)
#: Items one request may name (an order holds at most this many in the sandbox too).
MAX_REFUND_ITEMS = 1000
MAX_REASON = 256


def derive_refund_id(reference: str | None, order_code: str | None,
                     items: tuple[int, ...]) -> str:
    """The id of a request that names none: the same target and items, the same id."""
    what = canonical_json({"reference": reference, "order_code": order_code,
                           "items": sorted(items)})
    return "refund-" + str(uuid.uuid5(RESULT_ID_NAMESPACE, what.decode()))


def refund_result_id(refund_id: str) -> str:
    """The result id of a refund: a UUID 5 of its id (apart from purchase results' ids)."""
    return str(uuid.uuid5(RESULT_ID_NAMESPACE, f"refund:{refund_id}"))


@dataclass(frozen=True)
class RefundRequest:
    """One refund: of a purchase (``reference``) or an order (``order_code``), all or some items."""

    refund_id: str | None = None
    reference: str | None = None
    order_code: str | None = None
    #: Onebox item ids; empty: every item of the order.
    items: tuple[int, ...] = ()
    #: Whether the surcharges are refunded too (Onebox's surcharge flags).
    surcharges: bool = True
    reason: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = 1

    def __post_init__(self) -> None:
        if (self.reference is None) == (self.order_code is None):
            raise ValueError("a refund names a reference or an order_code, exactly one")
        items = tuple(sorted(set(self.items)))
        object.__setattr__(self, "items", items)
        if self.refund_id is None:
            object.__setattr__(self, "refund_id",
                               derive_refund_id(self.reference, self.order_code, items))

    @property
    def id(self) -> str:
        """The refund id (given, or derived)."""
        assert self.refund_id is not None  # set by __post_init__
        return self.refund_id

    @property
    def target(self) -> str:
        """What is refunded, for people: ``purchase REF`` or ``order CODE``."""
        return f"purchase {self.reference}" if self.reference else f"order {self.order_code}"


class RefundRequestSchema(StrictSchema):
    model = RefundRequest
    json_title = "RefundRequest"
    omit_when_empty = frozenset({"metadata", "items"})

    refund_id = reference_field("Makes the refund happen once: the same id again is the same "
                                "refund. Absent: derived from the target and the items.")
    reference = reference_field("The purchase to refund (its intent's reference); the worker "
                                "finds the order code. Exactly one of reference and "
                                "order_code.")
    order_code = Text(validate=[validate.Length(min=1, max=64),
                                FullMatch(r"[A-Za-z0-9._:-]+", "Not an order code.")],
                      metadata={"description": "The Onebox order code to refund."})
    items = TupleList(positive_id("An Onebox item id of the order."),
                      validate=validate.Length(max=MAX_REFUND_ITEMS), load_default=(),
                      metadata={"description": "The items to refund; absent or empty: "
                                               "every item of the order."})
    surcharges = StrictBoolean(load_default=True, metadata={
        "description": "Refund the surcharges too (default true)."})
    reason = Text(validate=validate.Length(max=MAX_REASON), metadata={
        "description": "Why, for people; no personal data."})
    metadata = metadata_field("The producer's data, copied to the result.")
    schema_version = schema_version_field()

    @validates_schema
    def _one_target(self, data: dict[str, Any], **kwargs: Any) -> None:
        if ("reference" in data) == ("order_code" in data):
            raise ValidationError("Exactly one of reference and order_code is required.",
                                  "_schema")
        items = data.get("items") or ()
        if len(set(items)) != len(items):
            raise ValidationError("An item may be named once.", "items")


@dataclass(frozen=True)
class RefundResult:
    """What became of one refund request."""

    result_id: str
    refund_id: str
    status: str
    reference: str | None = None
    order_code: str | None = None
    #: The items refunded (every item of the order for a whole-order refund).
    items: tuple[int, ...] = ()
    #: Onebox said the items were refunded already (a repeated refund): nothing new done.
    already_refunded: bool = False
    error: ResultError | None = None
    attempts: int = 1
    requested_at: datetime | None = None
    finished_at: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = 1

    def __post_init__(self) -> None:
        problems = _status_problems(self.status, self.order_code is not None,
                                    self.error is not None)
        if problems:
            raise ValueError(f"inconsistent RefundResult: {problems}")


def _status_problems(status: str, has_code: bool, has_error: bool) -> dict[str, list[str]]:
    problems: dict[str, list[str]] = {}
    if status not in REFUND_STATUSES:
        problems["status"] = [f"Must be one of: {', '.join(REFUND_STATUSES)}."]
    elif status == REFUNDED:
        if not has_code:
            problems["order_code"] = ["Required when status is 'refunded'."]
        if has_error:
            problems["error"] = ["Must be absent when status is 'refunded'."]
    elif not has_error:
        problems["error"] = ["Required when status is 'failed'."]
    return problems


class RefundResultSchema(StrictSchema):
    model = RefundResult
    json_title = "RefundResult"
    omit_when_empty = frozenset({"metadata", "items"})

    result_id = Text(required=True, validate=FullMatch(UUID_PATTERN, "Not a lower-case UUID."),
                     metadata={"description": "Stable id of this refund's outcome (a UUID 5 "
                                              "of the refund id): de-duplicate on it."})
    refund_id = reference_field("The refund request's id.", required=True)
    status = Text(required=True, validate=validate.OneOf(REFUND_STATUSES), metadata={
        "description": "refunded: Onebox shows the items refunded. failed: nothing refunded."})
    reference = reference_field("The purchase refunded, when the request named one.")
    order_code = Text(validate=validate.Length(min=1, max=64), metadata={
        "description": "The Onebox order code; present when refunded."})
    items = TupleList(StrictInteger(), load_default=(), metadata={
        "description": "The item ids refunded."})
    already_refunded = StrictBoolean(load_default=False, metadata={
        "description": "Onebox answered that the items were refunded already."})
    error = fields.Nested(ResultErrorSchema, metadata={
        "description": "Why the refund failed; present exactly when status is failed."})
    attempts = StrictInteger(load_default=1, validate=validate.Range(min=1))
    requested_at = UtcDateTime(metadata={"description": "When the request was taken in."})
    finished_at = UtcDateTime(metadata={"description": "When the outcome was settled."})
    metadata = metadata_field("The request's metadata, copied unchanged.")
    schema_version = schema_version_field()

    @validates_schema
    def _consistent(self, data: dict[str, Any], **kwargs: Any) -> None:
        problems = _status_problems(data["status"], "order_code" in data, "error" in data)
        if problems:
            raise ValidationError(problems)


_REQUEST = RefundRequestSchema()
_RESULT = RefundResultSchema()


def load_refund(data: Mapping[str, Any] | str | bytes) -> RefundRequest:
    """Check and load a refund request, or raise ``ValidationError`` naming every bad field."""
    return cast(RefundRequest, _REQUEST.load(parse_message(data, MAX_MESSAGE_BYTES)))


def dump_refund(request: RefundRequest) -> dict[str, Any]:
    """The JSON-ready form of a request (its id included, derived or not)."""
    return cast(dict[str, Any], _REQUEST.dump(request))


def refund_fingerprint(request: RefundRequest) -> str:
    """What makes two requests the same refund: target, items and surcharges."""
    what = {"reference": request.reference, "order_code": request.order_code,
            "items": list(request.items), "surcharges": request.surcharges}
    return hashlib.sha256(canonical_json(what)).hexdigest()


def load_refund_result(data: Mapping[str, Any] | str | bytes) -> RefundResult:
    return cast(RefundResult, _RESULT.load(parse_message(data, MAX_MESSAGE_BYTES)))


def dump_refund_result(result: RefundResult) -> dict[str, Any]:
    return cast(dict[str, Any], _RESULT.dump(result))
