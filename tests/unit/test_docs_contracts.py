"""The contract examples of docs/contracts.md are executable: valid ones load, bad ones are
refused."""

from __future__ import annotations

import json
import re

import pytest
from marshmallow import ValidationError

from schemas import CONFIRMED, FAILED, NumberedItem, dump_intent, load_intent, load_result
from schemas.jsonschema import intent_json_schema, json_schema_errors, result_json_schema
from schemas.result import result_id_for
from tests.docs import ROOT, doc

FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def _contracts_section() -> str:
    text = doc("contracts.md")
    start, end = "<!-- contracts:start -->", "<!-- contracts:end -->"
    assert start in text, "docs/contracts.md lost its contracts markers"
    assert end in text, "docs/contracts.md lost its contracts markers"
    return text[text.index(start) + len(start):text.index(end)]


def _blocks(info: str) -> list[tuple[str, str]]:
    """(text before the block, block body) for every fenced block with this info string."""
    section = _contracts_section()
    found = []
    previous_end = 0
    for match in FENCE.finditer(section):
        if match.group("info").strip() == info:
            found.append((section[previous_end:match.start()], match.group("body")))
        previous_end = match.end()
    return found


INTENTS = _blocks("json intent")
RESULTS = _blocks("json result")
BAD_INTENTS = _blocks("json bad-intent")


def test_the_section_has_the_examples_it_promises() -> None:
    assert _contracts_section().lstrip().startswith("# Contracts")
    assert len(INTENTS) >= 3
    assert len(RESULTS) >= 2
    assert len(BAD_INTENTS) >= 3


def test_the_json_schema_paths_it_names_exist() -> None:
    section = _contracts_section()
    for name in ("purchase-intent.schema.json", "order-result.schema.json"):
        path = f"schemas/json/{name}"
        assert path in section
        assert (ROOT / path).is_file()


@pytest.mark.parametrize(("before", "body"), INTENTS)
def test_every_intent_example_loads(before: str, body: str) -> None:
    document = json.loads(body)
    intent = load_intent(body)
    assert load_intent(dump_intent(intent)) == intent
    assert json_schema_errors(document, intent_json_schema()) == []


def test_intent_examples_cover_numbered_automatic_and_everything() -> None:
    intents = [load_intent(body) for _, body in INTENTS]
    items = [item for intent in intents for item in intent.items]
    assert any(isinstance(item, NumberedItem) for item in items)
    assert any(not isinstance(item, NumberedItem) for item in items)
    documents = [json.loads(body) for _, body in INTENTS]
    every_field = set(intent_json_schema()["properties"])
    assert any(set(document) == every_field for document in documents)


@pytest.mark.parametrize(("before", "body"), RESULTS)
def test_every_result_example_loads(before: str, body: str) -> None:
    result = load_result(body)
    assert result.result_id == result_id_for(result.reference)
    assert json_schema_errors(json.loads(body), result_json_schema()) == []


def test_result_examples_show_a_confirmed_and_a_failed_result() -> None:
    statuses = {load_result(body).status for _, body in RESULTS}
    assert {CONFIRMED, FAILED} <= statuses


@pytest.mark.parametrize(("before", "body"), BAD_INTENTS)
def test_every_bad_intent_example_is_refused_and_explained(before: str, body: str) -> None:
    sentence = before.strip().splitlines()[-1] if before.strip() else ""
    assert sentence.endswith(":"), "each bad intent follows a sentence saying what is wrong"
    with pytest.raises(ValidationError):
        load_intent(body)
    assert json_schema_errors(json.loads(body), intent_json_schema()) or "same seat" in sentence
