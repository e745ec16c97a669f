"""The Celery app, configured from the one settings object.

Reliability choices, each for a reason:
- JSON only: a message is readable by any language and can carry no code.
- Late acknowledgement, and rejection when the worker process dies: a message
  is acknowledged only once its work is recorded in the ledger.
- Prefetch of one: a worker holds no more messages than it is working on.
- A visibility timeout above the longest retry countdown: a retry waiting
  out its countdown is not redelivered to a second worker meanwhile.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_process_init

from fulfilment.config import Settings
from fulfilment.keys import Keys
from fulfilment.logcontext import configure_logging
from fulfilment.redis_transport import transport_for
from fulfilment.topology import Topology
from fulfilment.wiring import transport_options


def celery_config(settings: Settings) -> dict[str, Any]:
    keys = Keys(settings.key_prefix)
    topology = Topology.for_keys(keys)
    return {
        "broker_url": settings.effective_broker_url,
        # kombu's Redis transport, minus a crash on Redis restarts (see the module).
        "broker_transport": transport_for(settings.effective_broker_url),
        "broker_transport_options": transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        # Purchases under way have a queue of their own, so a backlog of new
        # intents cannot hold an open basket back until it expires.
        "task_queues": [topology.continue_queue, topology.task_queue, topology.maintenance_queue],
        "task_default_queue": keys.task_queue,
        "task_default_exchange": keys.task_queue,
        "task_default_routing_key": keys.task_queue,
        "task_routes": {
            "fulfilment.maintenance.*": {"queue": keys.maintenance_queue,
                                         "routing_key": keys.maintenance_queue},
            **{f"fulfilment.{name}": {"queue": keys.continue_queue,
                                      "routing_key": keys.continue_queue}
               for name in ("pre_confirm", "confirm", "publish")},
        },
        "beat_schedule": {
            "recovery-sweep": {"task": "fulfilment.maintenance.sweep",
                               "schedule": settings.sweep_interval},
            "intake-drain": {"task": "fulfilment.maintenance.drain_intake",
                             "schedule": settings.intake_interval},
        },
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


def configure(settings: Settings) -> None:
    """(Re)configure the app, e.g. for the embedded demo's in-memory broker."""
    from tasks import runtime

    app.close()  # drop pooled broker connections made under the old settings
    app.conf.update(celery_config(settings))
    # Celery caches queues and the default exchange on first use; start afresh.
    app.__dict__.pop("amqp", None)
    runtime.reset(settings)


app = Celery("fulfilment", include=["tasks.purchase", "tasks.maintenance"])
app.conf.update(celery_config(Settings.from_env()))


@setup_logging.connect
def _setup_logging(loglevel: str | int | None = None, **_: Any) -> None:
    # Our format carries reference, order id, step and attempt; Celery keeps its hands off.
    configure_logging(loglevel or "INFO")


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked pool process must not share the parent's sockets.
    from tasks import runtime

    runtime.reset()
