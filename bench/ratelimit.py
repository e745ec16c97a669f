"""Do four workers together keep to one rate limit toward Onebox?

Everything real: the machine's Redis (a database and key prefix of this run's
own), the sandbox as a process of its own with its rate limit on (a token bucket
of `--limit` calls/s, burst `--limit`: it answers 429 past it), and four Celery
workers (prefork, two processes each) as processes of their own. The same
orders go through twice, each run on a fresh sandbox:

- our limiter: `ONEBOX_RATE_LIMIT=--limit`, shared by the four workers in Redis;
- the reference: no limiter of ours (`ONEBOX_RATE_LIMIT=0`), only Onebox's 429s.

Calls per second are counted by the sandbox, each call in the second it arrived
(the audit's `per_second`), from the first call to the last.
Usage: python bench/ratelimit.py [--orders 300] [--limit 40]
Prints a table and writes bench/results/ratelimit.json. Loopback only.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fulfilment.config import Settings  # noqa: E402
from fulfilment.harness.cluster import Cluster  # noqa: E402
from fulfilment.harness.intents import auto_seat_intents  # noqa: E402
from fulfilment.harness.processes import SandboxProcess  # noqa: E402
from fulfilment.wiring import redis_client  # noqa: E402
from tasks.app import configure  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ratelimit.json"
REDIS_URL = "redis://127.0.0.1:6379/10"
WORKERS = 4
CONCURRENCY = 2


def run(name: str, limit: float, ours: bool, orders: int, tmp: Path) -> dict[str, Any]:
    from tasks import submit_many

    directory = tmp / name
    directory.mkdir(parents=True)
    sandbox = SandboxProcess(directory / "sandbox.log")
    sandbox.admin.set_faults({"rate_limit": {"per_second": limit, "burst": limit}})
    prefix = f"bench-rl-{uuid.uuid4().hex[:6]}"
    settings = Settings.defaults().with_overrides(
        onebox_api_url=sandbox.url, redis_url=REDIS_URL, broker_url=REDIS_URL, key_prefix=prefix,
        onebox_rate_limit=limit if ours else 0.0,
        require_durable_redis=False)  # the machine's Redis; this measures the API calls
    configure(settings)
    cluster = Cluster(settings, sandbox, directory)
    try:
        for _ in range(WORKERS):
            cluster.start_worker(concurrency=CONCURRENCY)
        documents = auto_seat_intents(name, orders)
        started = time.perf_counter()
        accepted = sum(1 for s in submit_many(documents) if s.status == "accepted")
        assert accepted == orders
        results = cluster.collect({d["reference"] for d in documents}, timeout=1800)
        wall = time.perf_counter() - started
        audit = sandbox.admin.audit()
        held_lines = sum(w.output().count("calls held back") for w in cluster.workers)
    finally:
        cluster.stop()
        client = redis_client(settings)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
    per_second = {int(s): c for s, c in audit["per_second"].items()}
    first, last = min(per_second), max(per_second)
    windows = [per_second.get(s, {"requests": 0, "rate_limited": 0})
               for s in range(first, last + 1)]
    calls = [w["requests"] for w in windows]
    statuses = [r.status for r in results.values()]
    return {
        "limiter": f"ours, {limit:g}/s" if ours else "none (reference)",
        "orders": orders,
        "confirmed": statuses.count("confirmed"),
        "failed": statuses.count("failed"),
        "wall_s": wall,
        "orders_per_s": orders / wall,
        "calls": sum(calls),
        "max_window": max(calls),
        "mean_window": statistics.mean(calls),
        "windows_over_limit": sum(1 for c in calls if c > limit),
        "http_429": sum(w["rate_limited"] for w in windows),
        "held_back_log_lines": held_lines,
        "calls_per_second": calls,
        "429_per_second": [w["rate_limited"] for w in windows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--limit", type=float, default=40.0)
    args = parser.parse_args()
    tmp = Path(f"/tmp/bench-ratelimit-{uuid.uuid4().hex[:6]}")
    rows = [run("ours", args.limit, True, args.orders, tmp),
            run("reference", args.limit, False, args.orders, tmp)]
    print(f"\n{WORKERS} workers x {CONCURRENCY} processes, {args.orders} orders, the sandbox "
          f"refusing more than {args.limit:g} calls/s (burst {args.limit:g})\n")
    head = ("limiter", "confirmed", "failed", "orders/s", "calls", "max calls in a 1-s window",
            "mean calls/s", f"windows over {args.limit:g}", "429s seen")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for row in rows:
        cells = (row["limiter"], row["confirmed"], row["failed"], f"{row['orders_per_s']:.1f}",
                 row["calls"], row["max_window"], f"{row['mean_window']:.1f}",
                 row["windows_over_limit"], row["http_429"])
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for row in rows:
        print(f"\ncalls per second, {row['limiter']}: "
              + " ".join(str(c) for c in row["calls_per_second"]))
        if row["http_429"]:
            print(f"429s per second, {row['limiter']}: "
                  + " ".join(str(c) for c in row["429_per_second"]))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                   "workers": WORKERS, "concurrency": CONCURRENCY,
                                   "limit": args.limit, "orders": args.orders, "rows": rows},
                                  indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
