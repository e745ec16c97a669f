"""Real services for integration tests: skip on a laptop without them, fail in CI.

A skipped integration test in CI would be a silent hole, so under ``CI=true`` a
missing service is an error, never a skip.
"""

from __future__ import annotations

import os

import pytest
import redis

from fulfilment.harness.processes import free_port, unique_prefix

__all__ = ["free_port", "in_ci", "redis_url", "require", "unique_prefix"]

REDIS_HOST = os.environ.get("FULFILMENT_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("FULFILMENT_TEST_REDIS_PORT", "6379"))
#: Tests use their own database of the shared Redis, and a key prefix per run.
REDIS_DB = int(os.environ.get("FULFILMENT_TEST_REDIS_DB", "9"))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(service: str, reachable: bool) -> None:
    if reachable:
        return
    message = f"{service} is not reachable"
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


