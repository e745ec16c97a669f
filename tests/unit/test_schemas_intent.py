"""The purchase intent contract: what loads, what is refused, and how refusals read."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest
from marshmallow import ValidationError

from schemas import (
    MAX_MESSAGE_BYTES,
    AutoItem,
    Buyer,
    NumberedItem,
    PurchaseIntent,
    SeatRef,
    dump_intent,
    load_intent,
)

Doc = dict[str, Any]


def valid() -> Doc:
    return {
        "reference": "order-1",
        "items": [
            {"seats": [{"id": 101, "session_id": 7}, {"id": 102, "session_id": 7, "rate_id": 3}]},
            {"session_id": 7, "price_type_id": 2, "quantity": 2},
        ],
        "buyer": {"email": "ana@example.com"},
    }


def messages_of(data: Any, **kwargs: Any) -> dict[Any, Any]:
    with pytest.raises(ValidationError) as caught:
        load_intent(data, **kwargs)
    messages = caught.value.messages
    assert isinstance(messages, dict)
    return messages


def at(messages: Any, path: tuple[Any, ...]) -> list[str]:
    """The messages at ``path``; fails with the whole error when there are none."""
    node = messages
    for key in path:
        assert isinstance(node, dict), f"no error at {path}: {messages}"
        assert key in node, f"no error at {path}: {messages}"
        node = node[key]
    if isinstance(node, dict):  # e.g. a Dict field's {"key": [...], "value": [...]}
        node = [message for value in node.values() for message in value]
    found: list[str] = list(node)
    assert found, messages
    assert all(isinstance(message, str) and message for message in found), found
    return found


def _set(path: tuple[Any, ...], value: Any) -> Callable[[Doc], None]:
    def edit(doc: Doc) -> None:
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _delete(path: tuple[Any, ...]) -> Callable[[Doc], None]:
    def edit(doc: Doc) -> None:
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


AUTO = ("items", 1)
SEAT = ("items", 0, "seats", 0)
SEAT_KEYS = {"seats": [{"id": 1, "session_id": 1}]}
AUTO_KEYS = {"session_id": 1, "price_type_id": 1, "quantity": 1}

#: (case, edit of the valid intent, where the error must be)
BAD_CASES: list[tuple[str, Callable[[Doc], None], tuple[Any, ...]]] = [
    ("missing reference", _delete(("reference",)), ("reference",)),
    ("reference bad pattern", _set(("reference",), "order 1"), ("reference",)),
    ("reference trailing newline", _set(("reference",), "order-1\n"), ("reference",)),
    ("reference too long", _set(("reference",), "r" * 65), ("reference",)),
    ("reference empty", _set(("reference",), ""), ("reference",)),
    ("reference not a string", _set(("reference",), 12), ("reference",)),
    ("reference null", _set(("reference",), None), ("reference",)),
    ("missing items", _delete(("items",)), ("items",)),
    ("no items", _set(("items",), []), ("items",)),
    ("21 items", _set(("items",), [dict(AUTO_KEYS) for _ in range(21)]), ("items",)),
    ("items not a list", _set(("items",), {"seats": []}), ("items",)),
    ("item not an object", _set(("items", 0), 5), ("items", 0)),
    ("item with both shapes", _set(("items", 0), {**SEAT_KEYS, **AUTO_KEYS}),
     ("items", 0, "_schema")),
    ("item with neither shape", _set(("items", 0), {"rate_id": 1}), ("items", 0, "_schema")),
    ("empty item", _set(("items", 0), {}), ("items", 0, "_schema")),
    ("quantity 0", _set((*AUTO, "quantity"), 0), (*AUTO, "quantity")),
    ("quantity 51", _set((*AUTO, "quantity"), 51), (*AUTO, "quantity")),
    ("quantity as a string", _set((*AUTO, "quantity"), "3"), (*AUTO, "quantity")),
    ("quantity true", _set((*AUTO, "quantity"), True), (*AUTO, "quantity")),
    ("quantity 2.5", _set((*AUTO, "quantity"), 2.5), (*AUTO, "quantity")),
    ("quantity 2.0", _set((*AUTO, "quantity"), 2.0), (*AUTO, "quantity")),
    ("quantity null", _set((*AUTO, "quantity"), None), (*AUTO, "quantity")),
    ("missing quantity", _delete((*AUTO, "quantity")), (*AUTO, "quantity")),
    ("missing price type", _delete((*AUTO, "price_type_id")), (*AUTO, "price_type_id")),
    ("session id negative", _set((*AUTO, "session_id"), -4), (*AUTO, "session_id")),
    ("rate id false", _set((*AUTO, "rate_id"), False), (*AUTO, "rate_id")),
    ("unknown item field", _set((*AUTO, "colour"), "red"), (*AUTO, "colour")),
    ("item-level rate on numbered item", _set(("items", 0, "rate_id"), 1),
     ("items", 0, "rate_id")),
    ("no seats", _set(("items", 0, "seats"), []), ("items", 0, "seats")),
    ("51 seats", _set(("items", 0, "seats"),
                      [{"id": n, "session_id": 9} for n in range(1, 52)]), ("items", 0, "seats")),
    ("seat id as a string", _set((*SEAT, "id"), "101"), (*SEAT, "id")),
    ("seat id zero", _set((*SEAT, "id"), 0), (*SEAT, "id")),
    ("seat id too big for JSON", _set((*SEAT, "id"), 2**53), (*SEAT, "id")),
    ("seat id true", _set((*SEAT, "id"), True), (*SEAT, "id")),
    ("seat without session", _delete((*SEAT, "session_id")), (*SEAT, "session_id")),
    ("unknown seat field", _set((*SEAT, "row"), 3), (*SEAT, "row")),
    ("duplicate seat in one item", _set(("items", 0, "seats", 1), {"id": 101, "session_id": 7}),
     ("items", 0, "seats", 1)),
    ("duplicate seat across items", _set(("items", 1), {"seats": [{"id": 101, "session_id": 7}]}),
     ("items", 1, "seats", 0)),
    ("missing buyer", _delete(("buyer",)), ("buyer",)),
    ("buyer not an object", _set(("buyer",), "ana@example.com"), ("buyer",)),
    ("bad email", _set(("buyer", "email"), "ana.example.com"), ("buyer", "email")),
    ("missing email", _delete(("buyer", "email")), ("buyer", "email")),
    ("email too long", _set(("buyer", "email"), "a" * 64 + "@" + "b" * 190 + ".com"),
     ("buyer", "email")),
    ("email not a string", _set(("buyer", "email"), ["ana@example.com"]), ("buyer", "email")),
    ("name too long", _set(("buyer", "name"), "n" * 129), ("buyer", "name")),
    ("phone with letters", _set(("buyer", "phone"), "call me"), ("buyer", "phone")),
    ("phone too long", _set(("buyer", "phone"), "1" * 33), ("buyer", "phone")),
    ("too many buyer fields",
     _set(("buyer",), {"email": "a@example.com", **{f"f{n}": "x" for n in range(21)}}),
     ("buyer", "_schema")),
    ("bad buyer key", _set(("buyer", "Loyalty-Card"), "x"), ("buyer", "Loyalty-Card")),
    ("buyer key too long", _set(("buyer", "k" * 65), "x"), ("buyer", "k" * 64)),
    ("buyer field not a string", _set(("buyer", "loyalty"), 5), ("buyer", "loyalty")),
    ("buyer field too long", _set(("buyer", "loyalty"), "x" * 257), ("buyer", "loyalty")),
    ("unknown top-level field", _set(("notes",), "aisle"), ("notes",)),
    ("delivery method empty", _set(("delivery_method",), ""), ("delivery_method",)),
    ("delivery method too long", _set(("delivery_method",), "d" * 65), ("delivery_method",)),
    ("11 payments", _set(("payments",), [{"type": "CASH"}] * 11), ("payments",)),
    ("payment not an object", _set(("payments",), ["CASH"]), ("payments", 0)),
    ("payment value not a scalar", _set(("payments",), [{"amount": [1]}]),
     ("payments", 0, "amount")),
    ("batch bad pattern", _set(("batch",), "night run"), ("batch",)),
    ("metadata too big", _set(("metadata",), {"blob": "x" * 2100}), ("metadata",)),
    ("metadata 17 keys", _set(("metadata",), {f"k{n}": n for n in range(17)}), ("metadata",)),
    ("metadata key too long", _set(("metadata",), {"k" * 65: 1}), ("metadata", "k" * 65)),
    ("metadata nested value", _set(("metadata",), {"a": {"b": 1}}), ("metadata", "a")),
    ("metadata not an object", _set(("metadata",), ["a"]), ("metadata",)),
    ("schema_version 2", _set(("schema_version",), 2), ("schema_version",)),
    ("schema_version as a string", _set(("schema_version",), "1"), ("schema_version",)),
    ("schema_version true", _set(("schema_version",), True), ("schema_version",)),
]


@pytest.mark.parametrize(("edit", "path"), [case[1:] for case in BAD_CASES],
                         ids=[case[0] for case in BAD_CASES])
def test_a_bad_intent_is_refused_naming_the_field(edit: Callable[[Doc], None],
                                                   path: tuple[Any, ...]) -> None:
    doc = valid()
    edit(doc)
    at(messages_of(doc), path)


def test_the_only_errors_are_the_bad_fields() -> None:
    doc = valid()
    doc["reference"] = "bad reference"
    doc["buyer"]["email"] = "nope"
    assert set(messages_of(doc)) == {"reference", "buyer"}


def test_quantity_error_names_the_item() -> None:
    doc = valid()
    doc["items"][1]["quantity"] = 51
    assert messages_of(doc) == {"items": {1: {"quantity": [
        "Must be greater than or equal to 1 and less than or equal to 50."]}}}


def test_max_quantity_is_honoured() -> None:
    doc = valid()
    doc["items"][1]["quantity"] = 6
    assert "quantity" in messages_of(doc, max_quantity=5)["items"][1]
    doc["items"][1]["quantity"] = 5
    assert load_intent(doc, max_quantity=5).items[1] == AutoItem(7, 2, 5)
    doc["items"][1]["quantity"] = 80
    assert load_intent(doc, max_quantity=100).items[1] == AutoItem(7, 2, 80)


def test_max_quantity_caps_seats_per_item() -> None:
    doc = valid()
    assert "seats" in messages_of(doc, max_quantity=1)["items"][0]
    assert load_intent(doc, max_quantity=2).items[0] == load_intent(doc).items[0]


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_max_quantity_must_be_a_positive_integer(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_quantity"):
        load_intent(valid(), max_quantity=bad)


def _padded(size: int) -> bytes:
    """A valid intent that is exactly ``size`` bytes as compact JSON."""
    doc = valid()
    doc["payments"] = [{"note": ""}]
    base = len(json.dumps(doc, separators=(",", ":")))
    doc["payments"][0]["note"] = "x" * (size - base)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    assert len(raw) == size
    return raw


def test_a_message_of_exactly_64_kib_is_accepted() -> None:
    assert load_intent(_padded(MAX_MESSAGE_BYTES)).reference == "order-1"


@pytest.mark.parametrize("as_type", [bytes, bytes.decode, json.loads])
def test_a_message_over_64_kib_is_refused_before_parsing(as_type: Callable[[bytes], Any]) -> None:
    data = as_type(_padded(MAX_MESSAGE_BYTES + 1))
    assert messages_of(data) == {
        "_schema": [f"message is {MAX_MESSAGE_BYTES + 1} bytes, more than {MAX_MESSAGE_BYTES}"]}


def test_a_huge_non_json_message_is_refused_on_size() -> None:
    assert "more than" in messages_of(b"\xff" * (MAX_MESSAGE_BYTES + 10))["_schema"][0]


@pytest.mark.parametrize(("data", "reason"), [
    ("{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not"),
    ("[]", "JSON array, not an object"),
    ('[{"reference": "x"}]', "JSON array, not an object"),
    ("42", "JSON number, not an object"),
    ('"text"', "JSON string, not an object"),
    ("null", "JSON null, not an object"),
    ('{"reference": "a", "reference": "b"}', "same key twice"),
    ('{"reference": NaN}', "NaN"),
    ("[" * 5000 + "]" * 5000, "not"),
    (None, "must be a JSON object"),
    (42, "must be a JSON object"),
    (["reference"], "must be a JSON object"),
])
def test_what_is_not_a_json_object_is_refused_as_a_validation_error(data: Any,
                                                                    reason: str) -> None:
    (message,) = messages_of(data)["_schema"]
    assert reason in message


def test_a_mapping_that_cannot_be_json_is_refused() -> None:
    doc: Doc = valid()
    doc["metadata"] = {"loop": doc}
    assert "_schema" in messages_of(doc)


def test_a_valid_intent_loads_into_frozen_dataclasses() -> None:
    doc = valid()
    doc["buyer"].update({"name": "Ana", "phone": "+34 (600) 000-000", "loyalty_card": "L-9"})
    doc.update(delivery_method="EMAIL", payments=[{"type": "CASH", "amount": 90.5}],
               batch="b:1", metadata={"campaign": "x", "n": None})
    intent = load_intent(doc)
    assert intent == PurchaseIntent(
        reference="order-1",
        items=(NumberedItem((SeatRef(101, 7), SeatRef(102, 7, 3))), AutoItem(7, 2, 2)),
        buyer=Buyer(email="ana@example.com", name="Ana", phone="+34 (600) 000-000",
                    extra={"loyalty_card": "L-9"}),
        delivery_method="EMAIL",
        payments=({"type": "CASH", "amount": 90.5},),
        batch="b:1",
        metadata={"campaign": "x", "n": None},
        schema_version=1,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        intent.reference = "other"  # type: ignore[misc]


@pytest.mark.parametrize("encode", [json.dumps, lambda doc: json.dumps(doc).encode(),
                                    MappingProxyType])
def test_text_bytes_and_mappings_load_alike(encode: Callable[[Doc], Any]) -> None:
    assert load_intent(encode(valid())) == load_intent(valid())


def test_the_input_is_not_modified() -> None:
    doc = valid()
    before = copy.deepcopy(doc)
    load_intent(doc)
    assert doc == before


def test_dump_leaves_out_what_is_absent() -> None:
    dumped = dump_intent(load_intent(valid()))
    assert dumped == {**valid(), "schema_version": 1}
    assert "rate_id" not in dumped["items"][0]["seats"][0]
    assert json.loads(json.dumps(dumped)) == dumped


def test_schema_version_defaults_to_1() -> None:
    assert load_intent(valid()).schema_version == 1


def test_fingerprint_depends_on_content_not_on_key_order() -> None:
    doc = valid()
    shuffled = dict(reversed(list(doc.items())))
    fingerprint = load_intent(doc).fingerprint()
    assert re.fullmatch("[0-9a-f]{64}", fingerprint)
    assert load_intent(json.dumps(shuffled)).fingerprint() == fingerprint
    doc["items"][1]["quantity"] = 3
    assert load_intent(doc).fingerprint() != fingerprint


def test_fingerprint_ignores_an_explicit_default_schema_version() -> None:
    assert (load_intent({**valid(), "schema_version": 1}).fingerprint()
            == load_intent(valid()).fingerprint())


#: Fingerprints computed before ``hold`` existed (main at cd01def), for the smallest and the
#: fullest intent of docs/contracts.md: admissions of old intents must still match them.
BEFORE_HOLD = {
    "a57c42e7baca957aec9d9cc7559167f1e60125a90bfe53bb5d4bc0ffadf3396c": {
        "reference": "shop-42", "buyer": {"email": "ana.garcia@example.com"},
        "items": [{"seats": [{"id": 103, "session_id": 1001}, {"id": 104, "session_id": 1001}]}],
    },
    "1439026ef5d689df3c1e3d34f16531ce65b57db1fb4998810c3bdc947d382d16": {
        "reference": "crm:2026-11:000981",
        "items": [{"seats": [{"id": 103, "session_id": 1001, "rate_id": 1},
                             {"id": 104, "session_id": 1001}]},
                  {"session_id": 1002, "price_type_id": 4, "quantity": 2}],
        "buyer": {"email": "marta.lopez@example.com", "name": "Marta", "surname": "López",
                  "phone": "+34 600 000 000", "document_id": "00000000T", "zip_code": "28001"},
        "delivery_method": "EMAIL", "payments": [{"type": "CASH", "amount": 135.0}],
        "batch": "night-run-17", "lane": "bulk", "shop": "shop-a",
        "metadata": {"campaign": "black-friday", "priority": 2, "gift": True, "note": None},
        "schema_version": 1,
    },
}


@pytest.mark.parametrize(("fingerprint", "doc"), list(BEFORE_HOLD.items()))
def test_an_intent_without_hold_keeps_the_fingerprint_it_had_before_hold(
        fingerprint: str, doc: Doc) -> None:
    intent = load_intent(doc)
    assert intent.hold is False
    assert "hold" not in dump_intent(intent)
    assert intent.fingerprint() == fingerprint
    # An explicit false is the same intent: same dump, same fingerprint.
    explicit = load_intent({**doc, "hold": False})
    assert explicit == intent
    assert explicit.fingerprint() == fingerprint


@pytest.mark.parametrize("doc", list(BEFORE_HOLD.values()))
def test_hold_true_is_dumped_and_changes_the_fingerprint(doc: Doc) -> None:
    held = load_intent({**doc, "hold": True})
    assert held.hold is True
    assert dump_intent(held)["hold"] is True
    assert load_intent(dump_intent(held)) == held
    assert held.fingerprint() != load_intent(doc).fingerprint()


@pytest.mark.parametrize("bad", ["true", 1, 0, None, "yes", [True]])
def test_hold_must_be_a_json_boolean(bad: Any) -> None:
    assert at(messages_of({**valid(), "hold": bad}), ("hold",))


def test_buyer_payload_has_email_non_empty_fields_and_the_rest() -> None:
    buyer = Buyer(email="a@example.com", name="", surname="Ruiz", extra={"zip_code": "28001"})
    assert buyer.as_payload() == {"email": "a@example.com", "surname": "Ruiz", "zip_code": "28001"}


SECRETS = {"email": "maria.secret@example.com", "name": "Maria", "surname": "Secretson",
           "phone": "+34 611 222 333", "document_id": "12345678Z"}


def test_buyer_and_intent_reprs_show_no_personal_data() -> None:
    doc = valid()
    doc["buyer"] = dict(SECRETS)
    intent = load_intent(doc)
    for text in (repr(intent.buyer), str(intent.buyer), repr(intent), str(intent)):
        for secret in SECRETS.values():
            assert secret not in text
    assert repr(intent.buyer) == "Buyer(<redacted>)"


@pytest.mark.parametrize(("field", "secret"), [
    ("email", "maria.secret@@example.com"),
    ("phone", "+34 611 SECRET"),
    ("name", "Secret" * 30),
    ("document_id", "SECRET" * 50),
    ("document_id", 123456789),
])
def test_error_messages_never_echo_the_rejected_value(field: str, secret: Any) -> None:
    doc = valid()
    doc["buyer"][field] = secret
    doc["reference"] = "SECRET REF"
    text = json.dumps(messages_of(doc), default=str)
    assert str(secret) not in text
    assert "SECRET REF" not in text
