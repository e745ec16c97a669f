"""The README's valid intents ask for what the sandbox's default catalogue sells, so that
pasting one into the demo's sandbox buys tickets instead of failing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from schemas.intent import AutoItem, NumberedItem, load_intent

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = json.loads((ROOT / "fulfilment/sandbox/default_catalogue.json").read_text())
SESSIONS = {session["id"]: session for session in CATALOGUE["sessions"]}
EXAMPLES = re.findall(r"^```json intent\n(.*?)^```", (ROOT / "README.md").read_text(),
                      re.MULTILINE | re.DOTALL)


def test_there_are_examples_to_check() -> None:
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("body", EXAMPLES)
def test_every_intent_example_asks_for_what_the_sandbox_sells(body: str) -> None:
    for item in load_intent(body).items:
        if isinstance(item, AutoItem):
            session = SESSIONS[item.session_id]
            price_types = {pt["id"]: pt for pt in session["price_types"]}
            assert item.price_type_id in price_types, (item, "price type not sold")
            assert str(item.price_type_id) in session.get("capacity", {}), (item, "no capacity")
            if item.rate_id is not None:
                assert str(item.rate_id) in price_types[item.price_type_id]["prices"], item
        elif isinstance(item, NumberedItem):
            for seat in item.seats:
                session = SESSIONS[seat.session_id]
                seats = sum(s["rows"] * s["seats_per_row"] for s in session.get("sectors", []))
                assert 1 <= seat.id <= seats, (seat, "no such seat")
                if seat.rate_id is not None:
                    assert seat.rate_id in {rate["id"] for rate in session["rates"]}, seat
