"""Bad messages on our task queues go to the failures queue, and the worker goes on.

What Celery 5.7's consumer does by default (``celery.worker.consumer.consumer``)
with a message it cannot run, and what this consumer does instead:

- body that cannot be decoded (not JSON, a content type other than JSON):
  ``on_decode_error`` logs it at CRITICAL *with the body* and acknowledges
  it: gone, and its payload (maybe personal data) in the log;
- a message without a task name (``on_unknown_message``), a task name no
  worker has (``on_unknown_task``), an invalid ETA (``on_invalid_task``): a log
  line with the body, then ``reject``, which on Redis drops it;
- a known task whose body is not ``[args, kwargs, embed]``, or whose headers
  lack an ``id``: the request cannot be built, the exception escapes the
  consumer and the worker stops ("Unrecoverable error"); a supervisor starts
  it again, and the message, restored, stops it again (a poison message);
- an item on the broker's Redis list that is not a message at all: the same
  crash, inside kombu (``fulfilment.broker_envelopes`` delivers a stand-in).

Here each goes to the failures queue with its reason and its body (cut to a
bound by ``ResultPublisher.publish_failure``), is acknowledged, and is logged
with the reason only. Should the failures queue itself be unreachable (the
publish retries for a while first), the message is dropped as Celery would,
with an error line. Configured by ``worker_consumer`` in ``tasks.app``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from celery.worker.consumer.consumer import Consumer as CeleryConsumer
from vine import promise as vine_promise

from fulfilment.broker_envelopes import UNDECODABLE_HEADER
from tasks import runtime

log = logging.getLogger(__name__)

#: What building a request from a malformed message raises inside Celery.
MALFORMED = (ValueError, TypeError, KeyError, AttributeError, IndexError)


class Consumer(CeleryConsumer):
    """Celery's consumer, routing every message it cannot run to the failures queue."""

    def create_task_handler(self, promise: Any = vine_promise) -> Callable[[Any], Any]:
        handler = super().create_task_handler(promise)
        tasks = self.app.tasks

        def on_task_received(message: Any) -> Any:
            refusal = refusal_of(message, tasks)
            if refusal is not None:
                return self.to_failures(message, *refusal)
            try:
                return handler(message)
            except MALFORMED as exc:
                # A shape check above missed: still never a reason to stop the worker.
                return self.to_failures(message, f"task message cannot be run: "
                                                 f"{type(exc).__name__}", {})

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        reason = _header(message, UNDECODABLE_HEADER) or \
            f"task message body cannot be decoded ({type(exc).__name__})"
        self.to_failures(message, reason, {})

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.to_failures(message, "not a task message (no task name)", {})

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = _header(message, "task") or "?"
        self.to_failures(message, f"unknown task {name[:100]!r}",
                         {"task": ["No worker of this deployment runs this task."]})

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self.to_failures(message, f"invalid task message ({type(exc).__name__})", {})

    def to_failures(self, message: Any, reason: str, errors: Mapping[str, Any]) -> None:
        """Publish the message to the failures queue with its reason, then acknowledge it."""
        queue = (message.delivery_info or {}).get("routing_key", "?")
        try:
            runtime.services().publisher.publish_failure(reason, dict(errors),
                                                         _body_text(message))
        except Exception as exc:  # noqa: BLE001 - the consumer must go on whatever happens
            log.error("bad message on %s dropped (%s); the failures queue is unreachable: %s",
                      queue, reason, type(exc).__name__)
        else:
            log.info("bad message on %s sent to the failures queue: %s", queue, reason)
        if not message.acknowledged:
            message.ack_log_error(log, getattr(self, "connection_errors", ()))


def refusal_of(message: Any, tasks: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Why a task message cannot be run, or None to let Celery take it (and its hooks).

    Celery 5.7 builds the request from the headers and the decoded body in
    the consumer itself; what it does not check there stops the worker.
    """
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return None  # Celery: on_unknown_message or, for protocol 1, its own checks
    name = headers["task"]
    if not isinstance(name, str):
        return "task name is not a string", {"task": ["Not a string."]}
    if name not in tasks:
        return None  # Celery: on_unknown_task
    if not isinstance(headers.get("id"), str):
        return "task message has no id", {"id": ["Missing or not a string."]}
    return _body_refusal(message, name, tasks[name])


def _body_refusal(message: Any, name: str, task: Any) -> tuple[str, dict[str, Any]] | None:
    """The body must decode to ``[args, kwargs, embed]`` that the task's signature takes."""
    try:
        body = message.decode()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the answer
        return f"task message body cannot be decoded ({type(exc).__name__})", {}
    if not (isinstance(body, list | tuple) and len(body) == 3
            and isinstance(body[0], list | tuple) and isinstance(body[1], dict)
            and (body[2] is None or isinstance(body[2], dict))):
        return "task message body is not [args, kwargs, embed]", {}
    try:
        inspect.signature(task.run).bind(*body[0], **body[1])
    except TypeError:
        return f"task {name} does not take these arguments", {"args": ["Wrong arguments."]}
    return None


def _header(message: Any, name: str) -> str | None:
    headers = message.headers
    value = headers.get(name) if isinstance(headers, dict) else None
    return value if isinstance(value, str) else None


def _body_text(message: Any) -> str | None:
    body = message.body
    if body is None:
        return None
    return body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
