"""A small deployment for the end-to-end tests: the ledger on the machine's Redis,
the broker Redis or RabbitMQ.

The sandbox as a process of its own, settings that point the workers at it,
at the broker and at this test's key prefix, and this test process as the
producer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fulfilment.config import Settings
from fulfilment.harness.cluster import Cluster
from fulfilment.harness.processes import SandboxProcess, free_port
from tasks import app as celery_app
from tasks.app import configure

#: The brokers every end-to-end test runs on (the ledger is Redis either way).
BROKERS = ("redis", "rabbitmq")


@contextmanager
def deployment(tmp_path: Path, redis_url: str, prefix: str, *sandbox_args: str,
               broker_url: str | None = None, **overrides: Any) -> Iterator[Cluster]:
    """A ``Cluster`` with short retries; ``broker_url`` (default: the Redis) and
    ``overrides`` change any setting."""
    sandbox = SandboxProcess(tmp_path / "sandbox.log", *sandbox_args)
    settings = Settings.defaults().with_overrides(**{
        "onebox_api_url": sandbox.url, "redis_url": redis_url,
        "broker_url": broker_url or redis_url,
        "key_prefix": prefix, "retry_base_delay": 0.05, "retry_max_delay": 0.5,
        # The machine's Redis keeps nothing on disk; durability has tests of its own.
        "require_durable_redis": False,
        # A metrics port of the test's own, not the default 9650: tests running side by
        # side (pytest -n) never compete for one port and its multiprocess directory.
        "metrics_port": free_port(), **overrides})
    configure(settings)  # this process is the producer
    running = Cluster(settings, sandbox, tmp_path)
    try:
        yield running
    finally:
        running.stop()
        celery_app.close()
        running.remove_broker_objects()
