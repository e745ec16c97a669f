"""Bulk files of intents, read as a stream: JSONL or CSV, of any size, in constant memory.

Each reader yields one ``Record`` per intent with the line it starts on, and
counts the bytes it has read (for a progress bar). A line that cannot even be
made into an intent (a CSV seat that is not ``session:seat``) is a record with
its errors; everything else goes to the intent contract as it is, which names
each bad field.

CSV columns (a header row names them; any order; an empty cell is an absent
field; a column not listed here is refused before anything is submitted):

- ``reference`` (required), ``batch``, ``delivery_method``;
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
INTENT_COLUMNS = ("reference", "batch", "delivery_method", "buyer_email", "buyer_name",
                  "buyer_surname", "buyer_phone")
ITEM_COLUMNS = ("session_id", "price_type_id", "quantity", "rate_id", "seats")
ID_COLUMNS = ("session_id", "price_type_id", "quantity", "rate_id")
#: More items than this are refused by the contract; a reader keeps no more in memory.
MAX_ITEMS_KEPT = 21
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

    def _skip_rest_of_line(self) -> int:
        skipped = 0
        while chunk := self._stream.readline(1 << 16):
            skipped += len(chunk)
            if chunk.endswith(b"\n"):
                break
        self.bytes_read += skipped
        return skipped


class CsvReader(Reader):
    """One item per row, under a header row (see the module docstring)."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(stream)
        self._undecodable: set[int] = set()
        self._line = 0

    def _text(self) -> Iterator[str]:
        for line in self._lines():
            self._line += 1
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                self._undecodable.add(self._line)
                text = line.decode("utf-8", "replace")
            yield text.removeprefix("\ufeff") if self._line == 1 else text

    def __iter__(self) -> Iterator[Record]:
        try:
            yield from self._records()
        except csv.Error as exc:  # a field over csv's size limit, a stray quote at the end
            raise BulkFileError(f"line {self._line}: the CSV cannot be read: {exc}") from None

    def _records(self) -> Iterator[Record]:
        rows = csv.reader(self._text())
        header = next(rows, None)
        if header is None:
            return
        columns = [name.strip() for name in header]
        check_columns(columns)
        group: _Group | None = None
        first_line = rows.line_num + 1
        for cells in rows:
            line, first_line = first_line, rows.line_num + 1
            row = {name: cell.strip() for name, cell in zip(columns, cells, strict=False)
                   if cell.strip()}
            if not row:
                continue
            undecodable = line in self._undecodable
            reference = row.get("reference")
            if group is not None and reference and reference == group.reference:
                group.add(row, undecodable)
                continue
            if group is not None:
                yield group.record()
            group = _Group(line, row, undecodable)
        if group is not None:
            yield group.record()


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

    def __init__(self, line: int, row: dict[str, str], undecodable: bool) -> None:
        self.line = line
        self.reference = row.get("reference")
        self.first = {name: value for name, value in row.items()
                      if name not in ITEM_COLUMNS}
        self.items: list[dict[str, Any]] = []
        self.errors: dict[str, Any] = {}
        self.count = 0
        self.add(row, undecodable, first=True)

    def add(self, row: dict[str, str], undecodable: bool, *, first: bool = False) -> None:
        index = self.count
        self.count += 1
        if undecodable:
            self.errors.setdefault("_schema", []).append(f"Row {index + 1} is not valid UTF-8.")
        if not first:
            for name, value in row.items():
                if name not in ITEM_COLUMNS and self.first.get(name) != value:
                    self.errors.setdefault(name, []).append(
                        f"Differs from the intent's first row (row {index + 1}).")
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

    For a file, its name and a digest of its bytes (read once, in blocks): the
    same file submitted again is the same batch, so its intents are duplicates,
    not conflicts. For standard input, the time and a random part.
    """
    if path is None:
        return f"upload-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    stem = _BATCH_UNSAFE.sub("-", path.stem).strip("-.:_")[:48] or "file"
    return f"{stem}-{digest.hexdigest()[:12]}"
