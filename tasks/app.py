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

import math
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_process_init

from fulfilment.config import Settings
from fulfilment.keys import Keys
from fulfilment.logcontext import configure_logging
from fulfilment.redis_transport import ssl_for, transport_for
from fulfilment.topology import Topology, control_names, is_amqp
from fulfilment.wiring import transport_options
from tasks.startup import settings_at_import


def celery_config(settings: Settings) -> dict[str, Any]:
    keys = Keys(settings.key_prefix)
    topology = Topology.for_keys(keys, settings.effective_broker_url)
    return {
        "broker_url": settings.effective_broker_url,
        # kombu's Redis transport, minus a crash on Redis restarts (see the module).
        "broker_transport": transport_for(settings.effective_broker_url),
        "broker_use_ssl": ssl_for(settings.effective_broker_url),  # rediss://: verified TLS
        "broker_transport_options": transport_options(settings),
        "broker_connection_retry_on_startup": True,
        **rabbitmq_config(settings),
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
        # intents cannot hold an open basket back until it expires; live intents
        # one, served before bulk ones. A worker without -Q serves them in this
        # order (on Redis, strictly: queue_order_strategy, fulfilment.wiring).
        "task_queues": list(topology.consumed),
        "task_default_queue": keys.task_queue,
        "task_default_exchange": keys.task_queue,
        "task_default_routing_key": keys.task_queue,
        "task_routes": {
            **{pattern: {"queue": keys.maintenance_queue,
                         "routing_key": keys.maintenance_queue}
               for pattern in ("fulfilment.maintenance.*", "fulfilment.webhooks.*")},
            **{f"fulfilment.{name}": {"queue": keys.continue_queue,
                                      "routing_key": keys.continue_queue}
               for name in ("pre_confirm", "confirm", "publish", "refund")},
        },
        "beat_schedule": {
            "recovery-sweep": {"task": "fulfilment.maintenance.sweep",
                               "schedule": settings.sweep_interval},
            "intake-drain": {"task": "fulfilment.maintenance.drain_intake",
                             "schedule": settings.intake_interval},
            "bulk-release": {"task": "fulfilment.maintenance.release_bulk",
                             "schedule": settings.release_interval},
            "hold-expiry": {"task": "fulfilment.maintenance.expire_holds",
                            "schedule": settings.release_interval},
            # Unsettled intents' next reads are due on their own schedule
            # (FULFILMENT_SETTLE_FIRST, doubling): this only looks for due ones.
            "unsettled-settle": {"task": "fulfilment.maintenance.settle_unsettled",
                                 "schedule": settings.sweep_interval},
            **callback_schedule(settings),
        },
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        # A message the worker cannot run goes to the failures queue (tasks.badmessages);
        # a broker outage is one warning and one line, in the worker and beat (tasks.brokerwatch).
        "worker_consumer": "tasks.brokerwatch:Consumer",
        "beat_scheduler": "tasks.brokerwatch:Scheduler",
    }


def callback_schedule(settings: Settings) -> dict[str, Any]:
    """The callback sender's runs, when a callback URL is set; a run not started within
    its interval (the workers were busy) expires rather than piling up behind them."""
    if not settings.callback_routes:
        return {}
    return {"callbacks": {"task": "fulfilment.maintenance.deliver_callbacks",
                          "schedule": settings.callback_interval,
                          "options": {"expires": max(settings.callback_interval, 1.0) * 5}}}


def rabbitmq_config(settings: Settings) -> dict[str, Any]:
    """RabbitMQ only (nothing on Redis): quorum queues, and control and events per deployment.

    The task queues are quorum queues (``fulfilment.topology``); a queue Celery
    creates on the fly is one too. Workers see them and use per-consumer
    prefetch (quorum queues have no global QoS), and set up Celery's native
    delayed delivery, so a retry's countdown waits in the broker, not in a
    worker's memory. Celery's control and event exchanges carry the prefix,
    so ``celery inspect`` reaches this deployment's workers only, even on a
    vhost shared with another (a vhost per deployment isolates everything).
    """
    if not is_amqp(settings.effective_broker_url):
        # Celery's own defaults, spelled out so that reconfiguring a process
        # from RabbitMQ back to Redis (the tests do) leaves nothing behind.
        return {"task_default_queue_type": "classic", "task_default_exchange_type": "direct",
                "control_exchange": "celery", "event_exchange": "celeryev",
                "event_queue_prefix": "celeryev"}
    return {
        "task_default_queue_type": "quorum",
        "task_default_exchange_type": "topic",
        "worker_detect_quorum_queues": True,
        "broker_native_delayed_delivery_queue_type": "quorum",
        **control_names(settings.key_prefix),
    }


class FulfilmentCelery(Celery):
    """Celery, with countdowns RabbitMQ's native delayed delivery can take.

    On quorum queues Celery 5.7 sends a countdown through its delay
    exchanges as ``int(countdown)`` whole seconds, and refuses one under a
    second ("countdown must be a positive number": the retry is lost). A
    countdown there is rounded up to whole seconds: never sooner than asked.
    """

    def send_task(self, *args: Any, **options: Any) -> Any:
        countdown = options.get("countdown")
        if countdown and countdown > 0 and is_amqp(str(self.conf.broker_url or "")):
            options["countdown"] = math.ceil(countdown)
        return super().send_task(*args, **options)


def configure(settings: Settings) -> None:
    """(Re)configure the app, e.g. for the embedded demo's in-memory broker."""
    from tasks import runtime

    app.close()  # drop pooled broker connections made under the old settings
    app.conf.update(celery_config(settings))
    # Celery caches queues and the default exchange on first use; start afresh.
    app.__dict__.pop("amqp", None)
    runtime.reset(settings)


app = FulfilmentCelery("fulfilment",
                       include=["tasks.purchase", "tasks.maintenance", "tasks.metrics",
                                "tasks.stops", "tasks.refunds",
                                "tasks.webhooks"])
# A bad setting stops `celery` here with one line (exit 78); elsewhere (the
# `fulfilment` CLI, a producer) it is raised when the app's configuration is read.
_import_settings = settings_at_import()
if _import_settings is not None:
    app.conf.update(celery_config(_import_settings))
else:
    app.add_defaults(lambda: celery_config(Settings.from_env()))


@setup_logging.connect
def _setup_logging(loglevel: str | int | None = None, **_: Any) -> None:
    # Our format carries reference, order id, step and attempt; Celery keeps its hands off.
    # Celery's own task lines get the intent's reference too (tasks.logsignals); a
    # broker outage's repeated lines are DEBUG (tasks.brokerwatch).
    from tasks.brokerwatch import BrokerNoiseFilter
    from tasks.logsignals import TaskContextFilter

    configure_logging(loglevel or "INFO", filters=[TaskContextFilter(), BrokerNoiseFilter()])


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked pool process must not share the parent's sockets.
    from tasks import runtime

    runtime.reset()


@worker_init.connect
def _traces(**_: Any) -> None:
    # Before the pool starts: OpenTelemetry's span processor restarts its export
    # thread in each forked pool process by itself.
    from tasks import tracing

    tracing.setup(Settings.from_env(), "fulfilment-worker")
