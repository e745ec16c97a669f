"""A small real deployment for end-to-end tests.

Real Redis (a database of its own and a key prefix per test) for the ledger,
Redis or RabbitMQ as the broker, the sandbox as a process of its own, Celery
workers as processes started with ``celery -A tasks worker``, and this test
process as the producer and the results consumer.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fulfilment.config import SETTINGS, Settings
from fulfilment.harness.processes import Child, SandboxProcess, worker_args
from fulfilment.keys import Keys
from fulfilment.results import consume_failures, consume_results
from fulfilment.topology import Topology, control_names, is_amqp
from fulfilment.wiring import broker_connection
from schemas.intent import Buyer, SeatRef
from schemas.result import HELD, OrderResult


def env_for(settings: Settings) -> dict[str, str]:
    """The environment that makes a worker process read exactly these settings."""
    return {s.env: str(getattr(settings, s.attr)) for s in SETTINGS}


@dataclass
class Cluster:
    settings: Settings
    sandbox: SandboxProcess
    tmp: Path
    workers: list[Child] = field(default_factory=list)
    results: dict[str, list[OrderResult]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    restarts: int = 0
    _supervisor: threading.Thread | None = None
    _supervising: threading.Event = field(default_factory=threading.Event)

    def supervise(self) -> None:
        """Restart any worker or beat that exits on its own, as systemd or compose would.

        Celery's worker gives up with "Unrecoverable error" on some broker
        connection failures (a kombu race while Redis goes away); production
        runs it under a supervisor that starts it again, and so do these tests.
        """
        self._supervising.set()

        def watch() -> None:
            while self._supervising.is_set():
                for index, child in enumerate(list(self.workers)):
                    if not child.alive() and not child.stopping:
                        child.stop()
                        self.restarts += 1
                        log_path = child.log_path.with_name(
                            f"{child.log_path.stem}-restart{self.restarts}.log")
                        self.workers[index] = Child(child.args, log_path, child.env)
                time.sleep(0.2)

        self._supervisor = threading.Thread(target=watch, name="supervisor", daemon=True)
        self._supervisor.start()

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.key_prefix)

    @property
    def topology(self) -> Topology:
        return Topology.for_keys(self.keys, self.settings.effective_broker_url)

    @property
    def on_rabbitmq(self) -> bool:
        return is_amqp(self.settings.effective_broker_url)

    def queued(self, queue: str) -> int:
        """Messages ready on one of our queues (a passive declare: it creates nothing).

        A queue that was never declared holds nothing: 0. On Redis the lists are
        counted directly: kombu 5.7's passive declare checks the queue's key
        without the transport's ``global_keyprefix`` and finds no queue (so 0).
        """
        with broker_connection(self.settings) as connection:
            channel: Any = connection.channel()  # kombu's stubs omit the AMQP methods
            if not self.on_rabbitmq:
                return int(channel._size(queue))
            try:
                declared = channel.queue_declare(queue=queue, passive=True)
            except connection.channel_errors:
                return 0
            return int(declared.message_count)

    def inspect_ping(self, *, timeout: float = 3.0) -> set[str]:
        """The workers that answer ``celery inspect ping`` run with this deployment's settings.

        The operator's command, as a process of its own: what it sees is what an
        operator on this deployment would see.
        """
        done = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tasks", "inspect", "ping", "--json",
             "--timeout", str(timeout)],
            capture_output=True, text=True, env=_child_env(env_for(self.settings)),
            timeout=60 + timeout, check=False)
        if done.returncode != 0 and "No nodes replied" in done.stdout + done.stderr:
            return set()
        assert done.returncode == 0, done.stdout + done.stderr
        replies = json.loads(done.stdout.strip().splitlines()[-1])
        return {name for reply in _as_list(replies) for name in reply}

    def remove_broker_objects(self) -> None:
        """On RabbitMQ, delete this deployment's queues and exchanges (a shared vhost keeps them).

        On Redis the test's key prefix removal already covers the broker's keys.
        """
        if not self.on_rabbitmq:
            return
        topology = self.topology
        names = control_names(self.settings.key_prefix)
        exchanges = {topology.results_exchange.name, topology.failures_exchange.name,
                     *(q.exchange.name for q in topology.queues),
                     f"{names['control_exchange']}.pidbox",
                     f"reply.{names['control_exchange']}.pidbox", names["event_exchange"]}
        with broker_connection(self.settings) as connection:
            # A fresh channel each: a failed delete closes its channel.
            for queue in topology.queues:
                with contextlib.suppress(*connection.channel_errors):
                    channel: Any = connection.channel()
                    channel.queue_delete(queue.name)
            for exchange in exchanges:
                with contextlib.suppress(*connection.channel_errors):
                    channel = connection.channel()
                    channel.exchange_delete(exchange)

    def start_worker(self, *, concurrency: int = 2, beat: bool = False,
                     pool: str = "prefork") -> Child:
        name = f"w{len(self.workers)}-{self.settings.key_prefix}@%h"
        args = worker_args([queue.name for queue in self.topology.consumed], name,
                           concurrency=concurrency, beat=beat,
                           schedule=self.tmp / f"beat-{len(self.workers)}", pool=pool)
        worker = Child(args, self.tmp / f"worker-{len(self.workers)}.log", env_for(self.settings))
        self.workers.append(worker)
        return worker

    def sell_at_box_office(self, *seats: SeatRef) -> None:
        """Sell these seats to someone else first (through Onebox, as a box office would)."""
        from fulfilment.onebox import build_client
        from fulfilment.wiring import redis_client

        box = build_client(self.settings, redis_client(self.settings))
        try:
            order = box.create_order()
            box.add_seats(order.id, list(seats))
            box.set_buyer(order.id, Buyer(email="box@example.com"))
            box.pre_confirm(order.id)
            box.confirm(order.id, "box-office")
        finally:
            box.close()

    def start_beat(self) -> Child:
        """celery beat as a process of its own, as in production (one per deployment)."""
        beat = Child([sys.executable, "-m", "celery", "-A", "tasks", "beat", "-l", "INFO",
                      "-s", str(self.tmp / "beat-schedule")],
                     self.tmp / "beat.log", env_for(self.settings))
        self.workers.append(beat)
        return beat

    def stop(self) -> None:
        self._supervising.clear()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        for worker in self.workers:
            worker.stop()
        self.sandbox.stop()

    def worker_logs(self) -> str:
        return "\n".join(f"--- {w.log_path.name}\n{w.output()[-6000:]}" for w in self.workers)

    def collect(self, references: set[str], *, timeout: float = 90.0) -> dict[str, OrderResult]:
        """Read results until every reference has one; fail with the logs if not in time."""
        deadline = time.monotonic() + timeout
        topology = self.topology
        with broker_connection(self.settings) as connection:
            while not references <= self.results.keys():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(references - self.results.keys())
                    raise AssertionError(f"no outcome for {len(missing)} intents, e.g. "
                                         f"{missing[:5]}\n{self.worker_logs()}")
                for result in consume_results(connection, topology, timeout=0.2,
                                              idle_timeout=min(remaining, 2.0)):
                    self.results.setdefault(result.reference, []).append(result)
                    if references <= self.results.keys():
                        break
        return {ref: self.results[ref][0] for ref in references}

    def collect_failures(self, count: int, *, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        topology = self.topology
        with broker_connection(self.settings) as connection:
            while len(self.failures) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"only {len(self.failures)} of {count} failures\n"
                                         f"{self.worker_logs()}")
                for failure in consume_failures(connection, topology, timeout=0.2,
                                                idle_timeout=min(remaining, 2.0)):
                    self.failures.append(failure)
                    if len(self.failures) >= count:
                        break
        return self.failures

    def assert_exactly_once(self, references: set[str]) -> Counter[str]:
        """Each reference: one distinct outcome; confirmed ones once at Onebox; no seat twice."""
        audit = self.sandbox.admin.audit()
        statuses: Counter[str] = Counter()
        for reference in references:
            every = self.results.get(reference, [])
            # A held result is interim: the final one follows, with the same result_id.
            assert len({o.result_id for o in every}) <= 1, f"{reference}: two result ids"
            outcomes = [o for o in every if o.status != HELD]
            assert outcomes, f"{reference} has no outcome"
            assert len({o.result_id for o in outcomes}) == 1, f"{reference}: two outcomes"
            assert len({o.status for o in outcomes}) == 1, f"{reference}: conflicting outcomes"
            result = outcomes[0]
            statuses[result.status] += 1
            confirmed_codes = audit["confirmed"].get(reference, [])
            if result.status == "confirmed":
                assert confirmed_codes == [result.order_code], (reference, confirmed_codes)
            else:
                assert confirmed_codes == [], f"{reference} failed but Onebox confirmed it"
                assert result.error is not None and result.error.code
        assert audit["duplicates"] == {}
        assert audit["seats_sold_twice"] == 0
        return statuses


def _child_env(env: dict[str, str]) -> dict[str, str]:
    """This process's environment minus our settings, plus ``env`` (as a worker gets it)."""
    import os

    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith(("ONEBOX_", "FULFILMENT_"))}
    return {**inherited, **env}


def _as_list(replies: Any) -> list[dict[str, Any]]:
    """``inspect ping --json``: a list of one-entry dicts (or one dict, by Celery version)."""
    return replies if isinstance(replies, list) else [replies]
