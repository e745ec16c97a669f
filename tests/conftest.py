from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from fulfilment.config import Settings
from fulfilment.sandbox import RunningSandbox, SandboxOptions, start_in_thread
from tests import services


@pytest.fixture(scope="session")
def redis_url() -> str:
    return services.redis_url()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are removed afterwards."""
    value = services.unique_prefix()
    yield value
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{value}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    """The project's sandbox on a loopback port, in a thread of the test process."""
    with start_in_thread(SandboxOptions()) as running:
        yield running


@pytest.fixture
def settings(sandbox: RunningSandbox, redis_url: str, prefix: str) -> Settings:
    return Settings.defaults().with_overrides(
        onebox_api_url=sandbox.url, redis_url=redis_url, broker_url=redis_url, key_prefix=prefix,
        onebox_read_timeout=5.0,
        # The machine's Redis keeps nothing on disk; the durable configuration
        # has tests of its own (test_durability, the chaos suite's host crash).
        require_durable_redis=False,
    )
