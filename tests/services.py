"""Real services for integration tests: skip on a laptop without them, fail in CI.

A skipped integration test in CI would be a silent hole, so under ``CI=true`` a
missing service is an error, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import NoReturn

import pytest
import redis
from kombu import Connection

from fulfilment.harness.processes import free_port, unique_prefix

__all__ = ["free_port", "in_ci", "rabbitmq_vhost", "redis_url", "require", "unavailable",
           "unique_prefix"]

REDIS_HOST = os.environ.get("FULFILMENT_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("FULFILMENT_TEST_REDIS_PORT", "6379"))
#: Tests use their own database of the shared Redis, and a key prefix per run.
REDIS_DB = int(os.environ.get("FULFILMENT_TEST_REDIS_DB", "9"))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(service: str, reachable: bool) -> None:
    if not reachable:
        unavailable(f"{service} is not reachable")


def unavailable(message: str) -> NoReturn:
    """Skip for want of what a test needs of a service; under CI=true, fail instead."""
    if in_ci():
        pytest.fail(f"{message}, and CI=true: integration tests must run, not skip")
    pytest.skip(message)


def redis_url() -> str:
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=1).ping()
        up = True
    except redis.RedisError:
        up = False
    require(f"Redis at {REDIS_HOST}:{REDIS_PORT}", up)
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"




RABBITMQ_HOST = os.environ.get("FULFILMENT_TEST_RABBITMQ_HOST", "127.0.0.1")
RABBITMQ_PORT = int(os.environ.get("FULFILMENT_TEST_RABBITMQ_PORT", "5672"))
RABBITMQ_USER = os.environ.get("FULFILMENT_TEST_RABBITMQ_USER", "guest")
RABBITMQ_PASSWORD = os.environ.get("FULFILMENT_TEST_RABBITMQ_PASSWORD", "guest")


def rabbitmq_url(vhost: str = "/") -> str:
    """An ``amqp://`` URL on the test RabbitMQ; ``/`` (the default vhost) is spelled ``%2F``."""
    path = "%2F" if vhost == "/" else vhost
    return (f"amqp://{RABBITMQ_USER}:{RABBITMQ_PASSWORD}@{RABBITMQ_HOST}:{RABBITMQ_PORT}/"
            f"{path}")


def rabbitmq_reachable(url: str | None = None) -> bool:
    with Connection(url or rabbitmq_url(), connect_timeout=2) as connection:
        try:
            connection.ensure_connection(max_retries=1)
        except Exception:  # any failure means "not reachable"
            return False
    return True


def _rabbitmqctl(*args: str) -> bool:
    """Run ``rabbitmqctl`` (needs the node's Erlang cookie: root, or the rabbitmq user)."""
    if shutil.which("rabbitmqctl") is None:
        return False
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=60, check=False)
    return done.returncode == 0


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A broker URL for one test run: a vhost of its own, deleted afterwards.

    Without ``rabbitmqctl`` rights (a laptop's RabbitMQ run by another user) it
    is the default vhost, where each deployment's own prefix keeps it apart
    (and the deployment removes its queues when it stops). Skips without
    RabbitMQ on a laptop, fails under CI=true.
    """
    require(f"RabbitMQ at {RABBITMQ_HOST}:{RABBITMQ_PORT}", rabbitmq_reachable())
    vhost = f"fulfilment-test-{uuid.uuid4().hex[:10]}"
    local = RABBITMQ_HOST in {"127.0.0.1", "localhost"}
    if not (local and _rabbitmqctl("add_vhost", vhost)):
        yield rabbitmq_url()
        return
    try:
        if _rabbitmqctl("set_permissions", "-p", vhost, RABBITMQ_USER, ".*", ".*", ".*"):
            yield rabbitmq_url(vhost)
        else:
            yield rabbitmq_url()
    finally:
        _rabbitmqctl("delete_vhost", vhost)
