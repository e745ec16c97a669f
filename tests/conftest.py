from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import fakeredis
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
        # Workers started with these settings serve metrics on a port of the test's own,
        # not the default 9650 (tests run side by side: pytest -n).
        metrics_port=services.free_port(),
    )


@dataclass(frozen=True)
class LedgerStore:
    """A Redis for the ledger's scripts, and the key prefix this test owns in it."""

    client: redis.Redis
    prefix: str
    real: bool


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.integration)])
def ledger_store(request: pytest.FixtureRequest) -> Iterator[LedgerStore]:
    """Each flow and ledger test twice: on fakeredis, and on a real Redis (a private db
    and prefix, removed afterwards). fakeredis runs the ledger's Lua with its own
    interpreter, not Redis's: only the real one shows the scripts work where they run."""
    prefix = services.unique_prefix()
    if request.param == "fakeredis":
        yield LedgerStore(fakeredis.FakeRedis(), prefix, real=False)
        return
    client = redis.Redis.from_url(services.redis_url())
    try:
        yield LedgerStore(client, prefix, real=True)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
