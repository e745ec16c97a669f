"""A wrong URL scheme, a sandbox key sent to the real API or a metrics address with a port
stops start-up with one line and exit 78, never a traceback at first use.

The worker runs as a process of its own, as an operator starts it; each case stops
before it would connect to anything, so none needs a service.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fulfilment.config import Settings
from fulfilment.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
WORKER = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-P", "solo"]


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith(("ONEBOX_", "FULFILMENT_"))}
    return subprocess.run(WORKER, capture_output=True, text=True, timeout=120, check=False,
                          env={**inherited, **env}, cwd=ROOT)


@pytest.mark.parametrize(("env", "named"), [
    ({"FULFILMENT_REDIS_URL": "http://127.0.0.1:6379/0"}, "FULFILMENT_REDIS_URL='http:"),
    ({"FULFILMENT_REDIS_URL": "127.0.0.1:6379"}, "FULFILMENT_REDIS_URL='127.0.0.1:6379'"),
    ({"FULFILMENT_BROKER_URL": "rabbitmq://guest:pw@mq/"}, "FULFILMENT_BROKER_URL='rabbitmq:"),
    ({"ONEBOX_API_URL": "https://api.oneboxtds.com"}, "ONEBOX_API_KEY is the sandbox's key"),
    ({"FULFILMENT_METRICS_ADDRESS": "0.0.0.0:9650"}, "FULFILMENT_METRICS_ADDRESS='0.0.0.0:9650'"),
], ids=["redis-http", "redis-no-scheme", "broker-scheme", "sandbox-key", "address-with-port"])
def test_a_wrong_url_stops_the_worker_with_one_line_and_78(env: dict[str, str],
                                                           named: str) -> None:
    done = run(env)
    assert done.returncode == 78, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert named in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert "pw" not in done.stderr  # a URL's password stays masked


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://cache.example:6380/1",
                                 "unix:///run/redis/redis.sock?db=2"])
def test_redis_urls_redis_py_understands_are_accepted(url: str) -> None:
    assert Settings.from_env({"FULFILMENT_REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize("url", ["", "redis://mq:6379/1", "rediss://mq:6380/0",
                                 "amqp://guest:guest@127.0.0.1:5672/x", "amqps://mq/x",
                                 "pyamqp://mq//", "memory://localhost/"])
def test_the_brokers_we_run_on_are_accepted(url: str) -> None:
    assert Settings.from_env({"FULFILMENT_BROKER_URL": url}).broker_url == url


@pytest.mark.parametrize("url", ["unix://", "redis+socket:///tmp/r.sock", "https://redis:6379"])
def test_other_redis_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigError, match=r"FULFILMENT_REDIS_URL=.*must"):
        Settings.from_env({"FULFILMENT_REDIS_URL": url})


@pytest.mark.parametrize("address", ["0.0.0.0", "127.0.0.1", "::", "[::1]", "localhost",
                                     "metrics.internal.example"])
def test_listen_addresses_are_ip_addresses_or_host_names(address: str) -> None:
    assert Settings.from_env({"FULFILMENT_METRICS_ADDRESS": address}).metrics_address == \
        address.strip("[]")


@pytest.mark.parametrize("address", ["", "http://0.0.0.0", "0.0.0.0:9650", "my host"])
def test_other_listen_addresses_are_refused(address: str) -> None:
    with pytest.raises(ConfigError, match=r"FULFILMENT_METRICS_ADDRESS=.*IP address or a host"):
        Settings.from_env({"FULFILMENT_METRICS_ADDRESS": address})


def test_the_sandbox_key_is_for_the_sandbox_only() -> None:
    # The default key with the default (local sandbox) URL, or compose's sandbox: fine
    assert Settings.from_env({}).onebox_api_key == "sandbox-api-key"
    Settings.from_env({"ONEBOX_API_URL": "http://sandbox:8650",
                       "ONEBOX_PLAIN_HTTP_HOSTS": "sandbox"})
    # The real API needs a key of its own, from the environment or a file
    for env in ({"ONEBOX_API_URL": "https://api.oneboxtds.com"},
                {"ONEBOX_API_URL": "https://api.oneboxtds.com",
                 "ONEBOX_API_KEY": "sandbox-api-key"},
                {"ONEBOX_AUTH_URL": "https://auth.oneboxtds.com"}):
        with pytest.raises(ConfigError, match="set ONEBOX_API_KEY or ONEBOX_API_KEY_FILE"):
            Settings.from_env(env)
    assert Settings.from_env({"ONEBOX_API_URL": "https://api.oneboxtds.com",
                              "ONEBOX_API_KEY": "channel-key"}).onebox_api_key == "channel-key"
