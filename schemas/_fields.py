"""Fields, validators and helpers shared by the message schemas.

Every field here is stricter than marshmallow's default: JSON has one way to
write a string, an integer or a boolean, and a message contract should accept
exactly that way (``"3"`` is not a quantity, ``true`` is not an id). Error
messages name the reason only and never interpolate the rejected value, since
values can hold personal data and errors end up in logs and dead letters.

Validators and fields carry what the JSON Schema converter needs
(``pattern``, limits), so the exported schema cannot drift from the checks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

from marshmallow import Schema, ValidationError, fields, post_dump, post_load, validate
from marshmallow.types import ErrorMessages

#: References and batch names (1 to 64 characters): safe in Redis keys, log lines
#: and Onebox's external_code.
REFERENCE_PATTERN = r"[A-Za-z0-9._:-]+"
#: Names of the buyer's other fields: snake_case, 1 to 64 characters.
FIELD_NAME_PATTERN = r"[a-z][a-z0-9_]*"
#: Phone numbers as people type them; digits and the usual punctuation only.
PHONE_PATTERN = r"[0-9 +()-]*"
#: RFC 3339 date-time (what JSON Schema's ``date-time`` format means), with an offset.
DATETIME_PATTERN = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
#: The largest message accepted, in bytes (as sent, or as compact JSON for a mapping).
MAX_MESSAGE_BYTES = 65536
#: The largest id accepted: the largest integer every JSON parser holds exactly (I-JSON).
MAX_ID = 2**53 - 1
MAX_METADATA_KEYS = 16
MAX_METADATA_BYTES = 2048

def canonical_json(value: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces, UTF-8.

    Used for fingerprints and size limits, so equal payloads give equal bytes
    whatever order their producer wrote the keys in.
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return text.encode("utf-8", "surrogatepass")


def is_scalar(value: object) -> bool:
    """A JSON string, number or boolean (finite numbers only: NaN is not JSON)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str | int | bool)


class FullMatch(validate.Validator):
    """Like ``validate.Regexp`` but anchored at both ends.

    ``Regexp`` uses ``re.match`` and a ``$`` that accepts a trailing newline;
    JSON Schema's ``pattern`` is ECMA-262 where ``^...$`` does not. A full match
    on a pattern without anchors means the same thing in both.
    """

    def __init__(self, pattern: str, error: str) -> None:
        self.pattern = pattern
        self.error = error
        self._message = error
        self._regex = re.compile(pattern)

    def __call__(self, value: str) -> str:
        if self._regex.fullmatch(value) is None:
            raise ValidationError(self._message)
        return value

    def _repr_args(self) -> str:
        return f"pattern={self.pattern!r}"


class Text(fields.String):
    """A string that must be a ``str``: marshmallow's ``String`` also takes bytes."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> str:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        return value


class EmailText(Text):
    """An email address (marshmallow's check), at most 254 characters (RFC 5321)."""

    # marshmallow merges this per class and never mutates it.
    default_error_messages: ErrorMessages = {  # noqa: RUF012
        "invalid": "Not a valid string.",
        "email": "Not a valid email address.",
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validators.insert(0, validate.Email(error=str(self.error_messages["email"])))
        self.validators.insert(1, validate.Length(max=254))


class StrictInteger(fields.Integer):
    """An integer written as one: not ``"3"``, not ``3.0``, not ``true``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)


class StrictBoolean(fields.Boolean):
    """``true`` or ``false`` only: marshmallow's ``Boolean`` also takes ``"yes"`` and ``1``."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class ScalarField(fields.Field[Any]):
    """A JSON string, number or boolean (or null when ``allow_none``)."""

    # marshmallow merges this per class and never mutates it.
    default_error_messages: ErrorMessages = {  # noqa: RUF012
        "invalid": "Must be a string, a finite number or a boolean.",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> Any:
        if not is_scalar(value):
            raise self.make_error("invalid")
        return value


class TupleList(fields.List[Any]):
    """A JSON array loaded as a tuple, so frozen dataclasses stay immutable and hashable-ish."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise self.make_error("invalid")
        return tuple(super()._deserialize(value, attr, data, **kwargs))


class UtcDateTime(fields.Field[datetime]):
    """An RFC 3339 timestamp with an offset, loaded as an aware UTC datetime.

    Naive times are refused: a time without a zone is a bug in the producer.
    Dumped as ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``.
    """

    # marshmallow merges this per class and never mutates it.
    default_error_messages: ErrorMessages = {  # noqa: RUF012
        "invalid": "Not an RFC 3339 date-time with a time zone offset.",
    }
    _regex = re.compile(DATETIME_PATTERN)

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> datetime:
        if not isinstance(value, str) or self._regex.fullmatch(value) is None:
            raise self.make_error("invalid")
        try:
            parsed = datetime.fromisoformat(value.upper())
        except ValueError as error:
            raise self.make_error("invalid") from error
        return parsed.astimezone(UTC)

    def _serialize(self, value: datetime | None, attr: str | None, obj: Any,
                   **kwargs: Any) -> str | None:
        if value is None:
            return None
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class OneOfNested(fields.Field[Any]):
    """A value that is exactly one of several object shapes (JSON Schema ``oneOf``).

    Subclasses pick the shape from the keys present, so an error names the
    fields of the shape the producer meant instead of listing every shape's.
    """

    def choices(self) -> Sequence[Schema]:
        """The shapes, in the order the JSON Schema lists them."""
        raise NotImplementedError


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "value"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("an object has the same key twice")
    return result


def _refuse_constant(name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


def _refuse(reason: str) -> ValidationError:
    return ValidationError({"_schema": [reason]})


def parse_message(data: object, limit: int) -> Mapping[str, Any]:
    """Turn a message (JSON text, bytes or an already-decoded object) into a mapping.

    The size is checked before anything is parsed, so a huge message costs no
    more than measuring it; a dict is measured as its compact JSON encoding.
    Every way of failing is a ``ValidationError``: callers dead-letter those,
    whereas a stray ``TypeError`` would look like a bug and be retried.
    """
    if isinstance(data, Mapping):
        try:
            size = len(json.dumps(dict(data), separators=(",", ":"), ensure_ascii=False,
                                  default=str).encode("utf-8", "surrogatepass"))
        except (TypeError, ValueError, RecursionError) as error:
            raise _refuse("message cannot be encoded as JSON") from error
        if size > limit:
            raise _refuse(f"message is {size} bytes, more than {limit}")
        return data
    if isinstance(data, str):
        raw = data.encode("utf-8", "surrogatepass")
    elif isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:
        raise _refuse("message must be a JSON object, as text, bytes or a mapping")
    if len(raw) > limit:
        raise _refuse(f"message is {len(raw)} bytes, more than {limit}")
    try:
        document = json.loads(raw, object_pairs_hook=_no_duplicate_keys,
                              parse_constant=_refuse_constant)
    except UnicodeDecodeError as error:
        raise _refuse("message is not UTF-8 text") from error
    except (ValueError, RecursionError) as error:
        # JSONDecodeError and our own ValueErrors say where, never what: safe to keep.
        reason = str(error) if not isinstance(error, RecursionError) else "nested too deeply"
        raise _refuse(f"message is not valid JSON: {reason}") from error
    if not isinstance(document, dict):
        raise _refuse(f"message is a JSON {_json_type(document)}, not an object")
    return document


def _check_metadata_size(value: Mapping[str, Any]) -> None:
    try:
        size = len(canonical_json(value))
    except (TypeError, ValueError) as error:
        raise ValidationError("Must be a JSON object.") from error
    if size > MAX_METADATA_BYTES:
        raise ValidationError(f"Is {size} bytes as JSON, more than {MAX_METADATA_BYTES}.")


def metadata_field(description: str) -> fields.Dict:
    """Free-form producer data carried through to the result, small and flat."""
    return fields.Dict(
        keys=Text(validate=validate.Length(min=1, max=64)),
        values=ScalarField(allow_none=True),
        load_default=dict,
        validate=[validate.Length(max=MAX_METADATA_KEYS), _check_metadata_size],
        metadata={"description": description},
    )


def positive_id(description: str, **kwargs: Any) -> StrictInteger:
    """An Onebox id: a positive integer that fits a Java long."""
    return StrictInteger(validate=validate.Range(min=1, max=MAX_ID),
                         metadata={"description": description}, **kwargs)


def reference_field(description: str, **kwargs: Any) -> Text:
    """A reference-like name (see ``REFERENCE_PATTERN``)."""
    return Text(
        validate=[validate.Length(min=1, max=64),
                  FullMatch(REFERENCE_PATTERN, "Must use only the characters A-Z a-z 0-9 . _ : -")],
        metadata={"description": description},
        **kwargs,
    )


def schema_version_field() -> StrictInteger:
    """The contract's version: only 1 exists; a 2 must be read by a newer consumer."""
    return StrictInteger(
        load_default=1,
        validate=validate.Equal(1, error="Only schema_version 1 is supported."),
        metadata={"description": "Version of this contract. Only 1 exists; defaults to 1."},
    )


class StrictSchema(Schema):
    """Base for message schemas: unknown fields are refused, None and empty values not dumped.

    Subclasses name the dataclass they load into in ``model`` and list fields that
    are left out of a dump when empty in ``omit_when_empty``; the JSON Schema
    converter reads ``json_title`` and ``json_extra``.
    """

    model: ClassVar[Callable[..., Any]]
    omit_when_empty: ClassVar[frozenset[str]] = frozenset()
    json_title: ClassVar[str] = ""
    json_extra: ClassVar[Mapping[str, Any]] = {}

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> Any:
        return self.model(**data)

    @post_dump
    def _tidy(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {key: value for key, value in data.items()
                if value is not None and not (key in self.omit_when_empty and not value)}
