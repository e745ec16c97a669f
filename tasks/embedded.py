"""Everything in one process, for the demo: sandbox, in-memory broker, fakeredis, worker.

A fresh machine has no Redis and no broker. The embedded mode runs the real
code paths (the same tasks, flow, ledger Lua scripts and kombu publishing)
over kombu's ``memory://`` transport and fakeredis, with a Celery worker in a
thread. It is for the demo only: the tests run real Redis and real workers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import fakeredis
import redis
from celery.contrib.testing.worker import start_worker
from kombu import Connection

from fulfilment.config import Settings
from fulfilment.flow import Services
from fulfilment.sandbox import RunningSandbox, SandboxAdmin, SandboxOptions, start_in_thread
from fulfilment.wiring import MEMORY_BROKER, broker_connection, build_services, redis_client
from tasks import runtime
from tasks.app import app, configure


@dataclass(frozen=True)
class Environment:
    settings: Settings
    services: Services
    connection: Connection
    sandbox_url: str
    embedded: bool


@contextmanager
def environment(base: Settings, *, broker_url: str | None, concurrency: int = 4,
                sandbox_port: int = 0) -> Iterator[Environment]:
    """The demo's world: embedded when ``broker_url`` is None, else real Redis and workers."""
    with ExitStack() as stack:
        if broker_url is None:
            sandbox = stack.enter_context(_sandbox(base, port=sandbox_port))
            settings = base.with_overrides(
                onebox_api_url=sandbox.url, onebox_auth_url="", broker_url=MEMORY_BROKER,
                key_prefix=f"demo-{uuid.uuid4().hex[:8]}",
                require_durable_redis=False)  # fakeredis: in memory by design
            client: redis.Redis = fakeredis.FakeRedis()
            connection = broker_connection(settings)
        else:
            settings = base.with_overrides(broker_url=broker_url)
            sandbox_url = _running_sandbox(settings)
            if sandbox_url is None:
                port = int(settings.onebox_api_url.rsplit(":", 1)[-1].split("/")[0])
                sandbox_url = stack.enter_context(_sandbox(settings, port=port)).url
            settings = settings.with_overrides(onebox_api_url=sandbox_url)
            client = redis_client(settings)
            connection = broker_connection(settings)
        stack.callback(connection.release)
        configure(settings)
        services = build_services(settings, client, connection)
        runtime.install(services)
        if broker_url is None:
            stack.enter_context(start_worker(app, pool="threads", concurrency=concurrency,
                                             perform_ping_check=False, loglevel="WARNING",
                                             shutdown_timeout=30))
        yield Environment(settings, services, connection, settings.onebox_api_url,
                          broker_url is None)


@contextmanager
def _sandbox(settings: Settings, port: int) -> Iterator[RunningSandbox]:
    options = SandboxOptions(api_key=settings.onebox_api_key,
                             channel_id=settings.onebox_channel_id)
    with start_in_thread(options, port=port) as sandbox:
        yield sandbox


def _running_sandbox(settings: Settings) -> str | None:
    """The URL of a sandbox already answering at ``ONEBOX_API_URL``, if any."""
    try:
        SandboxAdmin(settings.onebox_api_url).health()
    except Exception:  # noqa: BLE001 - any failure means "not there"
        return None
    return settings.onebox_api_url
