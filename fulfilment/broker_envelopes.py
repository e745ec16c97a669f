"""Whatever lies on a Redis broker queue of ours, kombu gets a message it can deliver.

kombu's Redis transport keeps each message as a JSON envelope (body,
headers, properties) in a list. Anything else pushed onto that list (``LPUSH
fulfilment.purchase 'hello'``, an envelope without its delivery tag, a body
that is not the base64 it claims) makes kombu 5.7 raise inside the worker's
event loop: the worker stops with "Unrecoverable error" (seen with a real
worker: ``tests/integration/test_bad_broker_messages.py``) and the item,
already popped, is lost.

``SafeEnvelopes`` (mixed into ``fulfilment.redis_transport.Channel``) checks
each item as it is popped. One that is not a deliverable envelope is
delivered as a stand-in: its text as the body, the content type
``UNDECODABLE_TYPE`` (which no consumer accepts) and the reason in the
``UNDECODABLE_HEADER`` header. The Celery worker's consumer
(``tasks.badmessages``) sends it to the failures queue with that reason;
``fulfilment results`` reports it as unreadable. No Celery here: kombu only.
"""

from __future__ import annotations

import uuid
from queue import Empty
from typing import Any

from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

UNDECODABLE_HEADER = "x-fulfilment-undecodable"
UNDECODABLE_TYPE = "application/x-fulfilment-undecodable"


def stand_in(text: str, queue: str, reason: str) -> dict[str, Any]:
    """The envelope a non-message is delivered in: its text, and why it is not one."""
    return {
        "body": text,
        "content-encoding": "utf-8",
        "content-type": UNDECODABLE_TYPE,
        "headers": {UNDECODABLE_HEADER: reason},
        "properties": {"delivery_tag": uuid.uuid4().hex, "body_encoding": None,
                       "delivery_mode": 2, "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": queue}},
    }


class SafeEnvelopes:
    """Mixin for kombu's Redis ``Channel``: the two places it decodes a popped item."""

    # What kombu's virtual Channel provides (for the type checker).
    Message: Any
    connection: Any
    client: Any
    connection_errors: Any
    sep: str
    _queue_cycle: Any
    _in_poll: Any
    priority_steps: Any
    conn_or_acquire: Any
    _q_for_pri: Any
    _maybe_update_queues_expire: Any

    def envelope(self, item: bytes | str, queue: str) -> dict[str, Any]:
        """The popped item as kombu's envelope, or a stand-in that says why it is not one."""
        text = bytes_to_str(item)
        try:
            payload = loads(text)
            self.Message(payload, channel=self)  # what delivering it would build first
        except Exception as exc:  # noqa: BLE001 - any of it would stop the worker
            return stand_in(text, queue, f"not a broker message ({type(exc).__name__})")
        if not isinstance(payload, dict):
            return stand_in(text, queue, "not a broker message (not a JSON object)")
        return payload

    # kombu 5.7's ``Channel._brpop_read``, with ``envelope`` in place of ``loads``.
    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP",
                                                        **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                self.connection._deliver(self.envelope(item, dest), dest)
                return True
            raise Empty()
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    # kombu 5.7's ``Channel._get`` (polling, ``basic_get``), likewise.
    def _get(self, queue: str, timeout: float | None = None) -> Any:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    return self.envelope(item, queue)
            self._maybe_update_queues_expire(client, queue)
            raise Empty()
