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


def test_a_csv_hold_column_reads_as_the_intent_s_boolean() -> None:
    text = ("reference,hold,session_id,price_type_id,quantity,buyer_email\n"
            "h-1,true,1002,3,1,a@example.com\n"
            "h-1,,1002,4,1,\n"
            "h-2,FALSE,1002,3,1,a@example.com\n"
            "h-3,,1002,3,1,a@example.com\n"
            "h-4,yes,1002,3,1,a@example.com\n")
    records = csv_records(text)
    intents = [parse_intent(r.raw, max_quantity=50) for r in records[:3] if r.raw is not None]
    assert [intent.hold for intent in intents] == [True, False, False]
    assert len(intents[0].items) == 2
    assert "hold" not in dump_intent(intents[2])  # an empty cell: the field is absent
    raw = records[3].raw
    assert raw is not None
    with pytest.raises(InvalidMessageError) as caught:
        parse_intent(raw, max_quantity=50)
    assert "hold" in caught.value.errors


def test_csv_rows_that_cannot_be_intents_are_refused_with_field_and_reason() -> None:
    text = ("reference,session_id,price_type_id,quantity,seats,buyer_email\n"
            "bad-seat,,,,1001-103,a@example.com\n"
            "bad-qty,1002,3,3.0,,a@example.com\n"
            "two-buyers,1002,3,1,,a@example.com\n"
            "two-buyers,1002,3,1,,b@example.com\n"
            "after,1002,3,1,,a@example.com\n")
    records = csv_records(text)
    assert [(r.line, r.reference) for r in records] == [
        (2, "bad-seat"), (3, "bad-qty"), (4, "two-buyers"), (6, "after")]
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
    assert records[3].raw is not None


@pytest.mark.parametrize(("header", "message"), [
    ("reference,seat\n", "unknown CSV column(s): seat"),
    ("reference,quantity,quantity\n", "given twice: quantity"),
    ("session_id,quantity\n", "no 'reference' column"),
])
def test_a_csv_header_with_an_unknown_column_is_refused_before_anything(header: str,
                                                                        message: str) -> None:
    with pytest.raises(BulkFileError, match=re.escape(message)):
        csv_records(header + "x,1\n")


def test_the_default_batch_is_the_file_s_place_not_its_content(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a file, submitted once
    first = tmp_path / "night run (17).jsonl"
    first.write_text('{"reference": "a"}\n')
    batch = default_batch(first)
    assert batch.startswith("night-run-17-")
    # When it is corrected in place, or named by another spelling of its path
    first.write_text('{"reference": "a"}\n{"reference": "b"}\n')
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.jsonl").symlink_to(first)
    # Then it is the same batch: its lines taken before come back as duplicates
    assert default_batch(first) == batch
    assert default_batch(Path("night run (17).jsonl")) == batch
    assert default_batch(Path("sub/../night run (17).jsonl")) == batch
    assert default_batch(tmp_path / "link.jsonl").endswith(batch.rsplit("-", 1)[1])
    # And a copy at another place, even with the same content, is another batch
    (tmp_path / "sub").mkdir()
    copy = tmp_path / "sub" / "night run (17).jsonl"
    copy.write_bytes(first.read_bytes())
    assert default_batch(copy) != batch
    for named in (batch, default_batch(None)):
        assert re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", named)
    assert format_of("x.CSV") == "csv" and format_of("x.jsonl") == "jsonl"
    assert format_of("-", "csv") == "csv"


HEADER = "reference,session_id,price_type_id,quantity,buyer_email,buyer_name\n"


def accounted(records: list[Record]) -> dict[int, str]:
    """Each record's first line: what it says (``ok`` or its errors, as text)."""
    return {r.line: "ok" if r.raw is not None else json.dumps(r.errors) for r in records}


def test_a_stray_quote_refuses_its_own_line_and_never_swallows_the_lines_after_it() -> None:
    # Given a CSV file where one cell opens a quote that never closes on its line
    text = (HEADER
            + "shop-1,1002,3,1,a@example.com,Ana\n"
            + 'shop-2,1002,3,1,b@example.com,"Luis\n'
            + "".join(f"shop-{n},1002,3,1,c@example.com,Eva\n" for n in range(3, 9))
            + 'shop-9,1002,3,1,d@example.com,"Bo\n'
            + "shop-10,1002,3,1,e@example.com,O'Hara \"Jr\"\n")
    # When it is read
    records = csv_records(text)
    # Then each line is one record: the two broken lines refused by number, the rest read
    assert [r.line for r in records] == list(range(2, 12))
    said = accounted(records)
    assert "Line 3 cannot be read as CSV" in said.pop(3)
    assert "Line 10 cannot be read as CSV" in said.pop(10)
    assert set(said.values()) == {"ok"}
    assert [r.reference for r in records if r.raw is None] == ["shop-2", "shop-9"]
    assert "Luis" not in json.dumps([r.errors for r in records])  # never the value itself


def test_a_cell_over_the_csv_module_s_limit_refuses_its_line_and_the_file_goes_on() -> None:
    # Given a line with one cell over 131,072 characters (csv's field size limit),
    # and a line of more cells than the header names (a comma that is not quoted)
    text = (HEADER
            + "shop-1,1002,3,1,a@example.com,Ana\n"
            + "shop-2,1002,3,1,b@example.com," + "x" * 140_000 + "\n"
            + "shop-3,1002,3,1,c@example.com,Smith, John\n"
            + "shop-4,1002,3,1,d@example.com,Eva\n")
    # When it is read: no error stops it
    reader = CsvReader(io.BytesIO(text.encode()))
    records = list(reader)
    # Then the long line and the shifted line are refused, each by its number; all is read
    said = accounted(records)
    assert list(said) == [2, 3, 4, 5]
    assert "Line 3 is 140" in said[3] and "more than an intent may be" in said[3]
    assert "Line 4 has 7 cells, the header names 6" in said[4]
    assert said[2] == said[5] == "ok"
    assert [r.reference for r in records] == ["shop-1", "shop-2", "shop-3", "shop-4"]
    assert reader.bytes_read == len(text.encode())


def test_a_broken_line_refuses_the_whole_intent_it_may_belong_to() -> None:
    # Given a three-row intent whose middle row is broken (its reference readable),
    # and a line broken before its reference, between two intents
    text = (HEADER
            + "multi,1002,3,1,a@example.com,Ana\n"
            + 'multi,1002,4,"1,,\n'
            + "multi,1002,5,1,,\n"
            + "alone,1002,3,1,b@example.com,Luis\n"
            + '"lost,1002,3,1,c@example.com,Eva\n'
            + "next,1002,3,1,d@example.com,Bo\n"
            + "next,1002,4,1,,\n"
            + "last,1002,3,1,e@example.com,Jo\n")
    records = csv_records(text)
    said = accounted(records)
    # Then no intent is bought with a row missing: "multi" is refused whole; the line
    # whose reference cannot be read refuses itself and both intents beside it
    assert list(said) == [2, 5, 6, 7, 9]
    assert "Line 3 cannot be read" in said[2]
    assert "Line 6, after this intent's rows" in said[5]
    assert "Line 6 cannot be read" in said[6]
    assert "Line 6, before this intent's rows" in said[7]
    assert said[9] == "ok"
    assert [r.reference for r in records] == ["multi", "alone", None, "next", "last"]


def test_a_broken_csv_header_stops_the_file_before_anything() -> None:
    with pytest.raises(BulkFileError, match="line 1, the CSV header, cannot be read"):
        csv_records('reference,"buyer_email\nshop-1,a@example.com\n')


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
