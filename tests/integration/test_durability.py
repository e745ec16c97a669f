"""Workers and producers demand a Redis that fsyncs every write before answering it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fulfilment.config import Settings
from fulfilment.durability import missing, require_durable
from fulfilment.errors import ConfigError
from fulfilment.harness.cluster import env_for
from fulfilment.harness.processes import Child, RedisServer, wait_for
from tests.services import free_port, require

pytestmark = pytest.mark.integration


def worker(settings: Settings, log: Path) -> Child:
    return Child([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-l", "INFO",
                  "-P", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat",
                  "-Q", f"{settings.key_prefix}.purchase"], log, env_for(settings))


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[RedisServer]:
    require("redis-server", subprocess.run(["which", "redis-server"], capture_output=True,
                                           check=False).returncode == 0)
    server = RedisServer(tmp_path / "redis", free_port(), appendfsync="always")
    yield server
    server.stop()


def test_a_durable_redis_passes_and_the_machines_does_not(
        durable: RedisServer, redis_url: str) -> None:
    assert missing(redis.Redis.from_url(durable.url)) == []
    lacking = missing(redis.Redis.from_url(redis_url))  # appendonly no, as this machine runs it
    assert any("appendonly" in line or "appendfsync" in line for line in lacking)


def test_a_worker_on_a_redis_that_may_lose_writes_exits_with_one_line(
        settings: Settings, tmp_path: Path) -> None:
    # Given the machine's Redis, which keeps nothing on disk, and the check on
    demanding = settings.with_overrides(require_durable_redis=True)
    child = worker(demanding, tmp_path / "worker.log")
    # Then the worker exits at start-up, naming what is missing, without a traceback
    assert child.process.wait(60) == 78
    lines = [line for line in child.output().splitlines() if "fulfilment worker:" in line]
    assert len(lines) == 1 and "appendfsync" in lines[0], child.output()
    assert "Traceback" not in child.output()
    child.stop()


def test_waiving_the_check_starts_with_a_warning(settings: Settings, tmp_path: Path) -> None:
    child = worker(settings, tmp_path / "worker.log")  # FULFILMENT_REQUIRE_DURABLE_REDIS=false
    try:
        wait_for(lambda: "ready." in child.output() or not child.alive(), timeout=60,
                 what="the worker to start")
        assert child.alive(), child.output()
        assert "FULFILMENT_REQUIRE_DURABLE_REDIS=false" in child.output()
    finally:
        child.stop()


def test_producers_refuse_a_redis_that_may_lose_writes(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    with pytest.raises(ConfigError) as raised:
        require_durable(settings.with_overrides(require_durable_redis=True), client)
    assert "appendfsync" in raised.value.message
    require_durable(settings, client)  # waived: a warning, no error
