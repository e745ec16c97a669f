"""JSON Schema (draft 2020-12) for the message contracts, generated from the marshmallow schemas.

Producers in other languages validate against the committed files; generating
them from the schemas that the worker itself loads with means the two cannot
disagree (a test fails when the files are stale). The converter knows exactly
the fields and validators ``schemas`` uses and refuses anything else, so a new
kind of field cannot slip into the files unexpressed. ``json_schema_errors``
checks a document against the emitted keywords, without a dependency.

Limits JSON Schema cannot say (the 64 KiB message size, metadata's 2 KiB, no
seat twice in an intent, at most 20 buyer fields besides the named four) are
in the descriptions; marshmallow enforces them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, missing, validate

from schemas._fields import (
    DATETIME_PATTERN,
    MAX_MESSAGE_BYTES,
    EmailText,
    FullMatch,
    OneOfNested,
    ScalarField,
    StrictSchema,
    UtcDateTime,
)
from schemas.intent import DEFAULT_MAX_QUANTITY, intent_schema
from schemas.result import result_schema

__all__ = [
    "DRAFT", "JSON_DIRECTORY", "intent_json_schema", "json_schema_errors", "json_schema_texts",
    "render", "result_json_schema", "write_json_schemas",
]

DRAFT = "https://json-schema.org/draft/2020-12/schema"
ID_PREFIX = "urn:onebox-fulfilment:schema:"
JSON_DIRECTORY = Path(__file__).parent / "json"
_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "title", "description", "default"})


class _Converter:
    """Turns one root schema into properties plus the ``$defs`` its nested schemas need."""

    def __init__(self) -> None:
        self.defs: dict[str, dict[str, Any]] = {}

    def object_schema(self, schema: Schema) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        required: list[str] = []
        for name, field in schema.load_fields.items():
            key = field.data_key or name
            properties[key] = self.field(field)
            if field.required:
                required.append(key)
        out: dict[str, Any] = {"type": "object", "properties": properties}
        if required:
            out["required"] = required
        if schema.unknown == RAISE:
            out["additionalProperties"] = False
        if isinstance(schema, StrictSchema):
            out.update(copy.deepcopy(dict(schema.json_extra)))
        return out

    def ref(self, schema: Schema) -> dict[str, Any]:
        title = schema.json_title if isinstance(schema, StrictSchema) else ""
        if not title:
            raise TypeError(f"{type(schema).__name__} needs a json_title to be referenced")
        if title not in self.defs:
            self.defs[title] = {}  # reserve the name first: a schema may refer to itself
            self.defs[title] = {"title": title, **self.object_schema(schema)}
        return {"$ref": f"#/$defs/{title}"}

    def field(self, field: fields.Field[Any]) -> dict[str, Any]:
        out = self._shape(field)
        for validator in field.validators:
            _apply_validator(validator, out)
        if field.allow_none:
            out["type"] = [*_as_list(out["type"]), "null"]
        description = field.metadata.get("description")
        if description:
            out["description"] = description
        default = field.load_default
        if default is not missing and default is not None and not callable(default):
            out["default"] = default
        return out

    def _shape(self, field: fields.Field[Any]) -> dict[str, Any]:
        if isinstance(field, OneOfNested):
            return {"oneOf": [self.ref(choice) for choice in field.choices()]}
        if isinstance(field, fields.Nested):
            return self.ref(field.schema)
        if isinstance(field, fields.List):
            return {"type": "array", "items": self.field(field.inner)}
        if isinstance(field, fields.Dict):
            out: dict[str, Any] = {"type": "object"}
            if field.key_field is not None:
                names = self.field(field.key_field)
                names.pop("type", None)  # property names are always strings
                if names:
                    out["propertyNames"] = names
            if field.value_field is not None:
                out["additionalProperties"] = self.field(field.value_field)
            return out
        return _leaf_shape(field)


def _leaf_shape(field: fields.Field[Any]) -> dict[str, Any]:
    simple: list[tuple[type[fields.Field[Any]], dict[str, Any]]] = [
        (UtcDateTime, {"type": "string", "format": "date-time"}),
        (ScalarField, {"type": ["boolean", "number", "string"]}),
        (EmailText, {"type": "string", "format": "email"}),
        (fields.String, {"type": "string"}),
        (fields.Integer, {"type": "integer"}),
        (fields.Boolean, {"type": "boolean"}),
    ]
    for kind, shape in simple:
        if isinstance(field, kind):
            return dict(shape)
    raise TypeError(f"no JSON Schema for a {type(field).__name__} field")


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _apply_validator(validator: Callable[[Any], Any], out: dict[str, Any]) -> None:
    # Exact types: a subclass (ContainsOnly is a OneOf) may mean something else.
    kind = out.get("type")
    if type(validator) is validate.Length:
        unit = {"string": "Length", "array": "Items", "object": "Properties"}[str(kind)]
        if validator.equal is not None:
            out[f"min{unit}"] = out[f"max{unit}"] = validator.equal
        if validator.min is not None and validator.min > 0:
            out[f"min{unit}"] = validator.min
        if validator.max is not None:
            out[f"max{unit}"] = validator.max
    elif type(validator) is validate.Range:
        if validator.min is not None:
            out["minimum" if validator.min_inclusive else "exclusiveMinimum"] = validator.min
        if validator.max is not None:
            out["maximum" if validator.max_inclusive else "exclusiveMaximum"] = validator.max
    elif type(validator) is FullMatch:
        pattern = validator.pattern if "|" not in validator.pattern else f"(?:{validator.pattern})"
        out["pattern"] = f"^{pattern}$"
    elif type(validator) is validate.OneOf:
        out["enum"] = list(validator.choices)
    elif type(validator) is validate.Equal:
        out["const"] = validator.comparable
    elif type(validator) is validate.Email:
        out["format"] = "email"
    elif isinstance(validator, validate.Validator):
        raise TypeError(f"no JSON Schema for validator {type(validator).__name__}")
    # Plain functions (metadata's byte size) are described in the field's description.


def _document(schema: Schema, name: str, title: str, description: str) -> dict[str, Any]:
    converter = _Converter()
    body = converter.object_schema(schema)
    return {"$schema": DRAFT, "$id": f"{ID_PREFIX}{name}", "title": title,
            "description": description, **body, "$defs": converter.defs}


def intent_json_schema() -> dict[str, Any]:
    """The purchase intent, as ``load_intent`` accepts it with the default ``max_quantity``."""
    return _document(
        intent_schema(DEFAULT_MAX_QUANTITY), "purchase-intent:1", "Purchase intent",
        "One order for the fulfilment worker to buy through Onebox. Also checked by the "
        f"worker and not expressible here: the whole message is at most {MAX_MESSAGE_BYTES} "
        "bytes; no seat (id, session_id) appears twice in an intent; the buyer has at most 20 "
        "fields besides email, name, surname and phone; metadata is at most 2048 bytes as "
        f"compact JSON. Seats per item and quantity are capped at {DEFAULT_MAX_QUANTITY} by "
        "default; a worker may be configured with another cap.",
    )


def result_json_schema() -> dict[str, Any]:
    """The order result the worker publishes for each intent."""
    return _document(
        result_schema(), "order-result:1", "Order result",
        "The outcome of one purchase intent. A result may be delivered more than once: "
        "consumers de-duplicate on result_id, which is the same for every copy. The whole "
        f"message is at most {MAX_MESSAGE_BYTES} bytes.",
    )


def render(document: Mapping[str, Any]) -> str:
    """The committed form: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def json_schema_texts() -> dict[str, str]:
    """File name -> contents, exactly as ``write_json_schemas`` writes them."""
    return {
        "purchase-intent.schema.json": render(intent_json_schema()),
        "order-result.schema.json": render(result_json_schema()),
    }


def write_json_schemas(directory: Path | None = None) -> list[Path]:
    """Write the JSON Schema files (the package's own ``json/`` by default); the paths written."""
    target = JSON_DIRECTORY if directory is None else directory
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in json_schema_texts().items():
        path = target / name
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    return written


# --- a checker for the keywords above --------------------------------------------------------

_DATETIME = re.compile(DATETIME_PATTERN)
_EMAIL = validate.Email()
_TYPES: dict[str, Callable[[Any], bool]] = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list | tuple),
    "object": lambda v: isinstance(v, Mapping),
}


class _Checker:
    """Collects every error of one document; ``ok`` tries a branch without keeping its errors."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.errors: list[str] = []

    def fail(self, path: str, reason: str) -> None:
        self.errors.append(f"{path}: {reason}")

    def ok(self, value: Any, schema: Any, path: str) -> bool:
        return _Checker(self.root).check(value, schema, path)

    def check(self, value: Any, schema: Any, path: str) -> bool:
        before = len(self.errors)
        if isinstance(schema, bool):
            if not schema:
                self.fail(path, "not allowed")
            return schema
        for keyword, expected in schema.items():
            if keyword in _ANNOTATIONS:
                continue
            if keyword not in _RULES:
                raise ValueError(f"unsupported keyword {keyword!r}")
            applies_to, rule = _RULES[keyword]
            if applies_to is None or _TYPES[applies_to](value):
                rule(self, value, expected, schema, path)
        return len(self.errors) == before


_Rule = Callable[[_Checker, Any, Any, Mapping[str, Any], str], None]
#: keyword -> (the JSON type it constrains, or None for every type; the check)
_RULES: dict[str, tuple[str | None, _Rule]] = {}


def _rule(keyword: str, applies_to: str | None = None) -> Callable[[_Rule], _Rule]:
    def register(rule: _Rule) -> _Rule:
        _RULES[keyword] = (applies_to, rule)
        return rule
    return register


def _limit(keyword: str, applies_to: str, size: Callable[[Any], float],
           too: Callable[[float, float], bool], reason: str) -> None:
    def rule(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
        if too(size(value), expected):
            c.fail(path, f"{reason} {expected}")
    _RULES[keyword] = (applies_to, rule)


for _keyword, _type, _reason in (
    ("minLength", "string", "shorter than"), ("maxLength", "string", "longer than"),
    ("minItems", "array", "fewer items than"), ("maxItems", "array", "more items than"),
    ("minProperties", "object", "fewer properties than"),
    ("maxProperties", "object", "more properties than"),
):
    _limit(_keyword, _type, len, (lambda a, b: a < b) if _keyword.startswith("min")
           else (lambda a, b: a > b), _reason)
for _keyword, _too, _reason in (
    ("minimum", lambda a, b: a < b, "less than"), ("maximum", lambda a, b: a > b, "more than"),
    ("exclusiveMinimum", lambda a, b: a <= b, "not more than"),
    ("exclusiveMaximum", lambda a, b: a >= b, "not less than"),
):
    _limit(_keyword, "number", lambda number: number, _too, _reason)


def _same(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


@_rule("$ref")
def _ref(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
    target: Any = c.root
    for part in expected.removeprefix("#/").split("/"):
        target = target[part]
    c.check(value, target, path)


@_rule("type")
def _type_rule(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any],
               path: str) -> None:
    if not any(_TYPES[kind](value) for kind in _as_list(expected)):
        c.fail(path, f"not of type {expected}")


@_rule("enum")
def _enum(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
    if not any(_same(value, choice) for choice in expected):
        c.fail(path, "not one of the allowed values")


@_rule("const")
def _const(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
    if not _same(value, expected):
        c.fail(path, "not the allowed value")


@_rule("oneOf")
def _one_of(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
    matches = sum(c.ok(value, option, path) for option in expected)
    if matches != 1:
        c.fail(path, f"matches {matches} of the oneOf shapes, not exactly one")


@_rule("anyOf")
def _any_of(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
    if not any(c.ok(value, option, path) for option in expected):
        c.fail(path, "matches none of the anyOf shapes")


@_rule("allOf")
def _all_of(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
    for option in expected:
        c.check(value, option, path)


@_rule("not")
def _not(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
    if c.ok(value, expected, path):
        c.fail(path, "matches a shape it must not")


@_rule("if")
def _if(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
    branch = "then" if c.ok(value, expected, path) else "else"
    if branch in schema:
        c.check(value, schema[branch], path)


@_rule("then")
@_rule("else")
def _branch(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
    """Applied by ``if``."""


@_rule("pattern", "string")
def _pattern(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
    # In ECMA-262 a final $ does not match before a trailing newline; Python's does.
    regex = expected[:-1] + r"\Z" if expected.endswith("$") else expected
    if re.search(regex, value) is None:
        c.fail(path, "does not match the pattern")


def _format_ok(value: str, fmt: str) -> bool:
    if fmt == "email":
        try:
            _EMAIL(value)
        except ValidationError:
            return False
        return True
    if fmt == "date-time":
        if _DATETIME.fullmatch(value) is None:
            return False
        try:
            datetime.fromisoformat(value.upper())
        except ValueError:
            return False
        return True
    raise ValueError(f"unsupported format {fmt!r}")


@_rule("format", "string")
def _format(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
    if not _format_ok(value, expected):
        c.fail(path, f"not a valid {expected}")


@_rule("items", "array")
def _items(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
    for index, item in enumerate(value):
        c.check(item, expected, f"{path}[{index}]")


@_rule("properties", "object")
def _properties(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any],
                path: str) -> None:
    for key, subschema in expected.items():
        if key in value:
            c.check(value[key], subschema, f"{path}.{key}")


@_rule("required", "object")
def _required(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any],
              path: str) -> None:
    for key in expected:
        if key not in value:
            c.fail(f"{path}.{key}", "required")


@_rule("additionalProperties", "object")
def _additional(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any],
                path: str) -> None:
    for key in value:
        if key not in schema.get("properties", {}):
            c.check(value[key], expected, f"{path}.{key}")


@_rule("propertyNames", "object")
def _names(c: _Checker, value: Any, expected: Any, schema: Mapping[str, Any], path: str) -> None:
    for key in value:
        c.check(key, expected, f"{path} (a property name)")


def json_schema_errors(instance: Any, schema: Mapping[str, Any]) -> list[str]:
    """Where ``instance`` breaks ``schema`` (empty when it is valid).

    Understands the keywords this module emits (and ``format`` as an assertion
    for ``email`` and ``date-time``); any other keyword raises ``ValueError``
    rather than being skipped in silence.
    """
    checker = _Checker(schema)
    checker.check(instance, schema, "$")
    return checker.errors
