"""``fulfilment results`` keeps reading across a Redis restart.

A redis-server of the test's own (append-only file, so the queue survives the
restart), ``fulfilment results --jsonl FILE`` as a process, one result
published before the restart and one after: the process must still be running
and both must be in the file.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fulfilment.config import Settings
from fulfilment.harness.cluster import env_for
from fulfilment.harness.processes import Child, RedisServer, wait_for
from fulfilment.keys import Keys
from fulfilment.results import ResultPublisher
from fulfilment.topology import Topology
from fulfilment.wiring import broker_connection
from schemas.result import CONFIRMED, OrderResult, result_id_for
from tests.services import free_port, require, unique_prefix

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    require("redis-server", shutil.which("redis-server") is not None)
    running = RedisServer(tmp_path / "redis", free_port())
    try:
        yield running
    finally:
        running.stop()


def result(reference: str) -> OrderResult:
    now = datetime.now(UTC)
    return OrderResult(result_id=result_id_for(reference), reference=reference,
                       status=CONFIRMED, order_code=f"CODE{reference[-1]}", order_id="1",
                       submitted_at=now, finished_at=now)


def publish(settings: Settings, reference: str) -> None:
    with broker_connection(settings) as connection:
        topology = Topology.for_keys(Keys(settings.key_prefix))
        ResultPublisher(connection, topology).publish(result(reference))


def test_results_command_reconnects_after_a_redis_restart(server: RedisServer,
                                                          tmp_path: Path) -> None:
    settings = Settings.from_env({"FULFILMENT_REQUIRE_DURABLE_REDIS": "false"}).with_overrides(
        redis_url=server.url, broker_url=server.url, key_prefix=unique_prefix("results"))
    out = tmp_path / "results.jsonl"
    env = {**env_for(settings), "FULFILMENT_REQUIRE_DURABLE_REDIS": "false"}
    reader = Child([sys.executable, "-m", "tasks.commands", "results", "--jsonl", str(out)],
                   tmp_path / "results.log", env)

    def rows() -> list[dict[str, object]]:
        if not reader.alive():
            raise AssertionError(f"fulfilment results exited ({reader.process.returncode}):\n"
                                 f"{reader.output()}")
        if not out.exists():
            return []
        return [json.loads(line) for line in out.read_text().splitlines()]

    try:
        # Given the reader running and one result read
        publish(settings, "before-1")
        wait_for(lambda: len(rows()) >= 1, timeout=30, what="the first result in the file")
        # When Redis is stopped and started again, and another result is published
        server.restart()
        publish(settings, "after-2")
        # Then the same process reads it too, and is still running
        wait_for(lambda: len(rows()) >= 2, timeout=60,
                 what="the result published after the restart")
        assert reader.alive()
        assert [row["reference"] for row in rows()] == ["before-1", "after-2"]
        assert all(row["status"] == "confirmed" for row in rows())
    finally:
        reader.stop()
