"""Bulk files read as streams: JSONL and CSV records, line numbers, the default batch id."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from fulfilment.bulk import (
    BulkFileError,
    CsvReader,
    JsonlReader,
    Record,
    default_batch,
    format_of,
)
from fulfilment.errors import InvalidMessageError
from fulfilment.producer import parse_intent
from fulfilment.progress import Progress
from schemas.intent import dump_intent


def csv_records(text: str) -> list[Record]:
    return list(CsvReader(io.BytesIO(text.encode())))


def test_jsonl_records_keep_their_line_numbers_and_the_bytes_read() -> None:
    data = b'{"a": 1}\n\n  \n{"b": 2}\nnot json\n'
    reader = JsonlReader(io.BytesIO(data))
    records = list(reader)
    assert [(r.line, r.raw) for r in records] == [(1, b'{"a": 1}\n'), (4, b'{"b": 2}\n'),
                                                  (5, b"not json\n")]
    assert reader.bytes_read == len(data)


def test_csv_rows_map_to_intents_and_consecutive_rows_of_a_reference_are_its_items() -> None:
    text = (
        "\ufeffreference,batch,session_id,price_type_id,quantity,rate_id,seats,buyer_email,"
        "buyer_name,buyer_phone,buyer_document_id,delivery_method,metadata_campaign\n"
        "shop-1,b1,1002,3,2,,,ana@example.com,Ana,+34 600 000 000,00000000T,EMAIL,bf\n"
        "shop-1,,,,,1,1001:103 1001:104;1001:105,,,,,,\n"
        "shop-2,b1,1002,4,1,,,luis@example.org,,,,,\n"
    )
    records = csv_records(text)
    assert [(r.line, r.reference) for r in records] == [(2, "shop-1"), (4, "shop-2")]
    raw = records[0].raw
    assert raw is not None
    first = dump_intent(parse_intent(raw, max_quantity=50))
    assert first == {
        "reference": "shop-1", "batch": "b1", "delivery_method": "EMAIL",
        "buyer": {"email": "ana@example.com", "name": "Ana", "phone": "+34 600 000 000",
                  "document_id": "00000000T"},
        "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 2},
                  {"seats": [{"id": seat, "session_id": 1001, "rate_id": 1}
                             for seat in (103, 104, 105)]}],
        "metadata": {"campaign": "bf"}, "schema_version": 1,
    }


def test_csv_rows_that_cannot_be_intents_are_refused_with_field_and_reason() -> None:
    text = ("reference,session_id,price_type_id,quantity,seats,buyer_email\n"
            "bad-seat,,,,1001-103,a@example.com\n"
            "bad-qty,1002,3,3.0,,a@example.com\n"
            "two-buyers,1002,3,1,,a@example.com\n"
            "two-buyers,1002,3,1,,b@example.com\n"
            '"multi\nline",1002,3,1,,a@example.com\n'
            "after,1002,3,1,,a@example.com\n")
    records = csv_records(text)
    assert [(r.line, r.reference) for r in records] == [
        (2, "bad-seat"), (3, "bad-qty"), (4, "two-buyers"), (6, "multi\nline"), (8, "after")]
    assert records[0].raw is None
    assert records[0].errors == {"items": {0: {"seats": [
        "Each seat must be session_id:seat_id, e.g. 1001:103."]}}}
    bad_qty = records[1].raw
    assert bad_qty is not None
    with pytest.raises(InvalidMessageError) as caught:
        parse_intent(bad_qty, max_quantity=50)
    assert "quantity" in json.dumps(caught.value.errors)
    assert records[2].raw is None and "buyer_email" in records[2].errors
    assert "b@example.com" not in json.dumps(records[2].errors)  # never the value itself
    assert records[4].raw is not None


@pytest.mark.parametrize(("header", "message"), [
    ("reference,seat\n", "unknown CSV column(s): seat"),
    ("reference,quantity,quantity\n", "given twice: quantity"),
    ("session_id,quantity\n", "no 'reference' column"),
])
def test_a_csv_header_with_an_unknown_column_is_refused_before_anything(header: str,
                                                                        message: str) -> None:
    with pytest.raises(BulkFileError, match=re.escape(message)):
        csv_records(header + "x,1\n")


def test_the_default_batch_is_the_same_for_the_same_file(tmp_path: Path) -> None:
    first = tmp_path / "night run (17).jsonl"
    first.write_text('{"reference": "a"}\n')
    copy = tmp_path / "night run (17) .jsonl"
    copy.write_text('{"reference": "a"}\n')
    assert default_batch(first) == default_batch(first)
    assert default_batch(first).startswith("night-run-17-")
    first.write_text('{"reference": "b"}\n')
    assert default_batch(first) != default_batch(copy)
    for batch in (default_batch(first), default_batch(None)):
        assert re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", batch)
    assert format_of("x.CSV") == "csv" and format_of("x.jsonl") == "jsonl"
    assert format_of("-", "csv") == "csv"


def test_progress_off_a_terminal_is_plain_periodic_lines() -> None:
    now = [0.0]
    out = io.StringIO()
    progress = Progress("submitting", 1000, "intents", file=out, terminal=False, every=5,
                        clock=lambda: now[0])
    now[0] = 2.0
    progress.update(100, 50)
    assert out.getvalue() == ""  # not yet: one line per five seconds
    now[0] = 10.0
    progress.update(250, 200)
    now[0] = 20.0
    progress.update(1000, 800)
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines == ["submitting: 200 intents (25%), 20.0/s, ETA 0:00:30",
                     "submitting: 800 intents (100%), 40.0/s",
                     "submitting: 800 intents in 0:00:20, 40.0/s"]


def test_the_upload_takes_the_batch_its_first_intent_names() -> None:
    from fulfilment.bulk import Record, batch_named

    assert batch_named(Record(1, b'{"reference": "a", "batch": "night-17"}\n')) == "night-17"
    assert batch_named(Record(1, {"reference": "a", "batch": "csv-b"})) == "csv-b"
    for raw in (b'{"reference": "a"}', b"not json", b'["x"]', b'{"batch": "bad batch"}', None):
        assert batch_named(Record(1, raw)) is None
