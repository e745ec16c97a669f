"""Property-based checks of both contracts.

Any valid document round-trips (load, dump, load again gives equal values and
the same document) and is valid under the committed JSON Schema; any document
mangled in one place (a required field removed, an unknown field added, a
value of the wrong type or out of range) is refused by marshmallow with an
error at that place, and by the JSON Schema too.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from schemas import (
    CANCELLED,
    CONFIRMED,
    EXPIRED,
    HELD,
    UNSETTLED,
    canonical_json,
    dump_intent,
    dump_result,
    load_intent,
    load_result,
    result_id_for,
)
from schemas.intent import BUYER_FIELDS
from schemas.jsonschema import intent_json_schema, json_schema_errors, result_json_schema
from schemas.result import CANCELLED_CODE, HOLD_EXPIRED_CODE, STATUSES

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
INTENT_SCHEMA = intent_json_schema()
RESULT_SCHEMA = result_json_schema()
Doc = dict[str, Any]
Path = tuple[Any, ...]

# --- valid documents ------------------------------------------------------------------------

ids = st.integers(min_value=1, max_value=2**53 - 1)
references = st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True)
emails = st.from_regex(r"[a-z0-9]{1,12}(\.[a-z0-9_+-]{1,8})?@[a-z0-9]{1,12}\.[a-z]{2,6}",
                       fullmatch=True)
scalars = st.one_of(st.text(max_size=12), st.integers(-(2**53), 2**53), st.booleans(),
                    st.floats(allow_nan=False, allow_infinity=False))
metadata = st.dictionaries(st.text(min_size=1, max_size=12), st.one_of(st.none(), scalars),
                           min_size=1, max_size=16).filter(
    lambda value: len(canonical_json(value)) <= 2048)

seats = st.fixed_dictionaries({"id": ids, "session_id": ids}, optional={"rate_id": ids})
numbered_items = st.fixed_dictionaries({"seats": st.lists(seats, min_size=1, max_size=4)})
auto_items = st.fixed_dictionaries(
    {"session_id": ids, "price_type_id": ids, "quantity": st.integers(1, 50)},
    optional={"rate_id": ids})


def _unique_seats(items: list[Doc]) -> bool:
    keys = [(seat["id"], seat["session_id"]) for item in items for seat in item.get("seats", ())]
    return len(keys) == len(set(keys))


items = st.lists(st.one_of(numbered_items, auto_items), min_size=1, max_size=5).filter(
    _unique_seats)
extra_names = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True).filter(
    lambda name: name not in BUYER_FIELDS)
buyers = st.builds(
    lambda named, extra: {**extra, **named},
    st.fixed_dictionaries({"email": emails}, optional={
        "name": st.text(max_size=128), "surname": st.text(max_size=128),
        "phone": st.from_regex(r"[0-9 +()-]{0,32}", fullmatch=True)}),
    st.dictionaries(extra_names, st.text(max_size=256), max_size=20),
)
intents = st.fixed_dictionaries(
    {"reference": references, "items": items, "buyer": buyers, "schema_version": st.just(1)},
    optional={
        "delivery_method": st.text(min_size=1, max_size=64),
        "payments": st.lists(st.dictionaries(st.text(max_size=8), scalars, max_size=4),
                             max_size=10),
        "batch": references,
        "metadata": metadata,
        "lane": st.sampled_from(["live", "bulk"]),
        "shop": references,
        "hold": st.just(True),  # false is the default, left out of a dump
    },
)

times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                     timezones=st.just(UTC)).map(
    lambda moment: moment.isoformat().replace("+00:00", "Z"))
errors = st.fixed_dictionaries(
    {"code": st.text(min_size=1, max_size=64), "message": st.text(max_size=200),
     "retryable": st.booleans()},
    optional={"step": st.text(min_size=1, max_size=64),
              "trace_id": st.text(min_size=1, max_size=128)})


CODE_OF = {CANCELLED: CANCELLED_CODE, EXPIRED: HOLD_EXPIRED_CODE}


@st.composite
def results(draw: st.DrawFn) -> Doc:
    reference = draw(references)
    status = draw(st.sampled_from(STATUSES))
    document: Doc = {"result_id": result_id_for(reference), "reference": reference,
                     "status": status, "attempts": draw(st.integers(1, 1000)),
                     "schema_version": 1}
    optional = {"batch": references, "shop": references,
                "order_id": st.text(min_size=1, max_size=64),
                "submitted_at": times, "finished_at": times, "metadata": metadata,
                "order_code": st.text(min_size=1, max_size=64)}
    for key, strategy in optional.items():
        if draw(st.booleans()):
            document[key] = draw(strategy)
    if status in (CONFIRMED, HELD, EXPIRED):
        document["order_code"] = draw(optional["order_code"])
    if status == UNSETTLED and "order_id" not in document:
        document["order_code"] = draw(optional["order_code"])
    if status == HELD:
        document["hold_expires_at"] = draw(times)
    elif status != CONFIRMED:
        document["error"] = draw(errors)
        if status in CODE_OF:
            document["error"]["code"] = CODE_OF[status]
    return document


@SETTINGS
@given(intents)
def test_any_valid_intent_round_trips(document: Doc) -> None:
    intent = load_intent(document)
    assert dump_intent(intent) == document
    assert load_intent(dump_intent(intent)) == intent
    assert load_intent(json.dumps(document)) == intent
    assert load_intent(json.dumps(document)).fingerprint() == intent.fingerprint()
    assert json_schema_errors(document, INTENT_SCHEMA) == []


@SETTINGS
@given(results())
def test_any_valid_result_round_trips(document: Doc) -> None:
    result = load_result(document)
    assert dump_result(result) == document
    assert load_result(dump_result(result)) == result
    assert load_result(json.dumps(document).encode()) == result
    assert json_schema_errors(document, RESULT_SCHEMA) == []


# --- mangled documents ---------------------------------------------------------------------

ID_BAD = [0, -1, "5", True, 2.5, None, 2**53, [1]]
REFERENCE_BAD = ["", "r" * 65, "no spaces", "tab\t", 7, None, ["r"]]
TEXT_BAD = ["", 5, None, True]
BAD_VALUES: dict[str, list[Any]] = {
    "reference": REFERENCE_BAD, "batch": REFERENCE_BAD, "shop": REFERENCE_BAD,
    "lane": ["", "Live", "fast", 1, None, ["live"]],
    "id": ID_BAD, "session_id": ID_BAD, "price_type_id": ID_BAD, "rate_id": ID_BAD,
    "quantity": [0, 51, "3", True, 2.5, None, -3],
    "seats": [[], "seats", None, {}, [{}]],
    "items": [[], "items", None, {}, [None]],
    "buyer": ["ana@example.com", [], None, {}],
    "email": ["not-an-email", "", 5, None, "a@" + "b" * 250 + ".com"],
    "name": ["n" * 129, 5, None], "surname": ["s" * 129, False],
    "phone": ["call me", "1" * 33, 34600, None],
    "delivery_method": ["", "d" * 65, 5, None],
    "payments": [{}, "cash", [1], [{"k": [1]}], [{}] * 11, None],
    "metadata": [[], "meta", {"k": {"nested": 1}}, {"k": [1]}, {f"k{n}": 1 for n in range(17)}],
    "schema_version": [2, 0, "1", True, None, 1.5],
    "hold": ["true", 1, 0, None, [True]],
    # results
    "result_id": ["not-a-uuid", 5, None, ""],
    "status": ["done", "CONFIRMED", 1, None],
    "attempts": [0, -1, True, "1", 1.5, None],
    "submitted_at": ["2026-11-26T17:00:00", "2026-11-26", "soon", 5, None],
    "finished_at": ["2026-13-01T00:00:00Z", 0],
    "hold_expires_at": ["2026-11-26T17:00:00", "in ten minutes", 600, None],
    "order_code": ["", 5, None], "order_id": ["", 5, None],
    "error": ["boom", [], None, {}],
    "code": ["", "c" * 65, 5, None], "message": ["m" * 2049, 5, None],
    "step": ["", 5], "trace_id": ["", "t" * 129, 5], "retryable": ["yes", 1, None],
}
#: Tuples, not sets: hypothesis replays a failure only if the choices come in the same order.
REQUIRED: dict[str, tuple[str, ...]] = {
    "intent": ("reference", "items", "buyer"), "numbered": ("seats",),
    "auto": ("session_id", "price_type_id", "quantity"), "seat": ("id", "session_id"),
    "buyer": ("email",), "result": ("result_id", "reference", "status"),
    "error": ("code", "message"),
}


def _objects(document: Doc, kind: str) -> Iterator[tuple[Path, str, Doc]]:
    """(path, kind, object) for every object of the contract's own structure.

    Metadata, payments and buyer's other fields are free-form: not walked.
    """
    yield (), kind, document
    if kind == "intent":
        yield ("buyer",), "buyer", document["buyer"]
        for i, item in enumerate(document["items"]):
            yield ("items", i), "numbered" if "seats" in item else "auto", item
            for j, seat in enumerate(item.get("seats", ())):
                yield ("items", i, "seats", j), "seat", seat
    elif "error" in document:
        yield ("error",), "error", document["error"]


def _mutations(document: Doc, kind: str) -> list[tuple[str, Path, Any]]:
    """Every single mangling of the document: (what, path, new value or None)."""
    found: list[tuple[str, Path, Any]] = []
    for path, object_kind, node in _objects(document, kind):
        for key in REQUIRED[object_kind]:
            found.append(("remove", (*path, key), None))
        if object_kind == "result":
            found.extend(_status_mutations(node))
        if object_kind == "buyer":
            found.append(("add", (*path, "Not-A-Field-Name"), "x"))
        else:
            found.append(("add", (*path, "unexpected_field"), 1))
        # A buyer's other fields may have any name ("code", "status"...): leave them be.
        keys = BUYER_FIELDS if object_kind == "buyer" else tuple(node)
        for key in keys:
            if key in node and key in BAD_VALUES:
                found.extend(("replace", (*path, key), bad) for bad in BAD_VALUES[key])
    return found


def _status_mutations(result: Doc) -> list[tuple[str, Path, Any]]:
    """Manglings that break only a rule tying fields to the status."""
    status = result["status"]
    found: list[tuple[str, Path, Any]] = []
    if status in (CONFIRMED, HELD, EXPIRED):
        found.append(("remove", ("order_code",), None))
    if status == HELD:
        found.append(("remove", ("hold_expires_at",), None))
        found.append(("add", ("error",), {"code": "X", "message": "m"}))
    else:
        found.append(("add", ("hold_expires_at",), "2026-11-26T17:10:00Z"))
    if status not in (CONFIRMED, HELD):
        found.append(("remove", ("error",), None))
    if status in CODE_OF:
        found.append(("replace", ("error", "code"), "ORDER_SEAT_NOT_AVAILABLE"))
    return found


def _apply(document: Doc, what: str, path: Path, value: Any) -> Doc:
    mangled = copy.deepcopy(document)
    parent: Any = mangled
    for key in path[:-1]:
        parent = parent[key]
    if what == "remove":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return mangled


def _error_path(document: Doc, what: str, path: Path) -> Path:
    """Where marshmallow must report the mangling."""
    if what == "remove" and path[-1] == "seats":
        return (*path[:-1], "_schema")  # no longer numbered: the item has neither shape
    return path


def _assert_refused(document: Doc, what: str, path: Path, messages: Any) -> None:
    node = messages
    for key in _error_path(document, what, path):
        assert isinstance(node, dict), (what, path, messages)
        assert key in node, (what, path, messages)
        node = node[key]
    assert node


def _check_mangled(document: Doc, kind: str, data: st.DataObject) -> None:
    what, path, value = data.draw(st.sampled_from(_mutations(document, kind)), label="mutation")
    mangled = _apply(document, what, path, value)
    load = load_intent if kind == "intent" else load_result
    with pytest.raises(ValidationError) as caught:
        load(mangled)
    _assert_refused(document, what, path, caught.value.messages)
    schema = INTENT_SCHEMA if kind == "intent" else RESULT_SCHEMA
    assert json_schema_errors(mangled, schema), (what, path, value)


@SETTINGS
@given(intents, st.data())
def test_any_mangled_intent_is_refused(document: Doc, data: st.DataObject) -> None:
    _check_mangled(document, "intent", data)


@SETTINGS
@given(results(), st.data())
def test_any_mangled_result_is_refused(document: Doc, data: st.DataObject) -> None:
    _check_mangled(document, "result", data)
