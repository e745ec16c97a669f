"""What each broker is configured with: RabbitMQ's additions, and Redis left as it was."""

from __future__ import annotations

import ssl
from unittest import mock

import pytest

from fulfilment.config import Settings
from fulfilment.keys import Keys
from fulfilment.redis_transport import TRANSPORT
from fulfilment.topology import Topology
from fulfilment.wiring import broker_connection, transport_options
from tasks.app import FulfilmentCelery, celery_config

AMQP = "amqp://guest:guest@127.0.0.1:5672/shop-a"
REDIS = "redis://127.0.0.1:6379/0"


def settings(broker_url: str) -> Settings:
    return Settings.defaults().with_overrides(broker_url=broker_url, key_prefix="shop-a")


def test_on_rabbitmq_every_queue_is_a_durable_quorum_queue_on_a_durable_exchange() -> None:
    topology = Topology.for_keys(Keys("shop-a"), AMQP)
    for queue in topology.queues:
        assert queue.queue_arguments == {"x-queue-type": "quorum"}, queue.name
        assert queue.durable and queue.exchange.durable, queue.name
    # Native delayed delivery forwards through exchange bindings: no direct exchanges
    for queue in (topology.task_queue, topology.continue_queue, topology.maintenance_queue):
        assert queue.exchange.type == "topic", queue.name


def test_on_rabbitmq_publishes_are_confirmed_and_control_and_events_carry_the_prefix() -> None:
    config = celery_config(settings(AMQP))
    assert config["broker_transport_options"] == {"confirm_publish": True}
    assert config["task_default_queue_type"] == "quorum"
    assert config["worker_detect_quorum_queues"] is True
    assert config["control_exchange"] == "shop-a.control"
    assert config["event_exchange"] == "shop-a.events"
    assert config["event_queue_prefix"] == "shop-a.events"
    assert all(q.queue_arguments == {"x-queue-type": "quorum"} for q in config["task_queues"])


def test_on_redis_the_topology_and_options_are_as_before() -> None:
    topology = Topology.for_keys(Keys("shop-a"), REDIS)
    assert all(q.queue_arguments is None for q in topology.queues)
    assert topology.task_queue.exchange.type == "direct"
    options = transport_options(settings(REDIS))
    assert options["global_keyprefix"] == "shop-a:broker:"
    assert "confirm_publish" not in options
    config = celery_config(settings(REDIS))
    # Celery's own defaults: control and events as they always were on Redis
    assert (config["task_default_queue_type"], config["control_exchange"],
            config["event_exchange"]) == ("classic", "celery", "celeryev")


@pytest.mark.parametrize(("broker", "asked", "sent"), [
    (AMQP, 0.05, 1), (AMQP, 1.2, 2), (AMQP, 3, 3), (REDIS, 0.05, 0.05)])
def test_a_countdown_on_rabbitmq_is_whole_seconds_never_sooner(broker: str, asked: float,
                                                                sent: float) -> None:
    app = FulfilmentCelery("t", set_as_current=False)
    app.conf.update(broker_url=broker)
    with mock.patch("celery.Celery.send_task") as send_task:  # what the subclass calls
        app.send_task("fulfilment.basket", ["shop-1"], countdown=asked)
    assert send_task.call_args.kwargs["countdown"] == sent


@pytest.mark.parametrize(("url", "ours", "tls"), [
    (REDIS, True, False),
    ("rediss://default:pw@cache.example:6380/0", True, True),
    (AMQP, False, False),
])
def test_a_redis_broker_gets_our_transport_and_rediss_gets_verified_tls(
        url: str, ours: bool, tls: bool) -> None:
    """Naming our transport hides the scheme from kombu, which then no longer turns TLS
    on by itself: rediss:// must ask for it (verified), or it would speak plain TCP."""
    config = celery_config(settings(url))
    connection = broker_connection(settings(url))  # lazy: nothing is connected
    assert (config["broker_transport"] == TRANSPORT) is ours
    assert (connection.transport_cls == TRANSPORT) is ours
    wanted = {"ssl_cert_reqs": ssl.CERT_REQUIRED} if tls else False
    assert config["broker_use_ssl"] == wanted
    assert connection.ssl == wanted
