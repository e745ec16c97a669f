"""What Onebox's API answers, loaded into small frozen dataclasses.

The opposite stance to the message contracts: fields we do not know are
ignored, because Onebox may add fields at any time and that must not stop a
purchase. Fields we rely on are still checked, and a missing or mistyped one
raises ``ValidationError``: acting on a half-understood order is worse.
Only what the worker needs is kept; ``buyer_data`` (personal data) is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from marshmallow import EXCLUDE, Schema, fields, post_load, validate

from schemas._fields import StrictInteger, Text

__all__ = [
    "ITEM_REFUNDED", "ORDER_STATUSES", "AccessToken", "ApiError", "Order", "OrderItem",
    "load_api_error", "load_order", "load_token",
]

#: The statuses the distribution API documents, in the order an order goes through them.
ORDER_STATUSES = ("BASKET", "PRE_CONFIRM", "CONFIRM")
#: An item's ``state`` once refunded (orders-management API); the order stays ``CONFIRM``.
ITEM_REFUNDED = "REFUNDED"


@dataclass(frozen=True)
class AccessToken:
    """An OAuth token from ``/oauth/token``. The secrets stay out of its repr."""

    access_token: str = field(repr=False)
    token_type: str
    expires_in: int
    refresh_token: str | None = field(default=None, repr=False)
    scope: str | None = None
    jti: str | None = None


@dataclass(frozen=True)
class OrderItem:
    """One line of an order: its id (to release it) and where it sits."""

    id: int
    type: str | None = None
    state: str | None = None
    session_id: int | None = None
    seat_id: int | None = None
    price_type_id: int | None = None


@dataclass(frozen=True)
class Order:
    """An order as the API returns it, flattened to what the flow acts on."""

    id: str
    status: str
    code: str | None = None
    external_code: str | None = None
    items: tuple[OrderItem, ...] = ()
    expires_at: datetime | None = None

    def refunded(self, item_ids: tuple[int, ...] | None = None) -> bool:
        """Whether these items (None or empty: every item) all read ``REFUNDED``.

        An order without items proves nothing: False. An item id the order does
        not hold is not refunded.
        """
        states = {item.id: item.state for item in self.items}
        wanted = item_ids or tuple(states)
        return bool(wanted) and all(states.get(item_id) == ITEM_REFUNDED for item_id in wanted)


@dataclass(frozen=True)
class ApiError:
    """An error body: Onebox's ``code``/``message`` or OAuth's ``error``/``error_description``."""

    code: str
    message: str


def _optional_text() -> Text:
    return Text(load_default=None, allow_none=True)


def _optional_int() -> StrictInteger:
    return StrictInteger(load_default=None, allow_none=True)


class _Lenient(Schema):
    """Ignore unknown fields, and treat null like an absent optional field."""

    class Meta:
        unknown = EXCLUDE


class _IdRef(_Lenient):
    id = _optional_int()


class _Allocation(_Lenient):
    session = fields.Nested(_IdRef, load_default=None, allow_none=True)
    seat = fields.Nested(_IdRef, load_default=None, allow_none=True)
    price_type = fields.Nested(_IdRef, load_default=None, allow_none=True)


class _OrderItemSchema(_Lenient):
    id = StrictInteger(required=True)
    type = _optional_text()
    state = _optional_text()
    allocation = fields.Nested(_Allocation, load_default=None, allow_none=True)

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> OrderItem:
        allocation = data["allocation"] or {}

        def ref(name: str) -> int | None:
            return cast(int | None, (allocation.get(name) or {}).get("id"))

        return OrderItem(id=data["id"], type=data["type"], state=data["state"],
                         session_id=ref("session"), seat_id=ref("seat"),
                         price_type_id=ref("price_type"))


class _LenientDateTime(fields.DateTime):
    """ISO 8601 as Onebox writes it; a time without a zone is taken as UTC."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> datetime:
        if not isinstance(value, str):
            raise self.make_error("invalid", input=None, obj_type="datetime")
        parsed = super()._deserialize(value, attr, data, **kwargs)
        return parsed.replace(tzinfo=UTC) if parsed.utcoffset() is None else parsed.astimezone(UTC)


class _ExpiresIn(_Lenient):
    date = _LenientDateTime(load_default=None, allow_none=True)


class _Status(_Lenient):
    type = Text(required=True, validate=validate.Length(min=1))
    expires_in = fields.Nested(_ExpiresIn, load_default=None, allow_none=True)


class _OrderSchema(_Lenient):
    id = Text(required=True, validate=validate.Length(min=1))
    status = fields.Nested(_Status, required=True)
    code = _optional_text()
    external_code = _optional_text()
    items = fields.List(fields.Nested(_OrderItemSchema), load_default=None, allow_none=True)

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> Order:
        expires_in = data["status"]["expires_in"] or {}
        return Order(id=data["id"], status=data["status"]["type"], code=data["code"],
                     external_code=data["external_code"], items=tuple(data["items"] or ()),
                     expires_at=expires_in.get("date"))


class _TokenSchema(_Lenient):
    access_token = Text(required=True, validate=validate.Length(min=1))
    token_type = Text(required=True)
    expires_in = StrictInteger(required=True, validate=validate.Range(min=0))
    refresh_token = _optional_text()
    scope = _optional_text()
    jti = _optional_text()

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> AccessToken:
        return AccessToken(**data)


_TOKEN = _TokenSchema()
_ORDER = _OrderSchema()


def load_token(data: Any) -> AccessToken:
    """The token response of ``/oauth/token``, decoded from JSON."""
    return cast(AccessToken, _TOKEN.load(data))


def load_order(data: Any) -> Order:
    """An order response (any distribution-api or orders-mgmt-api call), decoded from JSON."""
    return cast(Order, _ORDER.load(data))


def load_api_error(data: Any) -> ApiError | None:
    """The error in a response body, or None when the body is not an error shape.

    Never raises: it is called on bodies of failed calls, which can be anything.
    An order (it has ``code`` too, but also ``id`` and ``status``) is not an error.
    """
    if not isinstance(data, Mapping) or ("id" in data and "status" in data):
        return None
    for code_key, message_key in (("code", "message"), ("error", "error_description")):
        code = data.get(code_key)
        if isinstance(code, str) and code:
            message = data.get(message_key)
            return ApiError(code=code, message=message if isinstance(message, str) else "")
    return None
