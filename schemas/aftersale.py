"""The after-sale event: a refund or cancellation of an order, made anywhere.

Onebox tells the channel by webhook when an order is refunded or cancelled,
whoever did it (the box office, Onebox's console, this channel). The worker
publishes one event per (order code, action) on the results exchange with the
routing key ``aftersale.refund`` or ``aftersale.cancel``. Like a result, it
may be delivered more than once (a worker died between publishing and
recording it): ``event_id`` is the same for every copy (a UUID 5 of the order
code and the action), so consumers de-duplicate on it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from marshmallow import validate

from schemas._fields import (
    MAX_MESSAGE_BYTES,
    FullMatch,
    StrictSchema,
    Text,
    UtcDateTime,
    parse_message,
    reference_field,
    schema_version_field,
)
from schemas.result import UUID_PATTERN

__all__ = ["ACTIONS", "AFTERSALE_ID_NAMESPACE", "CANCEL", "REFUND", "AftersaleEvent",
           "aftersale_id_for", "dump_aftersale", "load_aftersale", "routing_key_for_action"]

REFUND = "refund"
CANCEL = "cancel"
ACTIONS = (REFUND, CANCEL)
#: Fixed forever: changing it would change every event_id and break consumers' de-duplication.
AFTERSALE_ID_NAMESPACE = uuid.UUID("5b0f6d3e-58a4-4c1e-9b8e-2f0c7d6a1e93")
#: Onebox order codes: short, upper-case letters and digits (a little wider, to be safe).
ORDER_CODE_PATTERN = r"[A-Za-z0-9_-]{1,64}"


def aftersale_id_for(order_code: str, action: str) -> str:
    """The event id of (order code, action): the same for every webhook delivery and copy."""
    return str(uuid.uuid5(AFTERSALE_ID_NAMESPACE, f"{order_code}:{action}"))


def routing_key_for_action(action: str) -> str:
    return f"aftersale.{action}"


@dataclass(frozen=True)
class AftersaleEvent:
    """One refund or cancellation of an order, as the shop receives it."""

    event_id: str
    order_code: str
    action: str
    received_at: datetime
    #: The intent whose order this is, when this deployment bought it.
    reference: str | None = None
    #: That intent's shop, if it named one.
    shop: str | None = None
    #: Onebox's ``ob-subtype``, when it sent one.
    subtype: str | None = None
    schema_version: int = 1

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"inconsistent AftersaleEvent: action must be one of {ACTIONS}")
        if self.received_at.utcoffset() is None:
            raise ValueError("inconsistent AftersaleEvent: received_at must be timezone-aware")


class AftersaleEventSchema(StrictSchema):
    model = AftersaleEvent
    json_title = "AftersaleEvent"

    event_id = Text(required=True, validate=FullMatch(UUID_PATTERN, "Not a lower-case UUID."),
                    metadata={"description": "Stable id of this (order code, action) (a UUID 5 "
                                             "of both): de-duplicate on it."})
    order_code = Text(required=True, validate=FullMatch(
        ORDER_CODE_PATTERN, "Must be 1-64 of A-Z a-z 0-9 _ -"), metadata={
        "description": "Onebox's order code."})
    action = Text(required=True, validate=validate.OneOf(ACTIONS), metadata={
        "description": "refund: items of the order were refunded; cancel: the order was "
                       "cancelled. Wherever it was done (box office, Onebox's console, us)."})
    received_at = UtcDateTime(required=True, metadata={
        "description": "When the webhook that told us was received (Redis's clock)."})
    reference = reference_field("The intent whose order this is, when this deployment bought "
                                "it (absent: an order made elsewhere, or past the retention).")
    shop = reference_field("That intent's shop, if it named one.")
    subtype = Text(validate=validate.Length(min=1, max=64), metadata={
        "description": "Onebox's ob-subtype header, when it sent one."})
    schema_version = schema_version_field()


_SCHEMA = AftersaleEventSchema()


def load_aftersale(data: Mapping[str, Any] | str | bytes) -> AftersaleEvent:
    """Check and load an after-sale event, or raise ``ValidationError`` naming every bad field."""
    return cast(AftersaleEvent, _SCHEMA.load(parse_message(data, MAX_MESSAGE_BYTES)))


def dump_aftersale(event: AftersaleEvent) -> dict[str, Any]:
    """The JSON-ready form; ``load_aftersale`` gives back an equal event."""
    return cast(dict[str, Any], _SCHEMA.dump(event))
