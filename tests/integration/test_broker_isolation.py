"""Two deployments on one RabbitMQ vhost do not see each other's workers.

An operator's ``celery inspect ping`` goes through Celery's control exchange,
which by default is ``celery.pidbox`` whatever the queues are called: with
RabbitMQ as the broker, one deployment's ping was answered by another's
workers. The control and event exchanges now carry the deployment's prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from fulfilment.harness.cluster import Cluster
from fulfilment.harness.processes import Child, wait_for
from tests import services
from tests.deployment import deployment

pytestmark = pytest.mark.integration


@pytest.fixture
def two_deployments(redis_url: str, tmp_path: Path) -> Iterator[tuple[Cluster, Cluster]]:
    """Two deployments, prefixes of their own, sharing one RabbitMQ vhost."""
    with services.rabbitmq_vhost() as broker_url, ExitStack() as stack:
        clusters = []
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            clusters.append(stack.enter_context(deployment(
                directory, redis_url, services.unique_prefix(f"iso{name}"),
                broker_url=broker_url)))
        yield clusters[0], clusters[1]
        stack.close()
        for cluster in clusters:  # their keys: the run's prefixes, not the `prefix` fixture's
            _remove_keys(redis_url, cluster.settings.key_prefix)


def _remove_keys(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def test_inspect_ping_sees_only_its_own_deployments_workers(
        two_deployments: tuple[Cluster, Cluster]) -> None:
    a, b = two_deployments
    # Given a worker in each deployment, both on the same vhost, both ready
    workers = [a.start_worker(concurrency=1), b.start_worker(concurrency=1)]
    for worker in workers:
        def ready(w: Child = worker) -> bool:
            return " ready." in w.output()

        wait_for(ready, timeout=60, what=f"{worker.log_path} to be ready")
    # When each deployment's operator runs `celery inspect ping`
    seen_by_a = a.inspect_ping(timeout=1.5)
    seen_by_b = b.inspect_ping(timeout=1.5)
    # Then each sees its own worker, and only that one
    assert {name.split("@")[0] for name in seen_by_a} == {f"w0-{a.settings.key_prefix}"}
    assert {name.split("@")[0] for name in seen_by_b} == {f"w0-{b.settings.key_prefix}"}
