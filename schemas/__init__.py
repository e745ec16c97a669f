"""The message contracts of the fulfilment worker, and what Onebox's API answers.

Pure data: this package does no I/O (``jsonschema.write_json_schemas`` writes
files only when called) and imports nothing from ``fulfilment`` or ``tasks``,
so producers and consumers can use it without the worker's dependencies.
Every loader raises ``marshmallow.ValidationError`` whose ``messages`` name
each bad field and never repeat the rejected value.
"""

from marshmallow import ValidationError

from schemas._fields import MAX_MESSAGE_BYTES, canonical_json
from schemas.intent import (
    DEFAULT_MAX_QUANTITY,
    AutoItem,
    Buyer,
    Item,
    NumberedItem,
    PurchaseIntent,
    SeatRef,
    dump_intent,
    load_intent,
)
from schemas.onebox import (
    ORDER_STATUSES,
    AccessToken,
    ApiError,
    Order,
    OrderItem,
    load_api_error,
    load_order,
    load_token,
)
from schemas.result import (
    CANCELLED,
    CONFIRMED,
    EXPIRED,
    FAILED,
    HELD,
    UNSETTLED,
    OrderResult,
    ResultError,
    dump_result,
    is_interim,
    load_result,
    result_id_for,
)

__all__ = [
    "CANCELLED",
    "CONFIRMED",
    "DEFAULT_MAX_QUANTITY",
    "EXPIRED",
    "FAILED",
    "HELD",
    "MAX_MESSAGE_BYTES",
    "ORDER_STATUSES",
    "UNSETTLED",
    "AccessToken",
    "ApiError",
    "AutoItem",
    "Buyer",
    "Item",
    "NumberedItem",
    "Order",
    "OrderItem",
    "OrderResult",
    "PurchaseIntent",
    "ResultError",
    "SeatRef",
    "ValidationError",
    "canonical_json",
    "dump_intent",
    "dump_result",
    "is_interim",
    "load_api_error",
    "load_intent",
    "load_order",
    "load_result",
    "load_token",
    "result_id_for",
]
