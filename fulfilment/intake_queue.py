"""The RabbitMQ intake: plain JSON intents published by any AMQP client to ``<prefix>.intake``.

A drain consumes the queue a chunk at a time (a prefetch of one chunk), has
the chunk taken in (``fulfilment.intake``: admitted, refusals published) and
only then acknowledges it, with one ``basic.ack`` for all. A drainer that
dies holds its chunk unacknowledged: RabbitMQ gives it to another consumer,
and an intent admitted before is then a duplicate, never bought twice.
The queue is a durable quorum queue (``fulfilment.topology``), declared here
by every drain, so it exists once a worker with beat has run for a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kombu import Connection, Consumer, Message

from fulfilment.topology import Topology

#: Seconds a chunk waits for more messages once they stop coming.
IDLE_WAIT = 0.05


class QueueIntake:
    """Chunks of the intake queue, each acknowledged once taken in (``done``)."""

    def __init__(self, connection: Connection, topology: Topology, *,
                 idle_wait: float = IDLE_WAIT) -> None:
        self._connection = connection
        self._queue = topology.intake_queue
        self._idle_wait = idle_wait
        self._channel: Any = None  # kombu's stubs omit the AMQP methods
        self._consumer: Consumer | None = None
        self._received: list[Message] = []
        self._held: list[Message] = []

    def backlog(self) -> int:
        """Messages ready on the queue (declaring it, as every drain does)."""
        channel = self._open()
        declared = channel.queue_declare(queue=self._queue.name, passive=True)
        return int(declared.message_count)

    def take(self, count: int) -> Sequence[bytes]:
        """Up to ``count`` messages, raw; none if none came within the idle wait."""
        if self._consumer is None:
            channel = self._open()
            channel.basic_qos(0, count, False)  # per consumer: quorum queues have no global QoS
            self._consumer = Consumer(channel, queues=[self._queue], no_ack=False,
                                      auto_declare=False, on_message=self._received.append)
            self._consumer.consume()
        while len(self._received) < count:
            try:
                self._connection.drain_events(timeout=self._idle_wait)
            except TimeoutError:
                break
        self._held, self._received = self._received[:count], self._received[count:]
        return [message.body if isinstance(message.body, bytes)
                else str(message.body).encode() for message in self._held]

    def done(self) -> None:
        """The chunk taken last is admitted (or refused and reported): acknowledge it."""
        if self._held:
            self._channel.basic_ack(self._held[-1].delivery_tag, multiple=True)
            self._held = []

    def close(self) -> None:
        """Stop consuming; what was delivered and not acknowledged goes back to the queue."""
        if self._consumer is not None:
            self._consumer.cancel()
            self._consumer = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _open(self) -> Any:
        if self._channel is None:
            self._channel = self._connection.channel()
            self._queue.bind(self._channel).declare()
        return self._channel

    def __enter__(self) -> QueueIntake:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
