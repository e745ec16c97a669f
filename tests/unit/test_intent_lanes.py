"""The intent's ``lane`` and ``shop``: optional, checked, and what the fingerprint makes of them."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from marshmallow import ValidationError

from schemas._fields import canonical_json
from schemas.intent import dump_intent, load_intent


def document(**extra: Any) -> dict[str, Any]:
    return {"reference": "r-1", "buyer": {"email": "a@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}], **extra}


def test_an_intent_without_lane_or_shop_keeps_the_fingerprint_it_always_had() -> None:
    # The rule before lanes: SHA-256 of the canonical JSON without the batch.
    old = hashlib.sha256(canonical_json(dump_intent(load_intent(document())))).hexdigest()
    assert load_intent(document(batch="b-1")).fingerprint() == old


def test_the_lane_is_how_an_intent_travels_not_what_is_bought() -> None:
    plain = load_intent(document()).fingerprint()
    assert load_intent(document(lane="live")).fingerprint() == plain
    assert load_intent(document(lane="bulk")).fingerprint() == plain


def test_the_shop_is_part_of_the_purchase() -> None:
    plain = load_intent(document()).fingerprint()
    assert load_intent(document(shop="shop-a")).fingerprint() != plain
    assert load_intent(document(shop="shop-a")).fingerprint() != \
        load_intent(document(shop="shop-b")).fingerprint()


@pytest.mark.parametrize(("field", "value"), [("lane", "fast"), ("lane", None),
                                              ("shop", "no spaces"), ("shop", "s" * 65)])
def test_a_bad_lane_or_shop_is_refused_by_its_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as refused:
        load_intent(document(**{field: value}))
    assert set(refused.value.messages) == {field}


def test_lane_and_shop_round_trip() -> None:
    intent = load_intent(document(lane="bulk", shop="shop-a"))
    assert (intent.lane, intent.shop) == ("bulk", "shop-a")
    assert load_intent(dump_intent(intent)) == intent
