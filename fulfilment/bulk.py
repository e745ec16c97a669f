"""Bulk files of intents, read as a stream: JSONL or CSV, of any size, in constant memory.

Each reader yields one ``Record`` per intent with the line it starts on, and
counts the bytes it has read (for a progress bar). A line that cannot even be
made into an intent (a CSV seat that is not ``session:seat``) is a record with
its errors; everything else goes to the intent contract as it is, which names
each bad field.

CSV columns (a header row names them; any order; an empty cell is an absent
field; a column not listed here is refused before anything is submitted):

- ``reference`` (required), ``batch``, ``delivery_method``;
- ``hold``: ``true`` or ``false`` (any case; empty is false), the intent's ``hold``;
- ``buyer_email``, ``buyer_name``, ``buyer_surname``, ``buyer_phone``, and
  ``buyer_<field>`` for any other buyer field (``buyer_document_id``);
- ``metadata_<key>``: a metadata entry with a text value;
- one item per row: automatic seats with ``session_id``, ``price_type_id``,
  ``quantity`` and optionally ``rate_id``; or numbered seats with ``seats``, a
  list of ``session_id:seat_id`` separated by spaces, ``;`` or ``,``
  (``1001:103 1001:104``), and optionally ``rate_id`` for each of them.

Consecutive rows with the same reference are one intent with several items;
its other columns are given on its first row (later rows leave them empty or
repeat them).

Every line ends accounted for: admitted, duplicate, or refused with its line
number. A row is one line (a cell cannot span lines), read on its own: a
quote that does not close on its line, a line over ``MAX_MESSAGE_BYTES``,
bytes that are not UTF-8, or more cells than the header names refuse that
line and the intent it belongs to, and the file goes on. Blank lines and rows
of empty cells are skipped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fulfilment.errors import FulfilmentError
from schemas.intent import MAX_MESSAGE_BYTES

#: Columns of one intent (given once per intent) and of one item (one per row).
INTENT_COLUMNS = ("reference", "batch", "delivery_method", "hold", "buyer_email", "buyer_name",
                  "buyer_surname", "buyer_phone")
#: How a CSV cell spells the intent's booleans (any case); other text goes to the contract,
#: which refuses it as not a boolean.
_FLAGS = {"true": True, "false": False}
ITEM_COLUMNS = ("session_id", "price_type_id", "quantity", "rate_id", "seats")
ID_COLUMNS = ("session_id", "price_type_id", "quantity", "rate_id")
#: More items than this are refused by the contract; a reader keeps no more in memory.
MAX_ITEMS_KEPT = 21
#: Unreadable lines held back to be reported after the intent they follow, at most.
MAX_HELD_BACK = 1000
_DIGITS = re.compile(r"[0-9]{1,16}")
_SEAT = re.compile(r"([0-9]{1,16}):([0-9]{1,16})")
_SEAT_SEPARATORS = re.compile(r"[\s;,]+")
_EXTRA = re.compile(r"(buyer|metadata)_([a-z][a-z0-9_]{0,63})")
_BATCH_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]+")
#: A batch id is spelled as a reference is (it becomes the intents' ``batch`` field).
BATCH_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class BulkFileError(FulfilmentError):
    """The file as a whole cannot be read (a CSV header naming an unknown column)."""

    default_code = "BULK_FILE"


@dataclass(frozen=True)
class Record:
    """One intent of a file: what to submit, or why the line cannot be submitted."""

    line: int
    raw: bytes | dict[str, Any] | None
    reference: str | None = None
    errors: Mapping[str, Any] = field(default_factory=dict)


class Reader:
    """Iterates a file's records; ``bytes_read`` says how far it got."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.bytes_read = 0

    def __iter__(self) -> Iterator[Record]:
        raise NotImplementedError

    def _lines(self) -> Iterator[bytes]:
        for line in self._stream:
            self.bytes_read += len(line)
            yield line

    def _skip_rest_of_line(self) -> int:
        """Read past the rest of an over-long line; the bytes skipped."""
        skipped = 0
        while chunk := self._stream.readline(1 << 16):
            skipped += len(chunk)
            if chunk.endswith(b"\n"):
                break
        self.bytes_read += skipped
        return skipped


class JsonlReader(Reader):
    """One intent per line, as JSON; blank lines are skipped.

    A line longer than any intent may be (``MAX_MESSAGE_BYTES``) is refused
    without being held whole: the reader keeps at most that much of it, so a
    file with no line breaks at all is still read in constant memory.
    """

    def __iter__(self) -> Iterator[Record]:
        number = 0
        while line := self._stream.readline(MAX_MESSAGE_BYTES + 2):
            number += 1
            self.bytes_read += len(line)
            if len(line) > MAX_MESSAGE_BYTES + 1 and not line.endswith(b"\n"):
                size = len(line) + self._skip_rest_of_line()
                yield Record(number, None, errors={"_schema": [
                    f"Line is {size} bytes, more than an intent may be ({MAX_MESSAGE_BYTES})."]})
            elif line.strip():
                yield Record(number, line)


class CsvReader(Reader):
    """One item per row, under a header row (see the module docstring).

    One row is one line: each line is read as CSV on its own, so a quote that
    does not close on its line, a line longer than an intent may be, or bytes
    that are not UTF-8 refuse that line (and the intent it belongs to), never
    the lines after it, and never stop the file. A cell cannot span lines.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(stream)
        self._line = 0

    def _rows(self) -> Iterator[_Row]:
        """Each line, numbered, as cells; or, for a line CSV cannot read, why not."""
        while line := self._stream.readline(MAX_MESSAGE_BYTES + 2):
            self._line += 1
            self.bytes_read += len(line)
            if len(line) > MAX_MESSAGE_BYTES + 1 and not line.endswith(b"\n"):
                size = len(line) + self._skip_rest_of_line()
                yield _Row(self._line, None, _decode(line)[0],
                           f"is {size} bytes, more than an intent may be ({MAX_MESSAGE_BYTES})")
                continue
            text, undecodable = _decode(line)
            if self._line == 1:
                text = text.removeprefix("\ufeff")
            try:
                cells = next(csv.reader([text], strict=True), [])
            except csv.Error as exc:
                hint = "; a quote may not close on its line" if '"' in text else ""
                yield _Row(self._line, None, text, f"cannot be read as CSV ({exc}){hint}")
                continue
            yield _Row(self._line, cells, text, "is not valid UTF-8" if undecodable else None)

    def __iter__(self) -> Iterator[Record]:
        rows = self._rows()
        header = next(rows, None)
        if header is None:
            return
        if header.cells is None:
            raise BulkFileError(f"line 1, the CSV header, {header.problem}")
        columns = [name.strip() for name in header.cells]
        check_columns(columns)
        grouping = _Grouping(columns)
        for row in rows:
            yield from grouping.add(row)
        yield from grouping.close()


@dataclass(frozen=True)
class _Row:
    """One line of a CSV file: its cells, or None when CSV cannot read it, and why."""

    line: int
    cells: list[str] | None
    text: str
    problem: str | None = None


def _decode(line: bytes) -> tuple[str, bool]:
    try:
        return line.decode("utf-8"), False
    except UnicodeDecodeError:
        return line.decode("utf-8", "replace"), True


class _Grouping:
    """Turns rows into intents: consecutive rows with one reference are one intent.

    A row that cannot be read refuses the intent it belongs to. Its reference
    is read from the cells before the first quote, when the reference column
    is among them; when it cannot be, the row might belong to the intent just
    before it or just after it, so both are refused with it (refusing is
    harmless: the corrected file submitted again takes them in), and an
    intent is never bought with one of its items missing.
    """

    def __init__(self, columns: list[str]) -> None:
        self._columns = columns
        self._reference_at = columns.index("reference")
        self._group: _Group | None = None
        self._unreadable: int | None = None  # the last line whose intent is unknown
        self._after: list[Record] = []  # unreadable lines after the open intent's rows

    def add(self, row: _Row) -> Iterator[Record]:
        problem: str | None
        if row.cells is None:
            reference = self._reference_of(row.text)
            problem = f"Line {row.line} {row.problem}."
            if reference is None:
                self._unreadable = row.line
                record = Record(row.line, None, None, {"_schema": [problem]})
                if self._group is None:
                    yield record
                    return
                self._group.refuse(f"Line {row.line}, after this intent's rows, {row.problem}"
                                   "; it may be one of them.")
                self._after.append(record)  # reported after the intent, in line order
                if len(self._after) >= MAX_HELD_BACK:
                    yield from self.close()
                return
            values: dict[str, str] = {"reference": reference}
        else:
            values = {name: cell.strip() for name, cell in zip(self._columns, row.cells,
                                                               strict=False) if cell.strip()}
            if not values:
                return  # a blank line, or a row of empty cells: nothing to account for
            problem = f"Line {row.line} {row.problem}." if row.problem else None
            extra = [cell for cell in row.cells[len(self._columns):] if cell.strip()]
            if extra:
                problem = (f"Line {row.line} has {len(self._columns) + len(extra)} cells, the "
                           f"header names {len(self._columns)}: a comma in a cell that "
                           "is not quoted?")
        reference = values.get("reference")
        group = self._group
        if group is not None and reference and reference == group.reference:
            group.add(row.line, values, problem)
            self._unreadable = None  # a line between its rows was one of them, if any
            return
        yield from self.close()
        self._group = _Group(row.line, values, problem)
        if self._unreadable is not None:
            self._group.refuse(f"Line {self._unreadable}, before this intent's rows, cannot be "
                               "read; it may be one of them.")
            self._unreadable = None

    def close(self) -> Iterator[Record]:
        """The open intent's record, then the unreadable lines that came after it."""
        if self._group is not None:
            yield self._group.record()
            self._group = None
        yield from self._after
        self._after.clear()

    def _reference_of(self, text: str) -> str | None:
        """The reference cell of a line CSV cannot read, if it comes before any quote."""
        cells = re.split(r'["\r\n]', text, maxsplit=1)[0].split(",")[:-1]
        if self._reference_at >= len(cells):
            return None
        return cells[self._reference_at].strip() or None


def check_columns(columns: list[str]) -> None:
    """Refuse a header with an unknown, repeated or missing column (before submitting)."""
    unknown = [name for name in columns if name not in INTENT_COLUMNS and
               name not in ITEM_COLUMNS and not _EXTRA.fullmatch(name)]
    if unknown:
        raise BulkFileError(f"unknown CSV column(s): {', '.join(unknown)[:300]} (see "
                            "docs/producing.md, 'CSV columns')")
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if repeated:
        raise BulkFileError(f"CSV column(s) given twice: {', '.join(repeated)[:300]}")
    if "reference" not in columns:
        raise BulkFileError("the CSV header has no 'reference' column")


class _Group:
    """The rows of one intent (consecutive rows with one reference)."""

    def __init__(self, line: int, row: dict[str, str], problem: str | None) -> None:
        self.line = line
        self.reference = row.get("reference")
        self.first = {name: value for name, value in row.items()
                      if name not in ITEM_COLUMNS}
        self.items: list[dict[str, Any]] = []
        self.errors: dict[str, Any] = {}
        self.count = 0
        self.add(line, row, problem, first=True)

    def refuse(self, message: str) -> None:
        self.errors.setdefault("_schema", []).append(message)

    def add(self, line: int, row: dict[str, str], problem: str | None, *,
            first: bool = False) -> None:
        index = self.count
        self.count += 1
        if problem:
            self.refuse(problem)
            return
        if not first:
            for name, value in row.items():
                if name not in ITEM_COLUMNS and self.first.get(name) != value:
                    self.errors.setdefault(name, []).append(
                        f"Differs from the intent's first row (line {line}).")
        if index >= MAX_ITEMS_KEPT:
            return  # the contract refuses the intent for its item count anyway
        item, errors = _item(row)
        if errors:
            self.errors.setdefault("items", {})[index] = errors
        self.items.append(item)

    def record(self) -> Record:
        if self.errors:
            return Record(self.line, None, self.reference, self.errors)
        return Record(self.line, self._intent(), self.reference)

    def _intent(self) -> dict[str, Any]:
        intent: dict[str, Any] = {}
        buyer: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        for name, value in self.first.items():
            extra = _EXTRA.fullmatch(name)
            if extra and extra.group(1) == "buyer":
                buyer[extra.group(2)] = value
            elif extra:
                metadata[extra.group(2)] = value
            elif name == "hold":
                intent[name] = _FLAGS.get(value.lower(), value)
            else:
                intent[name] = value
        intent["items"] = self.items
        intent["buyer"] = buyer
        if metadata:
            intent["metadata"] = metadata
        return intent


def _item(row: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One row's item, and the errors no contract check could name."""
    item: dict[str, Any] = {name: _id(row[name]) for name in ID_COLUMNS if name in row}
    errors: dict[str, Any] = {}
    seats_cell = row.get("seats")
    if seats_cell:
        rate = item.pop("rate_id", None)
        seats = []
        for token in _SEAT_SEPARATORS.split(seats_cell):
            match = _SEAT.fullmatch(token)
            if not match:
                errors["seats"] = ["Each seat must be session_id:seat_id, e.g. 1001:103."]
                break
            seat: dict[str, Any] = {"id": int(match.group(2)),
                                    "session_id": int(match.group(1))}
            if rate is not None:
                seat["rate_id"] = rate
            seats.append(seat)
        item["seats"] = seats
    return item, errors


def _id(cell: str) -> int | str:
    """An integer cell as an integer; anything else as text, for the contract to refuse."""
    return int(cell) if _DIGITS.fullmatch(cell) else cell


def reader_for(stream: IO[bytes], file_format: str) -> Reader:
    if file_format == "csv":
        return CsvReader(stream)
    if file_format == "jsonl":
        return JsonlReader(stream)
    raise ValueError(f"unknown format {file_format!r}")


def format_of(name: str, file_format: str = "auto") -> str:
    """``jsonl`` or ``csv``: as given, or from the file's name (``.csv``; else JSONL)."""
    if file_format != "auto":
        return file_format
    return "csv" if name.lower().endswith(".csv") else "jsonl"


def batch_named(record: Record) -> str | None:
    """The batch a record's intent names, if it names a valid one."""
    raw: Any = record.raw
    if isinstance(raw, bytes):
        if len(raw) > MAX_MESSAGE_BYTES:
            return None  # refused unread by the contract
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deeply
            return None
    value = raw.get("batch") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and BATCH_ID.fullmatch(value) else None


def default_batch(path: Path | None) -> str:
    """A batch id for an upload that names none.

    For a file, its name and a digest of its resolved path (never of its
    content, nor of the time): the same file is the file at the same place,
    so a file submitted again, as it was or corrected in place, is the same
    batch, its lines already taken come back as duplicates and its corrected
    lines join them. A copy elsewhere is another batch (its intents are
    duplicates still: a batch is no part of an intent's identity); another
    file at a path used before (a daily export overwritten in place) is the
    same batch: name the batch (``--batch``) to keep such uploads apart. For
    standard input, the time and a random part.
    """
    if path is None:
        return f"upload-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    place = str(path.resolve()).encode("utf-8", "surrogateescape")
    stem = _BATCH_UNSAFE.sub("-", path.stem).strip("-.:_")[:48] or "file"
    return f"{stem}-{hashlib.sha256(place).hexdigest()[:12]}"
