"""A bulk upload end to end: 10,000 intents with ``fulfilment submit --wait``, 50 ms per call.

Everything real: a private redis-server with ``appendfsync always`` (ledger and
broker, as production runs them), the sandbox as a process of its own adding
50 ms to every call (fault plan ``{"endpoints": {"*": {"latency_ms": 50}}}``),
Celery workers as processes of their own (prefork), and ``fulfilment submit
FILE --wait`` as the user runs it: the wall time from start to the summary,
orders/s, and every intent's outcome from the results file it writes. In the
same run, two references:

- the ideal: concurrency / (5 calls x 50 ms), what the workers' slots allow;
- a plain script: the same five calls with ``OneboxClient`` from as many
  threads as the workers have slots, no Celery, no ledger (what the API and
  this machine allow at that concurrency).

Usage: python bench/bulk.py [--intents 10000] [--workers 2] [--concurrency 16]
Prints a table and writes bench/results/bulk.json. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fulfilment.config import Settings  # noqa: E402
from fulfilment.harness.cluster import Cluster, env_for  # noqa: E402
from fulfilment.harness.processes import (  # noqa: E402
    Child,
    RedisServer,
    SandboxProcess,
    cpu_seconds,
    free_port,
    run_measured,
    wait_for,
)
from fulfilment.onebox import build_client  # noqa: E402
from fulfilment.wiring import redis_client  # noqa: E402
from schemas.intent import AutoItem, Buyer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "bulk.json"
CALLS_PER_ORDER = 5  # create, seats-auto, buyer data, pre-confirm, confirm
LATENCY_MS = 50


def plain_threads(settings: Settings, threads: int, seconds: float) -> dict[str, float]:
    """The same five calls from ``threads`` threads for ``seconds``: orders/s."""
    done = Counter[str]()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(index: int) -> None:
        client = build_client(settings, redis_client(settings))
        buyer = Buyer(email="bench@example.com")
        n = 0
        while time.monotonic() < stop:
            order = client.create_order()
            client.add_seats_auto(order.id, AutoItem(session_id=1002, price_type_id=3,
                                                     quantity=1))
            client.set_buyer(order.id, buyer)
            client.pre_confirm(order.id)
            client.confirm(order.id, f"plain-{index}-{n}")
            n += 1
        client.close()
        with lock:
            done["orders"] += n

    started = time.monotonic()
    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.monotonic() - started
    return {"orders": done["orders"], "wall_s": wall, "orders_per_s": done["orders"] / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intents", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16, help="Per worker process.")
    parser.add_argument("--pool", choices=["prefork", "threads"], default="prefork")
    parser.add_argument("--reference-seconds", type=float, default=20.0)
    parser.add_argument("--latency-ms", type=int, default=LATENCY_MS,
                        help="Added by the sandbox to every call.")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    server = RedisServer(tmp / "redis", free_port(), appendfsync="always")
    sandbox = SandboxProcess(tmp / "sandbox.log")
    slots = args.workers * args.concurrency
    settings = Settings.defaults().with_overrides(
        onebox_api_url=sandbox.url, redis_url=server.url, broker_url=server.url,
        key_prefix=f"bench-{uuid.uuid4().hex[:6]}", require_durable_redis=True)
    cluster = Cluster(settings, sandbox, tmp)
    env = {**{k: v for k, v in os.environ.items()
              if not k.startswith(("ONEBOX_", "FULFILMENT_"))},
           **env_for(settings), "PYTHONPATH": str(ROOT)}
    try:
        sandbox.admin.set_faults({"endpoints": {"*": {"latency_ms": args.latency_ms}}})
        reference = plain_threads(settings, slots, args.reference_seconds)
        source = tmp / "intents.jsonl"
        with source.open("w") as out:
            for i in range(args.intents):
                out.write(json.dumps({
                    "reference": f"bulk-{i}", "buyer": {"email": "bench@example.com"},
                    "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]}) + "\n")
        workers: list[Child] = [cluster.start_worker(concurrency=args.concurrency,
                                                     pool=args.pool)
                                for _ in range(args.workers)]
        for worker in workers:
            wait_for(lambda w=worker: "ready." in w.output(), timeout=120,  # type: ignore[misc]
                     what="a worker")
        cpu_before = sum(cpu_seconds(w.pid) for w in workers)
        results = tmp / "results.jsonl"
        done = run_measured([sys.executable, "-m", "tasks.commands", "submit", str(source),
                             "--batch", "bench-bulk", "--wait", "--results", str(results)],
                            env, timeout=7200, directory=tmp)
        worker_cpu = sum(cpu_seconds(w.pid) for w in workers) - cpu_before
        if done.returncode != 0:
            raise SystemExit(f"submit --wait failed:\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in results.read_text().splitlines()]
        statuses = Counter(row["status"] for row in rows)
        audit = sandbox.admin.audit()
        confirmed_at_onebox = sum(1 for ref in audit["confirmed"] if ref.startswith("bulk-"))
        product = {
            "intents": args.intents, "wall_s": done.wall,
            "orders_per_s": len(rows) / done.wall, "outcomes": len(rows),
            "statuses": dict(statuses),
            "without_outcome": args.intents - len({row["reference"] for row in rows}),
            "duplicate_orders": len(audit["duplicates"]),
            "confirmed_at_onebox": confirmed_at_onebox,
            "worker_cpu_ms_per_order": 1000 * worker_cpu / max(len(rows), 1),
            "submit_peak_rss_mib": done.peak_rss_kib / 1024,
        }
    finally:
        cluster.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    ideal = slots * 1000 / (CALLS_PER_ORDER * max(args.latency_ms, 1))
    table: list[tuple[str, float, str]] = [
        (f"ideal: {slots} slots / ({CALLS_PER_ORDER} calls x {args.latency_ms} ms)", ideal, ""),
        (f"plain script, {slots} threads, no Celery (reference)", reference["orders_per_s"],
         f"{reference['orders']} orders in {reference['wall_s']:.0f} s"),
        (f"submit --wait, {args.workers} x {args.pool} -c {args.concurrency}",
         product["orders_per_s"],
         f"{args.intents:,} intents in {product['wall_s']:.0f} s; {dict(statuses)}; "
         f"{product['without_outcome']} without outcome; "
         f"{product['duplicate_orders']} duplicate orders; worker CPU "
         f"{product['worker_cpu_ms_per_order']:.1f} ms/order"),
    ]
    print(f"\n{'':52} {'orders/s':>9} {'vs ideal':>9} {'vs plain':>9}")
    for name, value, note in table:
        print(f"{name:52} {value:9.1f} {value / ideal:9.2f} "
              f"{value / reference['orders_per_s']:9.2f}  {note}")
    written = RESULTS if args.intents <= 10_000 else RESULTS.with_name(f"bulk-{args.intents}.json")
    written.parent.mkdir(exist_ok=True)
    written.write_text(json.dumps({
        "machine": platform.platform(), "cpus": os.cpu_count(), "latency_ms": args.latency_ms,
        "workers": args.workers, "pool": args.pool, "concurrency": args.concurrency,
        "ideal_orders_per_s": ideal,
        "plain_threads": reference, "product": product}, indent=2) + "\n")
    print(f"\nwritten to {written.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
