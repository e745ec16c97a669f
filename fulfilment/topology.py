"""The messaging topology, declared once: exchanges, queues and routing keys.

Results go to a durable topic exchange with routing key ``result.<status>``:
``result.confirmed``, ``result.failed``, ``result.unsettled``, ``result.held``,
``result.cancelled`` or ``result.expired``. The results
queue takes them all (``result.#``). A shop binds a queue of its own to the
routes it acts on: ``result.failed`` for purchases that bought nothing (an
``unsettled`` one may have been bought, so it never goes there),
``result.unsettled`` to say "pending" or alert someone, ``result.held`` for
holds to confirm, and ``result.confirmed``, ``result.failed``,
``result.cancelled`` and ``result.expired`` for final outcomes only (an
unsettled or held intent's final one follows on them, with the same
``result_id``). Messages that could not be
taken in at all (invalid payloads found on a queue) go to the failures queue
with their reason. After-sale events (``schemas.aftersale``: refunds and
cancellations Onebox told us of by webhook) go to the same exchange as
``aftersale.refund`` and ``aftersale.cancel``, and refund outcomes as
``refund.refunded`` and ``refund.failed``, each to a queue of its own
(``aftersale.#``, ``refund.#``), so a results consumer never sees one.

Workers serve their queues in the order of ``Topology.consumed``: purchases
under way (``continue``), then new live intents, then periodic work, then new
bulk intents. On Redis kombu's ``queue_order_strategy='priority'`` makes each
BRPOP name them in that order, so a worker takes a bulk message only when
the others are empty. RabbitMQ has no order between queues (and quorum queues
no priorities): there the bulk queue is kept shallow by flow control
(``fulfilment.release``), so a live intent waits behind at most the few bulk
messages released, never behind a whole file.

On RabbitMQ (an ``amqp://`` broker) every queue of ours is a durable *quorum*
queue (replicated, fsynced before the publisher's confirm) and the task queues
hang off durable topic exchanges: Celery's native delayed delivery, which a
retry's countdown needs on quorum queues, forwards a delayed message through
an exchange-to-exchange binding and cannot use a direct exchange. On Redis
the topology is what it always was (direct exchanges, kombu's plain lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kombu import Exchange, Queue

from fulfilment.keys import Keys

RESULT_KEY_PREFIX = "result."
CONFIRMED_KEY = f"{RESULT_KEY_PREFIX}confirmed"
FAILED_KEY = f"{RESULT_KEY_PREFIX}failed"
UNSETTLED_KEY = f"{RESULT_KEY_PREFIX}unsettled"
#: The after-sale queue's binding: ``aftersale.refund`` and ``aftersale.cancel``.
AFTERSALE_PATTERN = "aftersale.#"
FAILURE_KEY = "failure"
#: Refund outcomes: ``refund.refunded`` and ``refund.failed``, on the results exchange.
REFUND_KEY_PREFIX = "refund."
#: The queue type of every queue of ours on RabbitMQ (``x-queue-type``).
QUORUM = {"x-queue-type": "quorum"}


def is_amqp(broker_url: str) -> bool:
    """Is this broker RabbitMQ (AMQP 0-9-1), where quorum queues and confirms apply?"""
    return broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))


@dataclass(frozen=True)
class Topology:
    results_exchange: Exchange
    results_queue: Queue
    #: After-sale events for the shop, on the results exchange (``aftersale.#``).
    aftersale_queue: Queue
    failures_exchange: Exchange
    failures_queue: Queue
    task_queue: Queue
    continue_queue: Queue
    live_queue: Queue
    maintenance_queue: Queue
    #: Plain JSON intents from any AMQP client, taken in by the drain (``fulfilment.intake``).
    intake_queue: Queue
    #: Refund outcomes (``refund.#`` on the results exchange): apart from purchase results,
    #: whose consumers read every message there as an order result.
    refunds_queue: Queue

    @classmethod
    def for_keys(cls, keys: Keys, broker_url: str = "") -> Topology:
        """The deployment's topology; ``broker_url`` says whether it is RabbitMQ's."""
        amqp = is_amqp(broker_url)
        arguments: dict[str, Any] | None = dict(QUORUM) if amqp else None
        task_exchange_type = "topic" if amqp else "direct"

        def task_queue(name: str) -> Queue:
            exchange = Exchange(name, type=task_exchange_type, durable=True)
            return Queue(name, exchange, routing_key=name, durable=True,
                         queue_arguments=arguments)

        results = Exchange(keys.results_exchange, type="topic", durable=True)
        failures = Exchange(keys.failures_queue, type="direct", durable=True)
        return cls(
            results_exchange=results,
            results_queue=Queue(keys.results_queue, results, routing_key="result.#",
                                durable=True, queue_arguments=arguments),
            aftersale_queue=Queue(keys.aftersale_queue, results, routing_key=AFTERSALE_PATTERN,
                                  durable=True, queue_arguments=arguments),
            failures_exchange=failures,
            failures_queue=Queue(keys.failures_queue, failures, routing_key=FAILURE_KEY,
                                 durable=True, queue_arguments=arguments),
            task_queue=task_queue(keys.task_queue),
            continue_queue=task_queue(keys.continue_queue),
            live_queue=task_queue(keys.live_queue),
            maintenance_queue=task_queue(keys.maintenance_queue),
            intake_queue=Queue(keys.intake_queue, Exchange(keys.intake_queue, type="direct",
                                                           durable=True),
                               routing_key=keys.intake_queue, durable=True,
                               queue_arguments=arguments),
            refunds_queue=Queue(keys.refunds_queue, results, routing_key=f"{REFUND_KEY_PREFIX}#",
                                durable=True, queue_arguments=arguments),
        )

    @property
    def queues(self) -> tuple[Queue, ...]:
        """Every queue of the deployment (what an operator or a test cleans up)."""
        return (self.task_queue, self.continue_queue, self.live_queue, self.maintenance_queue,
                self.results_queue, self.failures_queue, self.intake_queue, self.refunds_queue,
                self.aftersale_queue)

    @property
    def consumed(self) -> tuple[Queue, ...]:
        """The queues a worker takes tasks from, in the order it serves them: purchases
        under way, then live intents, then periodic work, then bulk."""
        return (self.continue_queue, self.live_queue, self.maintenance_queue, self.task_queue)


def routing_key_for(status: str) -> str:
    """``result.<status>``: a consumer binds to exactly the outcomes it wants."""
    return f"{RESULT_KEY_PREFIX}{status}"


def refund_routing_key(status: str) -> str:
    """``refund.refunded`` or ``refund.failed``."""
    return f"{REFUND_KEY_PREFIX}{status}"


def control_names(prefix: str) -> dict[str, str]:
    """Celery's control and event names under the deployment's prefix (RabbitMQ).

    Celery's remote control (``celery inspect``, ``control``) and its events
    use exchanges named ``celery.pidbox``, ``reply.celery.pidbox`` and
    ``celeryev`` whatever the task queues are called, so two deployments on one
    vhost would answer each other's ``inspect ping``. Under the prefix they
    are ``<prefix>.control.pidbox``, ``reply.<prefix>.control.pidbox`` (each
    worker's pidbox queue ``<worker>.<prefix>.control.pidbox``) and
    ``<prefix>.events``, queues ``<prefix>.events.*``.
    """
    return {"control_exchange": f"{prefix}.control", "event_exchange": f"{prefix}.events",
            "event_queue_prefix": f"{prefix}.events"}
