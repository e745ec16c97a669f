"""The purchase intent: what a producer asks the worker to buy, and for whom.

A producer publishes one intent per order it wants; the worker loads it here
and never sees a raw dict again. Loading is strict (a typo in a field name is
an error, not a silently dropped field) because an intent spends money: better
to dead-letter a message with a clear reason than to buy the wrong thing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, cast

from marshmallow import (
    INCLUDE,
    Schema,
    ValidationError,
    fields,
    post_dump,
    post_load,
    validate,
    validates_schema,
)
from marshmallow.types import ErrorMessages

from schemas._fields import (
    FIELD_NAME_PATTERN,
    MAX_MESSAGE_BYTES,
    PHONE_PATTERN,
    EmailText,
    FullMatch,
    OneOfNested,
    ScalarField,
    StrictBoolean,
    StrictInteger,
    StrictSchema,
    Text,
    TupleList,
    canonical_json,
    metadata_field,
    parse_message,
    positive_id,
    reference_field,
    schema_version_field,
)

__all__ = [
    "BULK", "DEFAULT_MAX_QUANTITY", "LANES", "LIVE", "MAX_MESSAGE_BYTES", "AutoItem", "Buyer",
    "Item", "NumberedItem", "PurchaseIntent", "SeatRef", "dump_intent", "intent_schema",
    "load_intent",
]

DEFAULT_MAX_QUANTITY = 50
#: Lanes: ``live`` (a checkout waiting for its answer: dispatched at once, served before
#: bulk) and ``bulk`` (an upload: waits in Redis and is released as capacity frees).
LIVE, BULK = "live", "bulk"
LANES = (LIVE, BULK)
#: Fields that say how an intent travels, not what is bought: left out of the fingerprint.
NOT_FINGERPRINTED = frozenset({"batch", "lane"})
MAX_ITEMS = 20
MAX_PAYMENTS = 10
MAX_BUYER_EXTRA_FIELDS = 20
MAX_BUYER_EXTRA_LENGTH = 256
BUYER_FIELDS = ("email", "name", "surname", "phone")
#: Keys that make an item the automatic shape (``seats`` makes it numbered).
AUTO_ITEM_KEYS = ("session_id", "price_type_id", "quantity")
_FIELD_NAME = re.compile(FIELD_NAME_PATTERN)


@dataclass(frozen=True)
class SeatRef:
    """One exact seat of a numbered session, optionally at a given rate."""

    id: int
    session_id: int
    rate_id: int | None = None


@dataclass(frozen=True)
class NumberedItem:
    """Exact seats the producer chose (Onebox ``POST /orders/seats``)."""

    seats: tuple[SeatRef, ...]


@dataclass(frozen=True)
class AutoItem:
    """A number of seats of one price type, chosen by the venue (``/orders/seats-auto``)."""

    session_id: int
    price_type_id: int
    quantity: int
    rate_id: int | None = None


Item = NumberedItem | AutoItem


@dataclass(frozen=True, repr=False)
class Buyer:
    """Who the tickets are for. Personal data: the repr shows no value at all."""

    email: str
    name: str | None = None
    surname: str | None = None
    phone: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return "Buyer(<redacted>)"

    def as_payload(self) -> dict[str, str]:
        """The body of Onebox's buyer-data call: email, the non-empty named fields, the rest."""
        payload = {"email": self.email}
        for name in ("name", "surname", "phone"):
            value = getattr(self, name)
            if value:
                payload[name] = value
        payload.update({key: value for key, value in self.extra.items() if key not in payload})
        return payload


@dataclass(frozen=True)
class PurchaseIntent:
    """One order to buy. ``reference`` is the producer's idempotency key.

    The same reference is never bought twice; Onebox gets it as ``external_code``
    at confirm, so a confirmed order can always be traced back to its intent.
    """

    reference: str
    items: tuple[Item, ...]
    buyer: Buyer
    delivery_method: str | None = None
    payments: tuple[Mapping[str, Any], ...] | None = field(default=None, repr=False)
    batch: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = 1
    #: ``live`` or ``bulk``; None: the way in decides (``submit``: live, files: bulk).
    lane: str | None = None
    #: Whose work this is, for fair shares of the bulk capacity; None: the default shop.
    shop: str | None = None
    #: Stop once pre-confirmed: publish a ``held`` result and wait for the shop's confirm.
    hold: bool = False

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of this intent: see ``intent_fingerprint``."""
        return intent_fingerprint(dump_intent(self))


class SeatSchema(StrictSchema):
    model = SeatRef
    json_title = "Seat"

    id = positive_id("Onebox seat id.", required=True)
    session_id = positive_id("Onebox session the seat belongs to.", required=True)
    rate_id = positive_id("Onebox rate to sell this seat at; the session's default if absent.")


class NumberedItemSchema(StrictSchema):
    model = NumberedItem
    json_title = "NumberedItem"

    seats = TupleList(
        fields.Nested(SeatSchema), required=True,
        validate=validate.Length(min=1, max=DEFAULT_MAX_QUANTITY),
        metadata={"description": "The exact seats to add. No (id, session_id) may appear "
                                 "twice in the whole intent."},
    )

    def __init__(self, *, max_quantity: int = DEFAULT_MAX_QUANTITY, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fields["seats"].validators = [validate.Length(min=1, max=max_quantity)]


class AutoItemSchema(StrictSchema):
    model = AutoItem
    json_title = "AutoItem"

    session_id = positive_id("Onebox session.", required=True)
    price_type_id = positive_id("Onebox price type (zone) to take seats from.", required=True)
    quantity = StrictInteger(required=True,
                             validate=validate.Range(min=1, max=DEFAULT_MAX_QUANTITY),
                             metadata={"description": "How many seats the venue should pick."})
    rate_id = positive_id("Onebox rate to sell the seats at; the session's default if absent.")

    def __init__(self, *, max_quantity: int = DEFAULT_MAX_QUANTITY, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fields["quantity"].validators = [validate.Range(min=1, max=max_quantity)]


@lru_cache(maxsize=8)
def _item_schemas(max_quantity: int) -> tuple[NumberedItemSchema, AutoItemSchema]:
    return (NumberedItemSchema(max_quantity=max_quantity),
            AutoItemSchema(max_quantity=max_quantity))


class ItemField(OneOfNested):
    """An item of either shape; which one is told by the keys present."""

    # marshmallow merges this per class and never mutates it.
    default_error_messages: ErrorMessages = {  # noqa: RUF012
        "type": "Must be an object.",
        "both": "An item is either numbered ('seats') or automatic ('session_id', "
                "'price_type_id', 'quantity'), not both.",
        "neither": "An item needs 'seats' (numbered) or 'session_id', 'price_type_id' "
                   "and 'quantity' (automatic).",
    }

    def choices(self) -> Sequence[Schema]:
        return _item_schemas(getattr(self.root, "max_quantity", DEFAULT_MAX_QUANTITY))

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> Item:
        if not isinstance(value, Mapping):
            raise self.make_error("type")
        numbered, auto = self.choices()
        is_numbered = "seats" in value
        is_auto = any(key in value for key in AUTO_ITEM_KEYS)
        if is_numbered == is_auto:
            reason = self.error_messages["both" if is_numbered else "neither"]
            raise ValidationError({"_schema": [reason]})
        return cast(Item, (numbered if is_numbered else auto).load(value))

    def _serialize(self, value: Item | None, attr: str | None, obj: Any,
                   **kwargs: Any) -> Any:
        if value is None:
            return None
        numbered, auto = self.choices()
        return (numbered if isinstance(value, NumberedItem) else auto).dump(value)


class BuyerSchema(StrictSchema):
    """The buyer: named fields checked here, up to 20 other string fields passed on as-is."""

    json_title = "Buyer"
    json_extra: ClassVar[Mapping[str, Any]] = {
        "description": f"Up to {MAX_BUYER_EXTRA_FIELDS} other fields, all strings, are "
                       "passed to Onebox's buyer-data call as they are.",
        "additionalProperties": {"type": "string", "maxLength": MAX_BUYER_EXTRA_LENGTH,
                                 "description": "Another buyer field for Onebox."},
        "propertyNames": {"pattern": f"^{FIELD_NAME_PATTERN}$", "maxLength": 64},
        "maxProperties": len(BUYER_FIELDS) + MAX_BUYER_EXTRA_FIELDS,
    }

    class Meta:
        unknown = INCLUDE

    email = EmailText(required=True, metadata={"description": "The buyer's email address."})
    name = Text(validate=validate.Length(max=128), metadata={"description": "First name."})
    surname = Text(validate=validate.Length(max=128), metadata={"description": "Last name."})
    phone = Text(
        validate=[validate.Length(max=32),
                  FullMatch(PHONE_PATTERN, "Must use only digits, spaces and + - ( ).")],
        metadata={"description": "Phone number: digits, spaces and + - ( ) only."},
    )

    @validates_schema(pass_original=True, skip_on_field_errors=False)
    def _check_extra(self, data: Any, original_data: object, **kwargs: Any) -> None:
        if not isinstance(original_data, Mapping):
            return  # marshmallow has refused it already
        extra = {key: value for key, value in original_data.items() if key not in BUYER_FIELDS}
        errors: dict[str, list[str]] = {}
        if len(extra) > MAX_BUYER_EXTRA_FIELDS:
            errors["_schema"] = [f"At most {MAX_BUYER_EXTRA_FIELDS} fields besides "
                                 f"{', '.join(BUYER_FIELDS)}."]
        for key, value in extra.items():
            if not (isinstance(key, str) and len(key) <= 64 and _FIELD_NAME.fullmatch(key)):
                errors[str(key)[:64]] = ["Not a valid field name: use 1 to 64 of a-z 0-9 _, "
                                         "starting with a letter."]
            elif not isinstance(value, str):
                errors[key] = ["Not a valid string."]
            elif len(value) > MAX_BUYER_EXTRA_LENGTH:
                errors[key] = [f"Longer than maximum length {MAX_BUYER_EXTRA_LENGTH}."]
        if errors:
            raise ValidationError(errors)

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> Buyer:
        named = {key: data[key] for key in BUYER_FIELDS if key in data}
        extra = {key: value for key, value in data.items() if key not in BUYER_FIELDS}
        return Buyer(**named, extra=extra)

    @post_dump(pass_original=True)
    def _add_extra(self, data: dict[str, Any], original: Buyer, **kwargs: Any) -> dict[str, Any]:
        extra = {key: value for key, value in original.extra.items() if key not in data}
        return {**data, **extra}


class IntentSchema(StrictSchema):
    """The whole intent. ``max_quantity`` caps seats per item; see ``load_intent``."""

    model = PurchaseIntent
    json_title = "PurchaseIntent"
    # ``hold`` false is left out, so every intent written before it existed keeps its
    # dump, and with it its fingerprint.
    omit_when_empty = frozenset({"metadata", "hold"})

    reference = reference_field(
        "The producer's idempotency key: one order at most per reference. Sent to Onebox "
        "as external_code at confirm.", required=True)
    items = TupleList(
        ItemField(), required=True, validate=validate.Length(min=1, max=MAX_ITEMS),
        metadata={"description": f"What to buy: 1 to {MAX_ITEMS} items, each numbered "
                                 "(exact seats) or automatic (the venue picks)."},
    )
    buyer = fields.Nested(BuyerSchema, required=True,
                          metadata={"description": "Who the tickets are for."})
    delivery_method = Text(validate=validate.Length(min=1, max=64), metadata={
        "description": "Passed to Onebox at pre-confirm."})
    payments = TupleList(
        fields.Dict(keys=Text(), values=ScalarField()),
        validate=validate.Length(max=MAX_PAYMENTS),
        metadata={"description": f"Passed to Onebox at confirm: up to {MAX_PAYMENTS} objects "
                                 "of strings, numbers and booleans."},
    )
    batch = reference_field("Groups intents for reporting; copied into the result.")
    lane = Text(validate=validate.OneOf(LANES, error="Must be one of: live, bulk."), metadata={
        "description": "live: a checkout waiting for its answer, bought before any bulk work; "
                       "bulk: an upload, released as capacity frees, shared fairly between "
                       "shops. Absent: live for one intent submitted (or pushed on the "
                       "intake list), bulk for submit_many and files."})
    shop = reference_field(
        "Whose work this is: the fleet's bulk capacity is shared equally between the shops "
        "with bulk work waiting. Absent: the default shop. Copied into the result.")
    hold = StrictBoolean(load_default=False, metadata={
        "description": "true: stop once the seats are held and the order pre-confirmed, "
                       "publish a 'held' result (the order code and hold_expires_at) and "
                       "wait for the shop to confirm or cancel; a hold not confirmed by "
                       "hold_expires_at is released ('expired'). false or absent: bought "
                       "straight through. Part of the fingerprint when true."})
    metadata = metadata_field(
        "Producer data copied into the result: at most 16 keys of 1 to 64 characters, "
        "scalar or null values, at most 2048 bytes as compact JSON.")
    schema_version = schema_version_field()

    def __init__(self, *, max_quantity: int = DEFAULT_MAX_QUANTITY, **kwargs: Any) -> None:
        if isinstance(max_quantity, bool) or not isinstance(max_quantity, int) or max_quantity < 1:
            raise ValueError("max_quantity must be a positive integer")
        self.max_quantity = max_quantity
        super().__init__(**kwargs)

    @validates_schema
    def _no_duplicate_seats(self, data: dict[str, Any], **kwargs: Any) -> None:
        seen: set[tuple[int, int]] = set()
        errors: dict[int, dict[str, dict[int, list[str]]]] = {}
        for i, item in enumerate(data["items"]):
            if not isinstance(item, NumberedItem):
                continue
            for j, seat in enumerate(item.seats):
                key = (seat.id, seat.session_id)
                if key in seen:
                    errors.setdefault(i, {}).setdefault("seats", {})[j] = [
                        "Duplicate seat: the same id and session_id appear earlier in the intent."]
                seen.add(key)
        if errors:
            raise ValidationError({"items": errors})


@lru_cache(maxsize=8)
def intent_schema(max_quantity: int = DEFAULT_MAX_QUANTITY) -> IntentSchema:
    """The (reusable, stateless) schema for a given cap on seats per item."""
    return IntentSchema(max_quantity=max_quantity)


def load_intent(data: Mapping[str, Any] | str | bytes, *,
                max_quantity: int = DEFAULT_MAX_QUANTITY) -> PurchaseIntent:
    """Check and load an intent, or raise ``ValidationError`` naming every bad field.

    Accepts the message as JSON text, bytes or a decoded mapping; anything over
    ``MAX_MESSAGE_BYTES`` is refused before it is parsed.
    """
    document = parse_message(data, MAX_MESSAGE_BYTES)
    return cast(PurchaseIntent, intent_schema(max_quantity).load(document))


def intent_fingerprint(document: Mapping[str, Any]) -> str:
    """SHA-256 of an intent's canonical JSON (``dump_intent``) without ``batch`` and ``lane``.

    Tells a redelivery (a duplicate) from a reference reused for another
    purchase (a conflict), on every way in: the ledger's admission uses it.
    The ``batch`` is left out: it groups intents for reporting and is not part
    of the purchase, so the same intent sent again without a batch, or in
    another batch, is a duplicate, not a conflict. So is the ``lane``: how an
    intent travels, not what is bought (a checkout retried as a file line is
    the same purchase). The ``shop`` is kept: a reference another shop used
    for the same seats is someone else's order, a conflict to report, never
    a duplicate silently taken as the first shop's. So is ``hold`` when true
    (a held purchase is another purchase than one bought straight through);
    false is not dumped, so intents from before ``hold`` keep their fingerprint.
    """
    return hashlib.sha256(canonical_json(
        {key: value for key, value in document.items()
         if key not in NOT_FINGERPRINTED})).hexdigest()


def dump_intent(intent: PurchaseIntent) -> dict[str, Any]:
    """The JSON-ready form of an intent; ``load_intent`` gives back an equal one."""
    return cast(dict[str, Any], intent_schema().dump(intent))
