"""Who a log line is about: intent reference, order id, step and attempt.

Code binds the identifiers once (``with bound(reference=..., step=...)``) and
every log line below it carries them, through ``ContextFilter`` which the worker
and the CLI install on their handlers. Only identifiers go here, never buyer
data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

FIELDS = ("reference", "order_id", "step", "attempt")

_context: ContextVar[dict[str, Any] | None] = ContextVar("fulfilment_log_context", default=None)


@contextmanager
def bound(**values: Any) -> Iterator[None]:
    """Attach identifiers to every log line emitted inside the block."""
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
    """Copies the bound identifiers onto each record, ``-`` where unbound."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = _context.get() or {}
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, values.get(name, "-"))
        return True


LOG_FORMAT = (
    "%(asctime)s %(levelname)s %(name)s "
    "[ref=%(reference)s order=%(order_id)s step=%(step)s attempt=%(attempt)s] %(message)s"
)


def configure_logging(level: str | int = "INFO") -> None:
    """Set up the root logger once, for an application entry point (CLI, worker)."""
    root = logging.getLogger()
    if any(isinstance(f, ContextFilter) for h in root.handlers for f in h.filters):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level)
    # urllib3 logs full URLs and retries at DEBUG; keep it quiet unless asked.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
