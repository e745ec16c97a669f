"""The documented valid intents ask for what the sandbox's default catalogue sells, so that
pasting one into the demo's sandbox (or running the README's walkthrough) buys tickets
instead of failing."""

from __future__ import annotations

import json
import re

import pytest

from schemas.intent import AutoItem, NumberedItem, load_intent
from tests.docs import README, ROOT, pages

CATALOGUE = json.loads((ROOT / "fulfilment/sandbox/default_catalogue.json").read_text())
SESSIONS = {session["id"]: session for session in CATALOGUE["sessions"]}
EXAMPLES = [body for page in pages()
            for body in re.findall(r"^```json intent\n(.*?)^```", page.read_text(),
                                   re.MULTILINE | re.DOTALL)]
#: The intents file the README's walkthrough writes (`cat > intents.jsonl <<'EOF'`).
WALKTHROUGH = re.search(r"^cat > intents\.jsonl <<'EOF'\n(.*?)^EOF$", README.read_text(),
                        re.MULTILINE | re.DOTALL)


def test_there_are_examples_to_check() -> None:
    assert len(EXAMPLES) >= 3
    assert WALKTHROUGH, "the README's walkthrough lost its intents file"


def _walkthrough_lines() -> list[str]:
    return WALKTHROUGH.group(1).splitlines() if WALKTHROUGH else []


def test_the_walkthrough_intents_are_valid_and_distinct() -> None:
    references = [load_intent(line).reference for line in _walkthrough_lines()]
    assert len(references) >= 2
    assert len(set(references)) == len(references)


@pytest.mark.parametrize("body", EXAMPLES + _walkthrough_lines())
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
