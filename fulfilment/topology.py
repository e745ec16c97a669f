"""The messaging topology, declared once: exchanges, queues and routing keys.

Results go to a durable topic exchange with routing key ``result.confirmed`` or
``result.failed``; the results queue takes both (``result.#``), and a consumer
that only wants failures binds its own queue to ``result.failed``. Messages
that could not be taken in at all (invalid payloads found on a queue) go to the
failures queue with their reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from kombu import Exchange, Queue

from fulfilment.keys import Keys

CONFIRMED_KEY = "result.confirmed"
FAILED_KEY = "result.failed"
FAILURE_KEY = "failure"


@dataclass(frozen=True)
class Topology:
    results_exchange: Exchange
    results_queue: Queue
    failures_exchange: Exchange
    failures_queue: Queue
    task_queue: Queue
    continue_queue: Queue
    maintenance_queue: Queue

    @classmethod
    def for_keys(cls, keys: Keys) -> Topology:
        results = Exchange(keys.results_exchange, type="topic", durable=True)
        failures = Exchange(keys.failures_queue, type="direct", durable=True)
        return cls(
            results_exchange=results,
            results_queue=Queue(keys.results_queue, results, routing_key="result.#", durable=True),
            failures_exchange=failures,
            failures_queue=Queue(keys.failures_queue, failures, routing_key=FAILURE_KEY,
                                 durable=True),
            task_queue=Queue(keys.task_queue, Exchange(keys.task_queue, type="direct"),
                             routing_key=keys.task_queue, durable=True),
            continue_queue=Queue(keys.continue_queue, Exchange(keys.continue_queue, type="direct"),
                                 routing_key=keys.continue_queue, durable=True),
            maintenance_queue=Queue(keys.maintenance_queue,
                                    Exchange(keys.maintenance_queue, type="direct"),
                                    routing_key=keys.maintenance_queue, durable=True),
        )


def routing_key_for(status: str) -> str:
    return CONFIRMED_KEY if status == "confirmed" else FAILED_KEY
