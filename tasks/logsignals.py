"""Celery's own log lines, told which intent they are about; idle intake drains kept quiet.

Celery logs "Task ... received", "succeeded" and "retry" lines outside any
``bound`` block of ours, so they would read ``[ref=-]``. The purchase tasks
take the intent's reference as their only argument, so this filter finds it
where Celery keeps it: in the record's ``data`` (the "received" line, logged
by the worker's main process, carries the task's ``argsrepr``), or in the
request of the task running in this process (the "succeeded" and "retry"
lines, and our own task-layer lines, logged in the pool process). It fills
only what ``ContextFilter`` left unbound.

Beat sends ``fulfilment.maintenance.drain_intake`` every
``FULFILMENT_INTAKE_INTERVAL`` and ``fulfilment.maintenance.release_bulk``
every ``FULFILMENT_RELEASE_INTERVAL`` (a second each), and, with a callback URL set,
``fulfilment.maintenance.deliver_callbacks`` every ``FULFILMENT_CALLBACK_INTERVAL``: three
INFO lines a second each (beat's "Sending due task", the worker's "received" and
"succeeded: 0") for a run that found nothing to do. Those are demoted to
DEBUG; a run that moved something keeps its "succeeded: N" line, and the
task's own line that says what it did.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from celery import current_task
from celery.app.trace import LOG_RECEIVED, LOG_SUCCESS

#: The periodic tasks whose idle runs are quieted.
DRAIN_TASK = "fulfilment.maintenance.drain_intake"
RELEASE_TASK = "fulfilment.maintenance.release_bulk"
EXPIRE_TASK = "fulfilment.maintenance.expire_holds"
CALLBACK_TASK = "fulfilment.maintenance.deliver_callbacks"
QUIET_WHEN_IDLE = frozenset({DRAIN_TASK, RELEASE_TASK, EXPIRE_TASK, CALLBACK_TASK})
#: ``argsrepr`` of a task called with one reference: ``('shop-42',)``.
_ONE_REFERENCE = re.compile(r"\(\s*'([A-Za-z0-9._:-]{1,64})',?\s*\)")
_REFERENCE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_IDLE_RETURN = "0"


class TaskContextFilter(logging.Filter):
    """Adds the reference (and the attempt) a Celery record is about; quiets idle drains."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _idle_drain(record):
            return _demote(record)
        if hasattr(record, "reference"):
            return True  # bound by the code that logged it
        reference = None
        data = getattr(record, "data", None)
        if isinstance(data, dict) and isinstance(data.get("args"), str):
            found = _ONE_REFERENCE.fullmatch(data["args"])
            reference = found.group(1) if found else None
        task: Any = current_task
        if task:  # a proxy: false outside a task (the worker's main process)
            request = task.request
            args = request.args
            if args and len(args) == 1 and isinstance(args[0], str) \
                    and _REFERENCE.fullmatch(args[0]) and reference in {None, args[0]}:
                reference = args[0]
                if not hasattr(record, "attempt"):
                    record.attempt = (request.retries or 0) + 1
        if reference is not None:
            record.reference = reference
        return True


def _idle_drain(record: logging.LogRecord) -> bool:
    """Beat sending a drain or a release, the worker receiving it, or its success with
    nothing moved."""
    data = getattr(record, "data", None)
    if isinstance(data, dict) and data.get("name") in QUIET_WHEN_IDLE:
        if record.msg == LOG_RECEIVED:
            return True  # nobody knows yet whether it will move anything
        # Its success, with the count as a repr; a failure or a retry stays as it is.
        return record.msg == LOG_SUCCESS and data.get("return_value") == _IDLE_RETURN
    # Beat's "Scheduler: Sending due task intake-drain (fulfilment.maintenance.drain_intake)".
    return record.name == "celery.beat" and record.levelno == logging.INFO \
        and isinstance(record.args, tuple) and bool(QUIET_WHEN_IDLE.intersection(record.args))


def _demote(record: logging.LogRecord) -> bool:
    """Make the record DEBUG; keep it only where DEBUG is shown."""
    record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
    return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
