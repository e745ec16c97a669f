"""What does a purchase cost the workers, next to a bare Celery chain and a plain script?

Everything real: Redis (a database and key prefix of this run's own), the
sandbox as a process of its own, one Celery worker (prefork, two processes) as
a process of its own. Measured in one run, so the ratios hold on a noisy machine:

- plain script: the same purchase (create, seats-auto, buyer data, pre-confirm,
  confirm) made by OneboxClient in a loop, one process: the ideal.
- bare chain of 6 (no-op): chains of trivial tasks (the broker hops alone).
- bare chain of 6 (POST): the reference of the cost target: six tasks, each
  making one POST to the sandbox with plain ``requests`` (bench/probe_tasks.py).
- bare chain of 6 (lean POST): the same with the session reading the
  environment once, as the product's does: the stricter reference.
- product: intents through submit_many -> the 2-task purchase chain -> results.

CPU per order: the script's own for the plain script, the workers' (main and
pool processes, from /proc) for the rest. Same pool, concurrency and number of
worker processes for every Celery row.
Usage: python bench/chain_hops.py [--orders 400] [--pool prefork] [-c 2] [--workers 1]
Prints a table and writes bench/results/chain_hops.json. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celery import chain  # noqa: E402

from fulfilment.config import Settings  # noqa: E402
from fulfilment.harness.cluster import Cluster, env_for  # noqa: E402
from fulfilment.harness.intents import auto_seat_intents  # noqa: E402
from fulfilment.harness.processes import (  # noqa: E402
    Child,
    SandboxProcess,
    cpu_seconds,
    wait_for,
)
from fulfilment.onebox import build_client  # noqa: E402
from fulfilment.wiring import redis_client  # noqa: E402
from schemas.intent import AutoItem, Buyer  # noqa: E402
from tasks.app import configure  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "chain_hops.json"




def plain_script(settings: Settings, orders: int) -> dict[str, float]:
    client = build_client(settings, redis_client(settings))
    buyer = Buyer(email="bench@example.com")
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(orders):
        order = client.create_order()
        client.add_seats_auto(order.id, AutoItem(session_id=1002, price_type_id=3, quantity=1))
        client.set_buyer(order.id, buyer)
        client.pre_confirm(order.id)
        client.confirm(order.id, f"plain-{i}")
    wall, used = time.perf_counter() - started, time.process_time() - cpu
    client.close()
    return {"orders_per_s": orders / wall, "cpu_ms_per_order": 1000 * used / orders}


def _worker_cpu(workers: list[Child]) -> float:
    return sum(cpu_seconds(w.pid) for w in workers)


def bare_chains(workers: list[Child], task: str, length: int, count: int) -> dict[str, float]:
    from bench import probe_tasks

    probe = getattr(probe_tasks, task)
    seen = sum(w.output().count("succeeded") for w in workers)
    before, started = _worker_cpu(workers), time.perf_counter()
    for i in range(count):
        chain(probe.si(f"c{i}"), *[probe.s() for _ in range(length - 1)]).apply_async()
    # No result backend: wait until the workers have run every task of every chain.
    wait_for(lambda: sum(w.output().count("succeeded") for w in workers) - seen
             >= length * count, timeout=600, what="the bare chains", interval=0.2)
    wall = time.perf_counter() - started
    return {"orders_per_s": count / wall,
            "cpu_ms_per_order": 1000 * (_worker_cpu(workers) - before) / count}


def product(cluster: Cluster, workers: list[Child], orders: int) -> dict[str, float]:
    from tasks import submit_many

    tag = uuid.uuid4().hex[:6]
    documents = auto_seat_intents(f"bench-{tag}", orders)
    before, started = _worker_cpu(workers), time.perf_counter()
    accepted = sum(1 for s in submit_many(documents) if s.status == "accepted")
    cluster.collect({d["reference"] for d in documents}, timeout=600)
    wall = time.perf_counter() - started
    assert accepted == orders
    return {"orders_per_s": orders / wall,
            "cpu_ms_per_order": 1000 * (_worker_cpu(workers) - before) / orders}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=400)
    parser.add_argument("--pool", default="prefork", choices=["prefork", "threads"])
    parser.add_argument("-c", "--concurrency", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Celery rows run this many times, interleaved; medians shown")
    args = parser.parse_args()
    tmp = Path(f"/tmp/bench-chain-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    sandbox = SandboxProcess(tmp / "sandbox.log")
    settings = Settings.defaults().with_overrides(
        onebox_api_url=sandbox.url, redis_url="redis://127.0.0.1:6379/10",
        broker_url="redis://127.0.0.1:6379/10", key_prefix=f"bench-{uuid.uuid4().hex[:6]}",
        require_durable_redis=False)  # the machine's Redis; bench/durability_cost.py has both
    configure(settings)
    cluster = Cluster(settings, sandbox, tmp)
    rows: dict[str, dict[str, float]] = {}
    try:
        rows["plain script (ideal)"] = plain_script(settings, args.orders)
        keys = cluster.keys
        workers = []
        for n in range(args.workers):
            worker = Child([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-l", "INFO",
                            "-P", args.pool, "-c", str(args.concurrency), "-n", f"bench{n}@%h",
                            "-I", "bench.probe_tasks",
                            "-Q", f"{keys.continue_queue},{keys.live_queue},{keys.task_queue}",
                            "--without-gossip", "--without-mingle", "--without-heartbeat"],
                           tmp / f"worker{n}.log", {**env_for(settings), "PYTHONPATH": str(ROOT)})
            cluster.workers.append(worker)
            workers.append(worker)
        wait_for(lambda: all("ready." in w.output() for w in workers), timeout=60,
                 what="the workers")
        rounds: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.rounds):  # interleaved, so a noisy minute blurs every row alike
            measures: list[tuple[str, Callable[[], dict[str, float]]]] = [
                ("bare chain of 6 tasks (no-op)",
                 lambda: bare_chains(workers, "noop", 6, args.orders)),
                ("bare chain of 6 tasks (POST)",
                 lambda: bare_chains(workers, "post", 6, args.orders)),
                ("bare chain of 6 (lean POST)",
                 lambda: bare_chains(workers, "post_lean", 6, args.orders)),
                ("product (2-task purchase chain)",
                 lambda: product(cluster, workers, args.orders))]
            for name, measured in measures:
                rounds.setdefault(name, []).append(measured())
        for name, runs in rounds.items():
            rows[name] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    finally:
        cluster.stop()
        client = redis_client(settings)
        for key in client.scan_iter(f"{settings.key_prefix}*"):
            client.delete(key)
    ideal = rows["plain script (ideal)"]["orders_per_s"]
    bare = rows["bare chain of 6 tasks (POST)"]["cpu_ms_per_order"]
    print(f"\n{args.workers} worker process(es), {args.pool} -c {args.concurrency}, "
          f"{args.orders} orders a row, medians of {args.rounds} rounds, zero added latency")
    print(f"{'':34} {'orders/s':>10} {'vs script':>10} {'CPU ms/order':>13} {'vs bare POST':>13}")
    for name, row in rows.items():
        print(f"{name:34} {row['orders_per_s']:10.1f} {row['orders_per_s'] / ideal:10.2f} "
              f"{row['cpu_ms_per_order']:13.2f} {row['cpu_ms_per_order'] / bare:13.2f}")
    out = RESULTS if args.workers == 1 else RESULTS.with_name(f"chain_hops-{args.workers}w.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                   "orders": args.orders, "pool": args.pool,
                                   "concurrency": args.concurrency,
                                   "worker_processes": args.workers, "rounds": args.rounds,
                                   "rows": rows},
                                  indent=2) + "\n")
    print(f"\nwritten to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
