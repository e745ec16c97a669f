"""Start-up checks against real processes: credentials, secrets from files, Redis
passwords, the compose health checks, and the sandbox's port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fulfilment.config import Settings
from fulfilment.harness.cluster import Cluster, env_for
from fulfilment.harness.processes import Child, RedisServer, SandboxProcess, wait_for
from tasks import app as celery_app
from tasks.app import configure
from tasks.producer import submit
from tests.services import free_port, require

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
REDIS_PASSWORD = "pw-" + uuid.uuid4().hex[:12]


def compose_check(service: str) -> list[str]:
    """A compose service's health check as a command this machine can run."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    test = compose["services"][service]["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", test[1].replace("$$", "$")]  # compose's escape for a literal $
    return [sys.executable if test[1] == "python" else test[1], *test[2:]]


def worker(env: dict[str, str], log: Path, queue: str) -> Child:
    """``celery -A tasks worker`` under its default node name, as compose runs it."""
    return Child([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-l", "INFO",
                  "-P", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat",
                  "-Q", queue], log, env)


def started(child: Child) -> bool:
    wait_for(lambda: "ready." in child.output() or not child.alive(), timeout=60,
             what="the worker to start or exit")
    return child.alive()


@pytest.fixture
def onebox(tmp_path: Path) -> Iterator[SandboxProcess]:
    sandbox = SandboxProcess(tmp_path / "sandbox.log")
    yield sandbox
    sandbox.stop()


def test_a_worker_with_a_wrong_key_exits_with_one_line(
        onebox: SandboxProcess, settings: Settings, tmp_path: Path) -> None:
    wrong = settings.with_overrides(onebox_api_url=onebox.url, onebox_api_key="wrong-key-123")
    child = worker(env_for(wrong), tmp_path / "worker.log", f"{wrong.key_prefix}.purchase")
    try:
        assert child.process.wait(60) == 78, child.output()
        lines = [line for line in child.output().splitlines() if "fulfilment worker:" in line]
        assert len(lines) == 1, child.output()
        assert "Onebox refused the credentials of channel 'sandbox-channel'" in lines[0]
        assert "HTTP 401" in lines[0] and "ONEBOX_API_KEY" in lines[0]
        assert "Traceback" not in child.output()
        assert "wrong-key-123" not in child.output()
    finally:
        child.stop()


def test_a_worker_starts_with_a_warning_when_onebox_is_unreachable(
        settings: Settings, tmp_path: Path) -> None:
    away = settings.with_overrides(onebox_api_url=f"http://127.0.0.1:{free_port()}")
    child = worker(env_for(away), tmp_path / "worker.log", f"{away.key_prefix}.purchase")
    try:
        assert started(child), child.output()
        assert "could not check Onebox's credentials at start-up (CONNECT_FAILED" \
            in child.output()
    finally:
        child.stop()


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server that wants a password, durable as production runs it."""
    require("redis-server", subprocess.run(["which", "redis-server"], capture_output=True,
                                           check=False).returncode == 0)
    server = RedisServer(tmp_path / "redis", free_port(), appendfsync="always",
                         password=REDIS_PASSWORD)
    yield server
    server.stop()


def test_a_worker_configured_from_files_on_a_redis_with_a_password(
        onebox: SandboxProcess, locked_redis: RedisServer, prefix: str,
        tmp_path: Path) -> None:
    # Given the API key and the Redis URL (with its password) in files, not the environment
    settings = Settings.defaults().with_overrides(
        onebox_api_url=onebox.url, redis_url=locked_redis.url, broker_url="",
        key_prefix=prefix, retry_base_delay=0.05, retry_max_delay=0.5)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "key").write_text(f"{settings.onebox_api_key}\n")
    (secrets / "redis").write_text(f"{locked_redis.url}\n")
    env = {**env_for(settings), "ONEBOX_API_KEY": "", "FULFILMENT_REDIS_URL": "",
           "ONEBOX_API_KEY_FILE": str(secrets / "key"),
           "FULFILMENT_REDIS_URL_FILE": str(secrets / "redis")}
    cluster = Cluster(settings, onebox, tmp_path)
    child = worker(env, tmp_path / "worker.log",
                   ",".join(queue.name for queue in cluster.topology.consumed))
    try:
        # Then it passes the durability and credential checks (a token fetched at start-up)
        assert started(child), child.output()
        assert "obtained an Onebox access token" in child.output()
        # And answers compose's health check, run with the same settings
        check = subprocess.run(compose_check("worker"), capture_output=True, text=True,
                               env={**os.environ, **env, "HOSTNAME": socket.gethostname()},
                               timeout=60, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "pong" in check.stdout
        # And buys, with the broker and ledger behind the password
        configure(settings)
        reference = f"pw-{uuid.uuid4().hex[:8]}"
        assert submit({"reference": reference, "buyer": {"email": "ana@example.com"},
                       "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]}
                      ).status == "accepted"
        cluster.workers.append(child)  # its log is shown if no outcome comes
        assert cluster.collect({reference})[reference].status == "confirmed"
        assert REDIS_PASSWORD not in child.output()
        assert settings.onebox_api_key not in child.output()
    finally:
        child.stop()
        celery_app.close()


def test_a_wrong_redis_password_stops_the_worker_with_one_line(
        locked_redis: RedisServer, prefix: str, tmp_path: Path) -> None:
    wrong_url = locked_redis.url.replace(REDIS_PASSWORD, "not-the-password")
    settings = Settings.defaults().with_overrides(redis_url=wrong_url, key_prefix=prefix)
    child = worker(env_for(settings), tmp_path / "worker.log", f"{prefix}.purchase")
    try:
        assert child.process.wait(60) == 78, child.output()
        lines = [line for line in child.output().splitlines() if "fulfilment worker:" in line]
        assert len(lines) == 1 and "redis://:***@127.0.0.1" in lines[0], child.output()
        assert "not-the-password" not in child.output()
    finally:
        child.stop()


# --- The sandbox: its port, a clash, its health check -----------------------------------

def sandbox_child(log: Path, *args: str, api_url: str | None = None) -> Child:
    env = {"ONEBOX_API_URL": api_url} if api_url else {}
    return Child([sys.executable, "-m", "fulfilment.sandbox", *args], log, env)


def test_the_sandbox_takes_its_port_from_onebox_api_url(tmp_path: Path) -> None:
    port = free_port()
    child = sandbox_child(tmp_path / "sandbox.log", api_url=f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: "listening" in child.output() or not child.alive(), timeout=20,
                 what="the sandbox to listen")
        assert f"sandbox listening on http://127.0.0.1:{port}" in child.output()
        # Compose's health check finds it on the same port
        env = {**os.environ, "ONEBOX_API_URL": f"http://127.0.0.1:{port}"}
        assert subprocess.run(compose_check("sandbox"), env=env, capture_output=True,
                              timeout=30, check=False).returncode == 0
    finally:
        child.stop()
    env = {**os.environ, "ONEBOX_API_URL": f"http://127.0.0.1:{port}"}
    assert subprocess.run(compose_check("sandbox"), env=env, capture_output=True,
                          timeout=30, check=False).returncode != 0  # nothing answers now


def test_a_second_sandbox_on_a_taken_port_stands_by_and_takes_over(tmp_path: Path) -> None:
    first = SandboxProcess(tmp_path / "first.log")
    port = int(first.url.rsplit(":", 1)[1])
    second = sandbox_child(tmp_path / "second.log", "--port", str(port))
    try:
        # It does not exit (honcho would stop the workers with it): it stands by
        wait_for(lambda: "standing by" in second.output() or not second.alive(), timeout=20,
                 what="the second sandbox to stand by")
        assert second.alive(), second.output()
        # And when the first one goes, it serves in its place
        first.stop()
        wait_for(lambda: "sandbox listening on" in second.output() or not second.alive(),
                 timeout=30, what="the second sandbox to take over")
        assert second.alive(), second.output()
    finally:
        first.stop()
        second.stop()
    assert second.process.returncode == 0  # SIGTERM: a clean stop


def test_a_port_held_by_something_else_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        child = sandbox_child(tmp_path / "sandbox.log", "--port", str(port))
        assert child.process.wait(30) == 1
        child.stop()
    output = child.output().strip().splitlines()
    assert output == [f"Error: cannot listen on 127.0.0.1:{port}: Address already in use "
                      "(and what listens there is not a sandbox: move both with "
                      "ONEBOX_API_URL)"]
