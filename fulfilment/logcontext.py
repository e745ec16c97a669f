"""Who a log line is about: intent reference, order id, step, attempt, Onebox trace.

Code binds the identifiers once (``with bound(reference=..., step=...)``) and
every log line below it carries them, through ``ContextFilter`` which the worker
and the CLI install on their handlers. Only identifiers go here, never buyer
data. ``trace`` is Onebox's ``ob-audit-trace-id`` of the call a line is about:
what Onebox support asks for.

Two formats (``FULFILMENT_LOG_FORMAT``): ``text``, one line with the fields in
brackets, for people; ``json``, one JSON object per line, for a log pipeline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

FIELDS = ("reference", "order_id", "step", "attempt", "trace")
#: The values ``FULFILMENT_LOG_FORMAT`` may take.
LOG_FORMATS = ("text", "json")
#: How an unbound field reads in the text format.
UNBOUND = "-"

_context: ContextVar[dict[str, Any] | None] = ContextVar("fulfilment_log_context", default=None)


@contextmanager
def bound(**values: Any) -> Iterator[None]:
    """Attach identifiers to every log line emitted inside the block (``None``: leave as is)."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise TypeError(f"unknown log context fields: {sorted(unknown)}")
    merged = {**(_context.get() or {}), **{k: v for k, v in values.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def current() -> dict[str, Any]:
    """The identifiers bound here (a copy)."""
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Copies the bound identifiers onto each record.

    A field already on the record (``extra=``, or an earlier filter) is kept. An
    unbound field is left off: the text format shows ``-``, the JSON format null.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        values = _context.get()
        if values:
            for name, value in values.items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


TEXT_FORMAT = (
    "%(asctime)s %(levelname)s %(name)s [ref=%(reference)s order=%(order_id)s step=%(step)s "
    "attempt=%(attempt)s trace=%(trace)s] %(message)s"
)
#: Kept under its old name for callers that format records themselves.
LOG_FORMAT = TEXT_FORMAT


def text_formatter() -> logging.Formatter:
    """The text format; fields nobody bound read ``-``."""
    return logging.Formatter(TEXT_FORMAT, defaults=dict.fromkeys(FIELDS, UNBOUND))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, every context field.

    Every key is always there (null when unbound), so a pipeline can index the
    fields without guessing. A traceback goes in ``exception``, escaped into the
    same line.
    """

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            document[name] = getattr(record, name, None)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, ensure_ascii=False, default=str)


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of a ``FULFILMENT_LOG_FORMAT`` value."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return text_formatter()
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")


def _configured_format() -> str:
    """``FULFILMENT_LOG_FORMAT`` as the settings read it; text if they cannot be read
    (the command reports the bad setting itself, and should say so legibly)."""
    from fulfilment.config import Settings
    from fulfilment.errors import ConfigError

    try:
        return Settings.from_env().log_format
    except ConfigError:
        return "text"


def configure_logging(level: str | int = "INFO", fmt: str | None = None,
                      filters: Sequence[logging.Filter] = ()) -> None:
    """Set up the root logger once, for an application entry point (CLI, worker).

    ``fmt`` is ``text`` or ``json`` (default: ``FULFILMENT_LOG_FORMAT``).
    ``filters`` run after ``ContextFilter`` and may fill the fields it left
    unbound: the worker's tells what Celery's own records are about
    (``tasks.logsignals``).
    """
    root = logging.getLogger()
    if any(isinstance(f, ContextFilter) for h in root.handlers for f in h.filters):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(fmt or _configured_format()))
    handler.addFilter(ContextFilter())
    for extra in filters:
        handler.addFilter(extra)
    root.addHandler(handler)
    root.setLevel(level)
    # urllib3 logs full URLs and retries at DEBUG; keep it quiet unless asked.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
