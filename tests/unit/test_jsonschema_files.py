"""The committed JSON Schema files match the marshmallow schemas, and the converter is honest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from marshmallow import Schema, fields, validate

from schemas.__main__ import main
from schemas.jsonschema import (
    DRAFT,
    JSON_DIRECTORY,
    intent_json_schema,
    json_schema_errors,
    json_schema_texts,
    result_json_schema,
    write_json_schemas,
)

NAMES = ("purchase-intent.schema.json", "order-result.schema.json")


@pytest.mark.parametrize("name", NAMES)
def test_committed_file_is_up_to_date(name: str) -> None:
    path = JSON_DIRECTORY / name
    assert path.is_file(), f"{path} is missing: run `python -m schemas`"
    assert path.read_text(encoding="utf-8") == json_schema_texts()[name], (
        f"{path} is stale: run `python -m schemas` and commit the result")


@pytest.mark.parametrize("name", NAMES)
def test_committed_file_is_formatted_as_agreed(name: str) -> None:
    text = (JSON_DIRECTORY / name).read_text(encoding="utf-8")
    document = json.loads(text)
    assert text == json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert document["$schema"] == DRAFT
    assert document["$id"].startswith("urn:")
    assert document["title"]
    assert document["description"]


def _objects(node: Any) -> list[dict[str, Any]]:
    """Every object schema (``"type": "object"`` with properties) inside a document."""
    found = []
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            found.append(node)
        for value in node.values():
            found.extend(_objects(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_objects(value))
    return found


@pytest.mark.parametrize("document", [intent_json_schema(), result_json_schema()])
def test_strict_objects_forbid_other_properties(document: dict[str, Any]) -> None:
    for schema in _objects(document):
        if schema.get("title") == "Buyer":  # other string fields are part of the contract
            assert schema["additionalProperties"]["type"] == "string"
        else:
            assert schema["additionalProperties"] is False, schema.get("title")
        for value in schema["properties"].values():
            assert value.get("description"), schema.get("title")


def test_items_are_one_of_two_shapes() -> None:
    items = intent_json_schema()["properties"]["items"]
    assert [shape["$ref"] for shape in items["items"]["oneOf"]] == [
        "#/$defs/NumberedItem", "#/$defs/AutoItem"]
    assert (items["minItems"], items["maxItems"]) == (1, 20)


def test_write_json_schemas_writes_what_is_committed(tmp_path: Path) -> None:
    written = write_json_schemas(tmp_path)
    assert sorted(path.name for path in written) == sorted(NAMES)
    for path in written:
        assert path.read_text(encoding="utf-8") == (JSON_DIRECTORY / path.name).read_text(
            encoding="utf-8")


def test_main_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check", "--directory", str(tmp_path)]) == 1
    assert "python -m schemas" in capsys.readouterr().err
    assert main(["--directory", str(tmp_path)]) == 0
    assert main(["--check", "--directory", str(tmp_path)]) == 0
    assert main(["--check"]) == 0


def test_the_converter_refuses_what_it_cannot_express() -> None:
    from schemas.jsonschema import _Converter

    class Odd(Schema):
        when = fields.Date()

    with pytest.raises(TypeError, match="Date"):
        _Converter().object_schema(Odd())

    class Unusual(Schema):
        name = fields.String(validate=validate.ContainsOnly(["a"]))

    with pytest.raises(TypeError, match="ContainsOnly"):
        _Converter().object_schema(Unusual())


# --- the checker used by the property tests, checked against known answers ---------------

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 1, "exclusiveMaximum": 10},
        "s": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3},
        "k": {"enum": ["x", 1]},
        "t": {"type": ["string", "null"], "format": "date-time"},
        "list": {"type": "array", "items": {"$ref": "#/$defs/One"}, "maxItems": 2},
    },
    "required": ["n"],
    "additionalProperties": False,
    "$defs": {"One": {"oneOf": [{"const": 1}, {"type": "integer", "maximum": 2}]}},
}


@pytest.mark.parametrize(("instance", "valid"), [
    ({"n": 1}, True),
    ({"n": 9, "s": "abc", "k": 1, "t": "2026-01-01T00:00:00Z", "list": [2]}, True),
    ({"n": 1, "t": None}, True),
    ({}, False),
    ({"n": True}, False),
    ({"n": 1.5}, False),
    ({"n": 10}, False),
    ({"n": 0}, False),
    ({"n": 1, "s": "abc\n"}, False),
    ({"n": 1, "s": "abcd"}, False),
    ({"n": 1, "k": True}, False),
    ({"n": 1, "t": "2026-01-01"}, False),
    ({"n": 1, "list": [1]}, False),
    ({"n": 1, "list": [2, 2, 2]}, False),
    ({"n": 1, "other": 1}, False),
    ([], False),
])
def test_the_checker_agrees_with_json_schema(instance: Any, valid: bool) -> None:
    assert (json_schema_errors(instance, SCHEMA) == []) is valid


def test_the_checker_refuses_keywords_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="uniqueItems"):
        json_schema_errors([1], {"uniqueItems": True})
