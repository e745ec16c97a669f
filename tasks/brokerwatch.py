"""A broker outage in the worker and in beat: one warning when it starts, one line when it ends.

Celery already rides out a lost broker (nothing is lost: late-acknowledged
messages come again, the ledger makes a second run a no-op), but tells it as
a disaster. With the threads pool, every connection loss logs, per task under
way, that it "cannot be acknowledged" and a ``NotImplementedError`` traceback
(``kill_job``: threads cannot be cancelled), then a CRITICAL "Couldn't ack"
per message once the task ends, an ERROR per reconnect attempt, and beat an
ERROR with two tracebacks every second. Here:

- ``Consumer`` (Celery's ``worker_consumer``) tells ``WORKER`` when its
  connection is lost or cannot be made, and ``BrokerBack``, a consumer step that
  runs each time the consumer has connected and set up its queues, says it is
  back and asks a worker to send the dispatches owed (``fulfilment.owed``).
- ``Scheduler`` (Celery's ``beat_scheduler``) tells ``BEAT`` when a scheduled
  task cannot be sent for want of a broker, instead of Celery's traceback.
- ``BrokerNoiseFilter``, on the log handler, turns Celery's and kombu's lines
  that repeat the same news into DEBUG (kept, tracebacks included, where DEBUG
  is shown). ``NOISE`` lists them, each with its reason. A line is noise only
  for the reason given there: "Couldn't ack" whose cause is not a lost
  connection, a task failing for any other reason, stay as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import redis
from celery import bootsteps
from celery.app.trace import LOG_FAILURE
from celery.beat import PersistentScheduler, SchedulingError
from celery.worker.consumer import consumer as celery_consumer
from kombu.exceptions import OperationalError

from fulfilment.outage import BrokerOutage
from tasks.app import app
from tasks.badmessages import Consumer as BadMessagesConsumer

#: Redis or broker blips: a task that meets one is retried with backoff by Celery itself
#: (nothing was recorded).
INFRA_ERRORS = (redis.RedisError, ConnectionError, OperationalError)

log = logging.getLogger(__name__)

#: This process's worker consumer, and its beat (``celery beat``, or ``worker -B``).
WORKER = BrokerOutage("worker")
BEAT = BrokerOutage("beat")

# Celery's message templates (its type stubs do not list them).
_CELERY: Any = celery_consumer
CONNECTION_RETRY: str = _CELERY.CONNECTION_RETRY
CONNECTION_ERROR: str = _CELERY.CONNECTION_ERROR
TERMINATING_TASK: str = _CELERY.TERMINATING_TASK_ON_RESTART_AFTER_A_CONNECTION_LOSS
_Blueprint: Any = _CELERY.Consumer.Blueprint


def broker_errors() -> tuple[type[BaseException], ...]:
    """What a lost or unreachable broker raises, on the configured transport."""
    connection = app.connection_for_write()
    try:
        return (OperationalError, ConnectionError, *connection.connection_errors,
                *connection.recoverable_connection_errors)
    finally:
        connection.release()


def caused_by_broker(exc: object) -> bool:
    """True if ``exc``, or the error it was raised from, is a lost or unreachable broker."""
    errors = broker_errors()
    while isinstance(exc, BaseException):
        if isinstance(exc, errors):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class Consumer(BadMessagesConsumer):
    """The worker's consumer, telling ``WORKER`` when its broker goes and comes back."""

    class Blueprint(_Blueprint):  # type: ignore[misc]  # untyped in the stubs
        default_steps: ClassVar[list[str]] = [*_Blueprint.default_steps,
                                              f"{__name__}:BrokerBack"]

    def on_connection_error_before_connected(self, exc: Exception) -> None:
        WORKER.lost(exc, what="no task is taken until it is back")
        super().on_connection_error_before_connected(exc)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        WORKER.lost(exc, what="tasks under way go on; their messages come again once it is back")
        super().on_connection_error_after_connected(exc)


class BrokerBack(bootsteps.StartStopStep):
    """Runs each time the consumer has connected and consumes again: the outage is over."""

    requires = ("celery.worker.consumer.tasks:Tasks", "celery.worker.consumer.control:Control")

    def start(self, c: Any) -> None:
        WORKER.restored()
        send_owed_dispatches()


def send_owed_dispatches() -> None:
    """Ask a worker to send again the purchases whose dispatch failed (one small task)."""
    from tasks.maintenance import dispatch_owed

    try:
        dispatch_owed.apply_async(retry=False)
    except broker_errors() as exc:  # gone again: the next connection, or the sweep, asks
        log.debug("could not ask for the owed dispatches: %r", exc)


class Scheduler(PersistentScheduler):
    """celery beat's scheduler: a task not sent for want of a broker is one warning, not a
    traceback a second. Beat skips it, as Celery does; the next tick sends it."""

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True,
                    **kwargs: Any) -> Any:
        try:
            result = super().apply_async(entry, producer, advance, **kwargs)
        except SchedulingError as exc:
            if not caused_by_broker(exc):
                raise
            BEAT.lost(exc.__context__ or exc, what="scheduled runs are skipped until it is back")
            return None
        BEAT.restored()
        return result


def _message(record: logging.LogRecord) -> str:
    return record.msg if isinstance(record.msg, str) else ""


def _arg(record: logging.LogRecord, index: int) -> Any:
    try:
        return record.args[index] if isinstance(record.args, tuple) else None
    except IndexError:
        return None


def _exception(record: logging.LogRecord) -> BaseException | None:
    return record.exc_info[1] if record.exc_info else None


def _our_task_failed_on_broker(record: logging.LogRecord) -> bool:
    data = getattr(record, "data", None)
    return (_message(record) == LOG_FAILURE.strip() and isinstance(data, dict)
            and str(data.get("name", "")).startswith("fulfilment.")
            and caused_by_broker(_exception(record)))


#: Celery's lines that say again what ``BrokerOutage`` said: (logger, test, why).
NOISE: list[tuple[str, Callable[[logging.LogRecord], bool], str]] = [
    ("celery.worker.consumer.consumer",
     lambda r: _arg(r, 0) == CONNECTION_RETRY,
     "the loss itself: the outage's warning says it"),
    ("celery.worker.consumer.consumer",
     lambda r: _message(r) == CONNECTION_ERROR,
     "one ERROR per reconnect attempt while the broker is away"),
    ("celery.worker.consumer.consumer",
     lambda r: _message(r) == TERMINATING_TASK,
     "per task under way; its message is delivered again, the ledger makes that a no-op"),
    ("celery.worker.consumer.consumer",
     lambda r: _message(r).startswith("Failed to cancel active request"),
     "threads pool: kill_job is not implemented, the task runs to its end (a traceback each)"),
    ("celery.worker.consumer.consumer",
     lambda r: _message(r).startswith(("Skipping prefetch count reduction",
                                       "Temporarily reducing the prefetch count")),
     "said on every connection loss"),
    ("celery.worker.request",
     lambda r: _message(r).startswith(("Couldn't ack", "Couldn't reject"))
     and caused_by_broker(_arg(r, -1)),
     "an ack on the lost connection (CRITICAL, with a traceback): the broker delivers the "
     "message again"),
    ("celery.app.amqp",
     lambda r: _message(r).startswith(("Retrying refused callback publish",
                                       "Giving up refused callback publish"))
     and caused_by_broker(_arg(r, -1)),
     "the chain's next task could not be sent: the dispatch is owed (fulfilment.owed)"),
    ("celery.app.trace", _our_task_failed_on_broker,
     "one of our tasks could not send its next message: the dispatch is owed, or the "
     "message comes again"),
    ("celery.bootsteps",
     lambda r: WORKER.active and _message(r) == "Error on %s %s: %r"
     and _arg(r, 0) == "restarting" and isinstance(_arg(r, -1), AttributeError),
     "Celery 5.7 drops the lost connection before restarting its steps; a step that "
     "cancels its consumers on it (gossip) meets None: nothing is left undone"),
    ("celery.beat",
     lambda r: _message(r).startswith("beat: Connection error"),
     "beat's reconnect attempts"),
    # Said on every (re)connection; after an outage the "restored" line says it instead.
    ("celery.worker.consumer.connection",
     lambda r: WORKER.active and _message(r).startswith("Connected to"),
     "replaced by the outage's end line"),
    ("celery.worker.consumer.tasks",
     lambda r: WORKER.active and _message(r).startswith("Global QoS is disabled"),
     "said again on every reconnection"),
    ("kombu.transport.virtual.base",
     lambda r: WORKER.active and _message(r).startswith("Restoring"),
     "Redis broker: the messages held, put back on the lost connection's close"),
    ("celery.worker.consumer.mingle",
     lambda r: WORKER.active and _message(r).startswith("mingle: "),
     "said again on every reconnection"),
]


class BrokerNoiseFilter(logging.Filter):
    """Demotes to DEBUG the lines ``NOISE`` names (kept where DEBUG is shown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, test, _why in NOISE:
            if record.name == name and record.levelno > logging.DEBUG and test(record):
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True
