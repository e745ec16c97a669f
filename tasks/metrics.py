"""Each worker serves its metrics on ``FULFILMENT_METRICS_PORT`` (``fulfilment.metrics``).

At worker start (``celeryd_after_setup``: in the main process, once logging is
set up, before the pool forks) the worker binds the port; if it cannot (taken
by another worker on this host), it says so and works on without metrics:
metrics never stop a purchase. Under the prefork pool every pool process keeps
its metrics in files of a directory of this worker's own (one per port, wiped
at start: files of a worker that ran before would add up with ours), and the
main process serves their sum (``prometheus_client``'s multiprocess mode).
Under the threads or solo pool there is one process: plain mode. A pool
process that exits is marked dead (``worker_process_shutdown``). The
fleet-wide gauges (queues, open intents, the breaker) are read from Redis only
when Prometheus scrapes (``fulfilment.metrics_collector``).

Several workers on one host each serve their own port (the Procfile gives
honcho's N workers consecutive ports and node names; compose's replicas have
an address each): one endpoint per worker, so a dead worker shows as a
target down, and each one's counts stay its own. ``fulfilment_worker_info``
names the worker (its Celery node name) and its deployment (the key prefix):
the dashboard picks a deployment's instances by it.

Also counted here, from Celery's signals: each task run's duration (its
step) and the retries Celery schedules on its own (a Redis or broker error);
the flow counts the retries it decides.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Task
from celery.concurrency import get_implementation
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.signals import (
    celeryd_after_setup,
    task_postrun,
    task_prerun,
    task_retry,
    worker_process_shutdown,
    worker_shutdown,
)
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from fulfilment import metrics
from fulfilment.config import Settings
from fulfilment.metrics_collector import RedisCollector
from tasks import runtime

log = logging.getLogger(__name__)

#: Task names are ``fulfilment.<step>``; the step is what the histogram is labelled with.
TASK_PREFIX = "fulfilment."


@dataclass
class Serving:
    """The running endpoint: its server, and the multiprocess directory if any."""

    server: Any
    thread: threading.Thread
    port: int
    directory: Path | None


class _Worker:
    """What this worker process runs: the endpoint (main process), task start times."""

    serving: Serving | None = None
    started: dict[str, float] = {}  # noqa: RUF012  (one per process, on purpose)


@dataclass(frozen=True)
class WorkerInfo:
    """``fulfilment_worker_info``: which worker and deployment this endpoint is."""

    node: str
    deployment: str
    pool: str

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "fulfilment_worker_info", "Always 1: the worker serving this endpoint (its Celery "
            "node name), its deployment (FULFILMENT_KEY_PREFIX) and its pool.",
            labels=["node", "deployment", "pool"])
        info.add_metric([self.node, self.deployment, self.pool], 1.0)
        yield info


def metrics_directory(port: int) -> Path:
    """This worker's multiprocess directory: one per port (one worker per port and host)."""
    return Path(tempfile.gettempdir()) / f"fulfilment-metrics-{os.getuid()}-{port}"


def serve(settings: Settings, *, multiprocess: bool,
          info: WorkerInfo | None = None) -> Serving | None:
    """Bind the port, then set up the registry it serves; None if it cannot be bound."""
    registry = CollectorRegistry()
    address, port = settings.metrics_address, settings.metrics_port
    try:
        socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    except OSError as exc:  # socket.gaierror: the name, not the port, is the trouble
        log.warning("metrics: FULFILMENT_METRICS_ADDRESS=%r does not resolve (%s); this "
                    "worker serves no metrics", address, exc.strerror or exc)
        return None
    try:
        server, thread = start_http_server(port, address, registry=registry)
    except OSError as exc:
        log.warning("metrics: cannot listen on %s:%d (%s); this worker serves no metrics "
                    "(give each worker on a host its own FULFILMENT_METRICS_PORT)",
                    address, port, exc.strerror or exc)
        return None
    disable_created_metrics()  # type: ignore[no-untyped-call]
    # *_created series: one more per label set, never queried
    directory = None
    if multiprocess:
        # Only now that the port is ours: the directory is keyed by it.
        directory = metrics_directory(settings.metrics_port)
        metrics.use_multiprocess(directory)
        MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
        metrics.current()  # this process's own, at 0: served before any pool process counts
    else:
        registry.register(metrics.current().registry)
    registry.register(RedisCollector.for_settings(settings))
    if info is not None:
        registry.register(info)
    log.info("metrics: serving on %s:%d/metrics (%s)", settings.metrics_address,
             settings.metrics_port, "multiprocess" if multiprocess else "one process")
    return Serving(server, thread, settings.metrics_port, directory)


def _is_prefork(pool_cls: Any) -> bool:
    cls = get_implementation(pool_cls)
    return isinstance(cls, type) and issubclass(cls, PreforkPool)


def _pool_name(pool_cls: Any) -> str:
    cls = get_implementation(pool_cls)
    module = getattr(cls, "__module__", "")
    return module.rsplit(".", 1)[-1] if module.startswith("celery.concurrency.") else str(cls)


@celeryd_after_setup.connect
def _start(sender: str | None = None, instance: Any = None, **_: Any) -> None:
    settings = runtime.services().settings
    if not settings.metrics_port or _Worker.serving is not None:
        return
    if settings.effective_broker_url.startswith("memory://"):
        return  # the embedded demo's worker, in-process: not a deployment to scrape
    info = WorkerInfo(str(sender or instance.hostname), settings.key_prefix,
                      _pool_name(instance.pool_cls))
    _Worker.serving = serve(settings, multiprocess=_is_prefork(instance.pool_cls), info=info)


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    serving, _Worker.serving = _Worker.serving, None
    if serving is None:
        return
    serving.server.shutdown()
    serving.server.server_close()
    if serving.directory is not None:
        shutil.rmtree(serving.directory, ignore_errors=True)


@worker_process_shutdown.connect
def _process_exits(pid: int | None = None, **_: Any) -> None:
    # Runs in the exiting pool process; its counters stay (counters never go back).
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and os.path.isdir(directory):
        mark_process_dead(pid or os.getpid(), directory)  # type: ignore[no-untyped-call]


@task_prerun.connect
def _task_starts(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        _Worker.started[task_id] = time.perf_counter()


@task_postrun.connect
def _task_ends(task_id: str | None = None, task: Task[Any, Any] | None = None,
               **_: Any) -> None:
    start = _Worker.started.pop(task_id, None) if task_id is not None else None
    if start is not None and task is not None and task.name.startswith(TASK_PREFIX):
        metrics.step_ran(task.name[len(TASK_PREFIX):], time.perf_counter() - start)


@task_retry.connect
def _task_retried(reason: Any = None, **_: Any) -> None:
    # A retry the flow decided carries no exception, and the flow counted it already.
    exc = getattr(reason, "exc", None)
    if exc is not None:
        metrics.retried(type(exc).__name__)
