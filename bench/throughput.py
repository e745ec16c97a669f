"""Orders/s at 50 ms per Onebox call, by pool, concurrency and worker processes.

Everything real and durable: a private redis-server with ``appendfsync always``
(ledger and broker), the sandbox as a process of its own adding 50 ms to every
call, Celery workers as processes of their own, intents admitted with
``submit_many`` and their outcomes read from the results queue. Each row sets
the product beside two references measured in the same run:

- the ideal: slots / (5 calls x 50 ms), what the workers' slots allow;
- a plain script: the same five calls with ``OneboxClient`` from as many
  threads as the workers have slots, no Celery, no ledger.

Where the workers' CPU is saturated (this machine has two cores, shared with
Redis, the sandbox and the producer), the ideal is out of reach whatever the
design: the table says so, and gives orders/s per core of worker CPU.

Usage: python bench/throughput.py [--rows all|quick] [--seconds 15]
Prints a table and writes bench/results/throughput.json. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bulk import CALLS_PER_ORDER, LATENCY_MS, plain_threads  # noqa: E402
from fulfilment.config import Settings  # noqa: E402
from fulfilment.harness.cluster import Cluster, env_for  # noqa: E402
from fulfilment.harness.intents import auto_seat_intents  # noqa: E402
from fulfilment.harness.processes import (  # noqa: E402
    Child,
    RedisServer,
    SandboxProcess,
    cpu_seconds,
    free_port,
    wait_for,
    worker_args,
)
from tasks.app import configure  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "throughput.json"
#: Worker CPU above this share of the machine's cores counts as saturated.
SATURATED = 0.8


@dataclass(frozen=True)
class Shape:
    pool: str
    concurrency: int
    processes: int = 1

    @property
    def slots(self) -> int:
        return self.concurrency * self.processes

    @property
    def ideal(self) -> float:
        return self.slots * 1000 / (CALLS_PER_ORDER * LATENCY_MS)

    def __str__(self) -> str:
        return f"{self.processes} x {self.pool} -c {self.concurrency}"


ROWS = {
    "all": [Shape("prefork", 4), Shape("prefork", 16), Shape("prefork", 64),
            Shape("threads", 4), Shape("threads", 16), Shape("threads", 64),
            Shape("threads", 16, 2), Shape("threads", 16, 4)],
    "quick": [Shape("prefork", 4), Shape("threads", 16), Shape("threads", 16, 2)],
}


def start_workers(cluster: Cluster, shape: Shape, tmp: Path) -> list[Child]:
    keys = cluster.keys
    env = {**env_for(cluster.settings), "PYTHONPATH": str(ROOT)}
    queues = [keys.continue_queue, keys.live_queue, keys.task_queue]
    workers = [Child(worker_args(queues, f"t{n}@%h",
                                 concurrency=shape.concurrency, pool=shape.pool),
                     tmp / f"worker-{shape.pool}-{shape.concurrency}-{n}.log", env)
               for n in range(shape.processes)]
    cluster.workers.extend(workers)
    wait_for(lambda: all(" ready." in w.output() for w in workers), timeout=120,
             what="the workers")
    return workers


def redis_load(server: RedisServer) -> tuple[int, float]:
    """Commands Redis has run (a script's own commands included) and its CPU seconds."""
    client = redis.Redis.from_url(server.url)
    stats, cpu = client.info("commandstats"), client.info("cpu")
    commands = sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
    return commands, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def measure(cluster: Cluster, server: RedisServer, shape: Shape, seconds: float,
            tmp: Path) -> dict[str, float]:
    from tasks import submit_many

    workers = start_workers(cluster, shape, tmp)
    # Enough intents to keep every slot busy for about ``seconds`` at the ideal rate,
    # bounded by what two cores can buy in about twice that.
    count = int(min(shape.ideal, 60.0) * seconds)
    tag = uuid.uuid4().hex[:6]
    documents = auto_seat_intents(f"tp-{tag}", count)
    commands_before, redis_cpu_before = redis_load(server)
    cpu_before, started = sum(cpu_seconds(w.pid) for w in workers), time.perf_counter()
    accepted = sum(1 for s in submit_many(documents) if s.status == "accepted")
    outcomes = cluster.collect({d["reference"] for d in documents}, timeout=900)
    wall = time.perf_counter() - started
    worker_cpu = sum(cpu_seconds(w.pid) for w in workers) - cpu_before
    commands, redis_cpu = redis_load(server)
    for worker in workers:
        worker.stop()
        cluster.workers.remove(worker)
    confirmed = sum(1 for o in outcomes.values() if o.status == "confirmed")
    cores = worker_cpu / wall
    return {"intents": count, "accepted": accepted, "confirmed": confirmed, "wall_s": wall,
            "orders_per_s": count / wall, "worker_cpu_ms_per_order": 1000 * worker_cpu / count,
            "worker_cores_busy": cores, "orders_per_s_per_core": count / wall / cores,
            "redis_commands_per_order": (commands - commands_before) / count,
            "redis_cpu_ms_per_order": 1000 * (redis_cpu - redis_cpu_before) / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", choices=sorted(ROWS), default="all")
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="About how long each row buys for (and the plain script runs).")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    server = RedisServer(tmp / "redis", free_port(), appendfsync="always")
    sandbox = SandboxProcess(tmp / "sandbox.log")
    settings = Settings.defaults().with_overrides(
        onebox_api_url=sandbox.url, redis_url=server.url, broker_url=server.url,
        key_prefix=f"bench-{uuid.uuid4().hex[:6]}", require_durable_redis=True,
        metrics_port=0)
    configure(settings)
    cluster = Cluster(settings, sandbox, tmp)
    rows: list[tuple[Shape, dict[str, float], dict[str, float]]] = []
    try:
        sandbox.admin.set_faults({"endpoints": {"*": {"latency_ms": LATENCY_MS}}})
        for shape in ROWS[args.rows]:
            plain = plain_threads(settings, shape.slots, args.seconds)
            product = measure(cluster, server, shape, args.seconds, tmp)
            rows.append((shape, plain, product))
            print(f"{shape}: {product['orders_per_s']:.1f} orders/s", flush=True)
    finally:
        cluster.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    cpus = os.cpu_count() or 1
    print(f"\n{LATENCY_MS} ms per call, durable Redis, {cpus} cores shared by everything")
    print(f"{'workers':24} {'orders/s':>9} {'ideal':>7} {'vs ideal':>9} {'plain':>7} "
          f"{'vs plain':>9} {'CPU ms/order':>13} {'cores busy':>11} {'per core':>9}")
    for shape, plain, product in rows:
        busy = product["worker_cores_busy"]
        note = "  CPU-saturated" if busy >= SATURATED * cpus else ""
        print(f"{shape!s:24} {product['orders_per_s']:9.1f} {shape.ideal:7.0f} "
              f"{product['orders_per_s'] / shape.ideal:9.2f} {plain['orders_per_s']:7.1f} "
              f"{product['orders_per_s'] / plain['orders_per_s']:9.2f} "
              f"{product['worker_cpu_ms_per_order']:13.1f} {busy:11.2f} "
              f"{product['orders_per_s_per_core']:9.1f}{note}")
    commands = statistics.median(p["redis_commands_per_order"] for _, _, p in rows)
    redis_ms = statistics.median(p["redis_cpu_ms_per_order"] for _, _, p in rows)
    print(f"\nRedis (ledger and broker, appendfsync always): {commands:.0f} commands and "
          f"{redis_ms:.2f} ms of its CPU per order (medians): one Redis core carries about "
          f"{1000 / redis_ms:,.0f} orders/s")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": platform.platform(), "cpus": cpus, "latency_ms": LATENCY_MS,
        "rows": [{"shape": str(shape), "pool": shape.pool, "concurrency": shape.concurrency,
                  "processes": shape.processes, "ideal_orders_per_s": shape.ideal,
                  "plain_orders_per_s": plain["orders_per_s"], **product}
                 for shape, plain, product in rows]}, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
