"""Fuzzing every way in: whatever arrives is accepted or refused with a message, never an
unexpected exception (the producer API, the intake's parsing, the JSONL and CSV readers)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any, TypeVar

import fakeredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fulfilment.bulk import BulkFileError, CsvReader, JsonlReader, batch_named
from fulfilment.errors import InvalidMessageError
from fulfilment.keys import Keys
from fulfilment.ledger import Ledger
from fulfilment.producer import (
    ACCEPTED,
    DUPLICATE,
    REFUSED,
    Producer,
    ReferenceConflictError,
    describe_errors,
    parse_intent,
    reference_of,
)

F = TypeVar("F", bound=Callable[..., None])


def budget(examples: int) -> Callable[[F], F]:
    """Thousands of cases across the file, each test well under ten seconds here."""
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)
ids = st.one_of(st.integers(min_value=-3, max_value=2**54), st.text(max_size=4), st.none(),
                st.booleans(), st.floats(allow_nan=True))
item = st.one_of(
    st.fixed_dictionaries({"session_id": ids, "price_type_id": ids, "quantity": ids},
                          optional={"rate_id": ids}),
    st.fixed_dictionaries({"seats": st.lists(st.fixed_dictionaries(
        {"id": ids, "session_id": ids}, optional={"rate_id": ids}), max_size=3)}),
    json_values)
# Near-valid intents: the right fields with wrong, odd or missing values.
intents = st.fixed_dictionaries(
    {},
    optional={"reference": st.one_of(st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True),
                                     st.text(max_size=70), ids),
              "items": st.one_of(st.lists(item, max_size=3), json_values),
              "buyer": st.one_of(st.fixed_dictionaries(
                  {}, optional={"email": st.one_of(st.emails(), st.text(max_size=30)),
                                "phone": st.text(max_size=40),
                                "name": st.text(max_size=20)}), json_values),
              "batch": st.one_of(st.text(max_size=10), ids),
              "metadata": json_values, "schema_version": ids,
              "delivery_method": st.one_of(st.text(max_size=70), ids),
              "payments": json_values,
              "extra": json_values})
raw_messages = st.one_of(
    intents, intents.map(json.dumps), intents.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=300), st.text(max_size=300), json_values.map(json.dumps),
    st.sampled_from([10, 900, 1100, 3000]).map(lambda n: "[" * n + "]" * n),
    st.sampled_from([10, 900, 1100, 3000]).map(lambda n: '{"a":' * n + "1" + "}" * n))


def refused_conflict(exc: ReferenceConflictError) -> None:
    assert "different purchase" in exc.message


def stopped_well(exc: BulkFileError) -> None:
    assert exc.message


def refused_well(exc: InvalidMessageError) -> None:
    assert exc.message
    assert exc.errors and describe_errors(exc.errors), exc.errors


@budget(500)
@given(raw_messages)
def test_parsing_accepts_or_refuses_with_field_errors(raw: Any) -> None:
    try:
        intent = parse_intent(raw, max_quantity=50)
    except InvalidMessageError as exc:
        refused_well(exc)
        reference_of(raw)  # what error reports use: never raises either
    else:
        assert intent.reference


def new_producer() -> tuple[Producer, list[str]]:
    dispatched: list[str] = []
    ledger = Ledger(fakeredis.FakeRedis(), Keys("fuzz"), 3600)
    return Producer(ledger, dispatched.append, max_quantity=50,
                    dispatch_many=dispatched.extend), dispatched


@budget(200)
@given(st.lists(raw_messages, max_size=8), st.one_of(st.none(), st.sampled_from(["b-1"])))
def test_submit_many_answers_each_intent_in_order_and_raises_nothing(
        raws: list[Any], batch: str | None) -> None:
    producer, dispatched = new_producer()
    answers = list(producer.submit_many(raws, batch=batch, chunk=5))
    assert len(answers) == len(raws)
    for answer in answers:
        assert answer.status in {ACCEPTED, DUPLICATE, REFUSED}
        if answer.status == REFUSED:
            assert answer.reason and (answer.errors or "different purchase" in answer.reason)
    assert len(dispatched) == sum(a.status == ACCEPTED for a in answers)


@budget(300)
@given(st.lists(raw_messages, max_size=4))
def test_submit_accepts_or_raises_only_the_two_refusals(raws: list[Any]) -> None:
    producer, _ = new_producer()
    for raw in raws:
        try:
            submission = producer.submit(raw)
        except InvalidMessageError as exc:
            refused_well(exc)
        except ReferenceConflictError as exc:
            refused_conflict(exc)
        else:
            assert submission.status in {ACCEPTED, DUPLICATE}


@budget(400)
@given(st.lists(st.one_of(raw_messages.map(lambda r: r if isinstance(r, bytes | str)
                                         else json.dumps(r)),
                          st.binary(max_size=80)), max_size=4))
def test_jsonl_files_yield_a_record_per_line_whatever_they_hold(lines: list[Any]) -> None:
    data = b"\n".join(line.encode("utf-8", "surrogatepass") if isinstance(line, str)
                      else line for line in lines)
    reader = JsonlReader(io.BytesIO(data))
    for record in reader:
        assert record.line >= 1
        assert record.raw is not None or record.errors
        if record.raw is not None:
            batch_named(record)
            try:
                parse_intent(record.raw, max_quantity=50)
            except InvalidMessageError as exc:
                refused_well(exc)
    assert reader.bytes_read == len(data)


def test_a_jsonl_line_longer_than_any_intent_is_refused_without_being_held() -> None:
    data = b'{"reference": "a"}\n' + b"x" * 300_000 + b"\n" + b'{"reference": "b"}\n'
    records = list(JsonlReader(io.BytesIO(data)))
    assert [r.line for r in records] == [1, 2, 3]
    assert records[1].raw is None and "300001 bytes" in str(records[1].errors)


COLUMNS = ["reference", "batch", "session_id", "price_type_id", "quantity", "rate_id", "seats",
           "buyer_email", "buyer_name", "buyer_phone", "buyer_document_id", "metadata_note",
           "delivery_method", "notacolumn", "reference"]
cells = st.one_of(st.sampled_from(["", "1", "1002", "3", "0", "-1", "3.0", "x", "1001:103",
                                   "1001:103 1001:104", "a:b", "ana@example.com", "shop-1",
                                   "\"", "\"q\"\"", "9" * 30]),
                  st.text(max_size=15))


@budget(800)
@given(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=8),
       st.lists(st.lists(cells, max_size=9), max_size=8), st.binary(max_size=40))
def test_csv_files_yield_records_or_stop_with_a_message(
        header: list[str], rows: list[list[str]], garbage: bytes) -> None:
    import csv

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    data = text.getvalue().encode("utf-8", "surrogatepass") + garbage
    try:
        for record in CsvReader(io.BytesIO(data)):
            assert record.raw is not None or record.errors
            if record.raw is not None:
                try:
                    parse_intent(record.raw, max_quantity=50)
                except InvalidMessageError as exc:
                    refused_well(exc)
    except BulkFileError as exc:
        stopped_well(exc)
