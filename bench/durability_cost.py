"""What does a durable ledger cost per order: appendfsync always vs everysec vs no persistence?

The ledger's Redis must run ``--appendonly yes --appendfsync always`` (docs/operations.md,
"What Redis must promise"): every write is fsynced before Redis answers it.
This measures the price, beside two references in the same run (this machine
is shared and noisy: read the ratios, not the absolute figures):

- (a) ``--appendonly no``: no persistence at all, the reference;
- (b) ``--appendonly yes --appendfsync everysec``: a background fsync a second;
- (c) ``--appendonly yes --appendfsync always``: what production must run.

Each configuration gets a private redis-server on a spare loopback port and a
fresh data directory under /tmp (one per run), which holds the ledger and the
broker, as in production (``FULFILMENT_BROKER_URL`` defaults to the ledger's
Redis). Two measurements per configuration:

- the product, as bench/chain_hops.py runs it: the sandbox as a process, one
  worker ``celery -A tasks worker -P prefork -c N`` as a process, intents
  submitted with ``tasks.submit_many``, results read from the results queue.
  A few orders warm the worker up first and are not counted. Wall time runs
  from the first submission to the last result. Worker CPU (main and pool
  processes) and Redis CPU come from /proc; fsyncs are counted in the kernel
  by ``perf stat`` (fsync and fdatasync syscalls of redis-server, no slowdown;
  "n/a" when perf cannot); Redis commands from ``INFO commandstats`` deltas
  (our own INFO excluded; commands a Lua script runs count too, as Redis
  counts them). CPU and commands are read once the last intent has left the
  open-intents set, so the trailing ``mark_published`` writes are in.
  ``require_durable_redis`` is False for (a) and (b), True for (c).
- the ledger alone (``fulfilment.ledger.Ledger`` and ``Leases`` directly): one
  order's writes as the four purchase tasks make them (admit; per task a lease
  ``SET NX``, ``count_attempt``, the stage's records, the release; then
  ``finish`` and ``mark_published``: 22 commands, 18 of them scripts; no
  reads), for ``--micro-orders`` orders from one client in sequence, then from
  8 threads sharing a connection pool.

Also the disk's own price: 200 appends of 200 bytes, each followed by fdatasync.

Usage: python bench/durability_cost.py [--orders 300] [--concurrency 4 16] [--rounds 1]
Prints tables and writes bench/results/durability_cost.json. Loopback only;
every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from fulfilment.config import Settings  # noqa: E402
from fulfilment.harness.cluster import Cluster  # noqa: E402
from fulfilment.harness.processes import (  # noqa: E402
    RedisServer,
    SandboxProcess,
    cpu_seconds,
    free_port,
    wait_for,
)
from fulfilment.keys import Keys  # noqa: E402
from fulfilment.lease import Leases  # noqa: E402
from fulfilment.ledger import Ledger  # noqa: E402
from schemas.intent import PurchaseIntent, load_intent  # noqa: E402
from schemas.result import OrderResult, result_id_for  # noqa: E402
from tasks.app import configure  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "durability_cost.json"
#: Configuration name -> appendfsync, or None for no append-only file at all.
CONFIGS: dict[str, str | None] = {
    "(a) appendonly no": None,
    "(b) appendfsync everysec": "everysec",
    "(c) appendfsync always": "always",
}
REFERENCE = "(a) appendonly no"
MICRO_THREADS = 8
SYSCALLS = ("syscalls:sys_enter_fsync", "syscalls:sys_enter_fdatasync")


# --- processes ------------------------------------------------------------------------
def start_redis(appendfsync: str | None, directory: Path) -> RedisServer:
    server = RedisServer(directory, free_port(), appendfsync=appendfsync)
    found = redis.Redis(port=server.port, decode_responses=True).config_get("append*")
    wanted = {"appendonly": "no"} if appendfsync is None else {"appendonly": "yes",
                                                                "appendfsync": appendfsync}
    assert {k: found.get(k) for k in wanted} == wanted, (wanted, found)
    return server


class SyncCounter:
    """Counts a process's fsync and fdatasync calls in the kernel (perf stat tracepoints)."""

    def __init__(self, pid: int, output: Path) -> None:
        self.output = output
        self.process: subprocess.Popen[bytes] | None = None
        if shutil.which("perf") is None:
            return
        self.process = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-o", str(output), "-e", ",".join(SYSCALLS),
             "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.5)  # attached by then (it says nothing until it stops)
        if self.process.poll() is not None:
            self.process = None

    def stop(self) -> int | None:
        """Stop counting; the number of syncs seen, or None if perf could not count."""
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return None
        total, seen = 0, 0
        for line in self.output.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] in SYSCALLS:
                if not fields[0].strip().isdigit():
                    return None  # "<not counted>" / "<not supported>"
                total += int(fields[0])
                seen += 1
        return total if seen == len(SYSCALLS) else None

    def close(self) -> None:
        """Make sure perf is gone (after an error between start and ``stop``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)




@dataclass
class RedisSnapshot:
    commands: dict[str, int]
    delayed_fsync: int
    aof_size: int

    @classmethod
    def take(cls, client: redis.Redis) -> RedisSnapshot:
        info = client.info("everything")
        return cls({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()
                    if k.startswith("cmdstat_")},
                   int(info.get("aof_delayed_fsync", 0)), int(info.get("aof_current_size", 0)))

    def since(self, before: RedisSnapshot) -> dict[str, Any]:
        commands = {name: calls - before.commands.get(name, 0)
                    for name, calls in self.commands.items() if name != "info"}
        commands = {name: n for name, n in commands.items() if n}
        return {"commands": commands, "delayed_fsync": self.delayed_fsync - before.delayed_fsync,
                "aof_bytes": self.aof_size - before.aof_size}


def redis_figures(delta: dict[str, Any], fsyncs: int | None, orders: int) -> dict[str, Any]:
    commands: dict[str, int] = delta["commands"]
    return {
        "fsyncs": fsyncs,
        "fsyncs_per_order": None if fsyncs is None else fsyncs / orders,
        "aof_delayed_fsync": delta["delayed_fsync"],
        "aof_bytes_per_order": delta["aof_bytes"] / orders,
        "commands_per_order": sum(commands.values()) / orders,
        "scripts_per_order": (commands.get("evalsha", 0) + commands.get("eval", 0)) / orders,
        "commands_by_name_per_order": {name: round(n / orders, 3) for name, n in
                                       sorted(commands.items(), key=lambda kv: -kv[1])},
    }


# --- the product --------------------------------------------------------------------------
def intents(prefix: str, count: int) -> list[dict[str, Any]]:
    return [{"reference": f"{prefix}-{i}", "buyer": {"email": "bench@example.com"},
             "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]}
            for i in range(count)]


def submit_and_collect(cluster: Cluster, documents: list[dict[str, Any]]) -> dict[str, str]:
    from tasks import submit_many

    accepted = sum(1 for s in submit_many(documents) if s.status == "accepted")
    assert accepted == len(documents), f"only {accepted} of {len(documents)} accepted"
    results = cluster.collect({d["reference"] for d in documents}, timeout=600)
    return {ref: r.status for ref, r in results.items()}


def product(appendfsync: str | None, concurrency: int, orders: int,
            directory: Path) -> dict[str, Any]:
    server = start_redis(appendfsync, directory / "redis")
    client = redis.Redis(port=server.port)
    counters: list[SyncCounter] = []
    try:
        sandbox = SandboxProcess(directory / "sandbox.log")
        settings = Settings.defaults().with_overrides(
            onebox_api_url=sandbox.url, redis_url=server.url, broker_url=server.url,
            key_prefix=f"dur-{uuid.uuid4().hex[:6]}",
            require_durable_redis=appendfsync == "always")
        configure(settings)
        cluster = Cluster(settings, sandbox, directory)
        try:
            worker = cluster.start_worker(concurrency=concurrency)

            def ready() -> bool:
                if not worker.alive():
                    raise AssertionError(f"the worker exited:\n{worker.output()[-3000:]}")
                return "ready." in worker.output()

            wait_for(ready, timeout=90, what="the worker")
            submit_and_collect(cluster, intents("warm", max(2 * concurrency, 10)))
            ledger = Ledger(client, cluster.keys, settings.ledger_retention)
            wait_for(lambda: ledger.open_count() == 0, timeout=30, what="the warm-up")

            counter = SyncCounter(server.pid, directory / "perf-product.csv")
            counters.append(counter)
            before = RedisSnapshot.take(client)
            worker_cpu, redis_cpu = cpu_seconds(worker.pid), cpu_seconds(server.pid, False)
            started = time.perf_counter()
            statuses = submit_and_collect(cluster, intents("bench", orders))
            wall = time.perf_counter() - started
            # The last tasks still write (mark_published, lease release) after publishing.
            wait_for(lambda: ledger.open_count() == 0, timeout=60, what="the last writes",
                     interval=0.02)
            time.sleep(0.2)
            worker_used = cpu_seconds(worker.pid) - worker_cpu
            redis_used = cpu_seconds(server.pid, False) - redis_cpu
            delta = RedisSnapshot.take(client).since(before)
            fsyncs = counter.stop()
        finally:
            cluster.stop()
    finally:
        for counter in counters:
            counter.close()
        client.close()
        server.stop()
    return {
        "orders": orders,
        "confirmed": sum(1 for s in statuses.values() if s == "confirmed"),
        "orders_per_s": orders / wall,
        "wall_ms_per_order": 1000 * wall / orders,
        "worker_cpu_ms_per_order": 1000 * worker_used / orders,
        "redis_cpu_ms_per_order": 1000 * redis_used / orders,
        **redis_figures(delta, fsyncs, orders),
    }


# --- the ledger alone ---------------------------------------------------------------------
@dataclass(frozen=True)
class MicroOrder:
    intent: PurchaseIntent
    result: OrderResult


def micro_orders(prefix: str, count: int) -> list[MicroOrder]:
    now = datetime.now(UTC)
    made: list[MicroOrder] = []
    for document in intents(prefix, count):
        reference = document["reference"]
        made.append(MicroOrder(load_intent(document), OrderResult(
            result_id=result_id_for(reference), reference=reference, status="confirmed",
            order_code=f"BENCH{len(made):07d}", order_id=f"order-{len(made)}", attempts=4,
            submitted_at=now, finished_at=now)))
    return made


def one_order(ledger: Ledger, leases: Leases, order: MicroOrder, clock: Callable[[], float]
              ) -> None:
    """One purchase's ledger writes, as fulfilment.flow makes them for one automatic item."""
    reference = order.intent.reference
    ledger.admit(order.intent)
    expiry = {"basket_expires": clock() + 900, "basket_ttl": 900}
    stages: list[list[Callable[[], object]]] = [
        [lambda: ledger.record(reference, order_id="order-1", item_ids=[], items_done=0,
                               buyer_set=False, code=None, confirm_sent=False, baskets=1,
                               failures=0, **expiry),
         lambda: ledger.record(reference, pending="seats"),
         lambda: ledger.record(reference, item_ids=[1], items_done=1, pending=None,
                               **expiry, failures=0),
         lambda: ledger.record(reference, buyer_set=True, failures=0)],
        [lambda: ledger.record(reference, pending="pre_confirm"),
         lambda: ledger.record(reference, code=order.result.order_code, item_ids=[1],
                               pending=None, failures=0, **expiry)],
        [lambda: ledger.record(reference, confirm_sent=True, basket_expires=clock() + 900),
         lambda: ledger.finish(reference, order.result)],
        [lambda: ledger.mark_published(reference)],
    ]
    for writes in stages:
        lease = leases.take(reference)
        assert lease is not None
        with ledger.fenced(lease.key, lease.token):
            ledger.count_attempt(reference)
            for write in writes:
                write()
        lease.release()  # never entered: no heartbeat thread, only the release script


def micro(appendfsync: str | None, count: int, directory: Path) -> dict[str, Any]:
    server = start_redis(appendfsync, directory / "redis")
    client = redis.Redis(port=server.port, max_connections=4 * MICRO_THREADS)
    counters: list[SyncCounter] = []
    try:
        keys = Keys(f"micro-{uuid.uuid4().hex[:6]}")
        ledger, leases = Ledger(client, keys, 604800), Leases(client, keys, 15.0)
        for order in micro_orders("warm", 10):
            one_order(ledger, leases, order, time.time)
        figures: dict[str, Any] = {}
        for name, threads in (("sequential", 1), (f"{MICRO_THREADS}_threads", MICRO_THREADS)):
            orders = micro_orders(name, count)
            chunks = [orders[i::threads] for i in range(threads)]
            counter = SyncCounter(server.pid, directory / f"perf-{name}.csv")
            counters.append(counter)
            before = RedisSnapshot.take(client)
            redis_cpu = cpu_seconds(server.pid, False)

            def run(chunk: list[MicroOrder]) -> None:
                for order in chunk:
                    one_order(ledger, leases, order, time.time)

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for future in [pool.submit(run, chunk) for chunk in chunks]:
                    future.result(timeout=600)  # raises what the thread raised
            wall = time.perf_counter() - started
            redis_used = cpu_seconds(server.pid, False) - redis_cpu
            delta = RedisSnapshot.take(client).since(before)
            fsyncs = counter.stop()
            figures[name] = {"threads": threads, "orders": count,
                             "ms_per_order": 1000 * wall / count,
                             "orders_per_s": count / wall,
                             "redis_cpu_ms_per_order": 1000 * redis_used / count,
                             **redis_figures(delta, fsyncs, count)}
    finally:
        for counter in counters:
            counter.close()
        client.close()
        server.stop()
    return figures


def disk_fdatasync(directory: Path, count: int = 200) -> dict[str, float]:
    """The disk's own price: append 200 bytes and fdatasync, ``count`` times."""
    path = directory / "fdatasync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    took = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 200)
            started = time.perf_counter()
            os.fdatasync(fd)
            took.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    took.sort()
    return {"median_ms": 1000 * statistics.median(took),
            "p99_ms": 1000 * took[min(len(took) - 1, int(0.99 * len(took)))]}


# --- report -----------------------------------------------------------------------------
def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric figure's median over the rounds (the first round's for the rest)."""
    merged = dict(rows[0])
    for key, value in rows[0].items():
        values = [row[key] for row in rows]
        if isinstance(value, int | float) and not isinstance(value, bool) and None not in values:
            merged[key] = statistics.median(values)
    return merged


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def ratio(value: float | None, reference: float | None) -> str:
    return "n/a" if value is None or not reference else f"{value / reference:.2f}"


def print_tables(product_rows: dict[str, dict[str, Any]], micro_rows: dict[str, dict[str, Any]],
                 disk: dict[str, float]) -> None:
    print(f"\ndisk: fdatasync of a 200-byte append: median {disk['median_ms']:.3f} ms, "
          f"p99 {disk['p99_ms']:.3f} ms\n")
    print("| configuration | -c | orders/s | wall ms/order | worker CPU ms/order "
          "| Redis CPU ms/order | fsyncs/order | aof_delayed_fsync | Redis commands/order "
          "| scripts/order | wall vs (a) | worker CPU vs (a) |")
    print("| --- " * 12 + "|")
    for key, row in product_rows.items():
        name, concurrency = key.rsplit(" -c ", 1)
        ref = product_rows[f"{REFERENCE} -c {concurrency}"]
        print(f"| {name} | {concurrency} | {fmt(row['orders_per_s'], 1)} "
              f"| {fmt(row['wall_ms_per_order'])} | {fmt(row['worker_cpu_ms_per_order'])} "
              f"| {fmt(row['redis_cpu_ms_per_order'])} | {fmt(row['fsyncs_per_order'])} "
              f"| {fmt(row['aof_delayed_fsync'], 0)} | {fmt(row['commands_per_order'], 1)} "
              f"| {fmt(row['scripts_per_order'], 1)} "
              f"| {ratio(row['wall_ms_per_order'], ref['wall_ms_per_order'])} "
              f"| {ratio(row['worker_cpu_ms_per_order'], ref['worker_cpu_ms_per_order'])} |")
    threaded = f"{MICRO_THREADS}_threads"
    print(f"\nThe ledger alone: one order's writes (Ledger and Leases directly)\n\n"
          f"| configuration | commands/order | 1 client: ms/order | fsyncs/order | vs (a) "
          f"| {MICRO_THREADS} threads: ms/order | fsyncs/order | vs (a) |")
    print("| --- " * 8 + "|")
    ref = micro_rows[REFERENCE]
    for name, row in micro_rows.items():
        one, many = row["sequential"], row[threaded]
        print(f"| {name} | {fmt(one['commands_per_order'], 1)} | {fmt(one['ms_per_order'], 3)} "
              f"| {fmt(one['fsyncs_per_order'])} "
              f"| {ratio(one['ms_per_order'], ref['sequential']['ms_per_order'])} "
              f"| {fmt(many['ms_per_order'], 3)} | {fmt(many['fsyncs_per_order'])} "
              f"| {ratio(many['ms_per_order'], ref[threaded]['ms_per_order'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--orders", type=int, default=300, help="orders per product run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16],
                        help="worker pool sizes to try (-c)")
    parser.add_argument("--micro-orders", type=int, default=300,
                        help="orders per ledger-alone run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run everything this many times, report medians")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-durability-", dir="/tmp"))
    product_runs: dict[str, list[dict[str, Any]]] = {}
    micro_runs: dict[str, list[dict[str, Any]]] = {}
    disk = disk_fdatasync(base)
    started = time.monotonic()
    try:
        for round_ in range(args.rounds):
            # Rotate the order each round, so drift on a shared machine favours no one.
            names = list(CONFIGS)
            names = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in names:
                slug = f"r{round_}-{name.split()[0].strip('()')}"
                print(f"round {round_ + 1}: ledger alone, {name}", flush=True)
                micro_runs.setdefault(name, []).append(
                    micro(CONFIGS[name], args.micro_orders, base / f"{slug}-micro"))
            for concurrency in args.concurrency:
                for name in names:
                    slug = f"r{round_}-{name.split()[0].strip('()')}-c{concurrency}"
                    print(f"round {round_ + 1}: product, {name}, -c {concurrency}", flush=True)
                    row = product(CONFIGS[name], concurrency, args.orders, base / slug)
                    product_runs.setdefault(f"{name} -c {concurrency}", []).append(row)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(base)
    product_rows = {key: median_row(rows) for key, rows in sorted(
        product_runs.items(), key=lambda kv: (int(kv[0].rsplit(" ", 1)[1]), kv[0]))}
    micro_rows = {name: {kind: median_row([run[kind] for run in runs]) for kind in runs[0]}
                  for name, runs in micro_runs.items()}
    micro_rows = {name: micro_rows[name] for name in CONFIGS}
    print_tables(product_rows, micro_rows, disk)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": platform.platform(), "cpus": os.cpu_count(),
        "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                                check=False).stdout.strip(),
        "orders": args.orders, "micro_orders": args.micro_orders, "rounds": args.rounds,
        "concurrency": args.concurrency, "seconds": round(time.monotonic() - started, 1),
        "disk_fdatasync": disk, "product": product_rows, "ledger_alone": micro_rows,
        "product_per_round": product_runs,
    }, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
