"""Lanes and fair shares: live latency while bulk runs, shop B's share, the bulk rate kept.

Everything real, on the durable configuration: a private redis-server with
``appendfsync always`` (ledger and broker), the sandbox as a process of its
own adding 50 ms to every call, 2 Celery workers ``-P threads -c 16`` and
celery beat, each a process of its own. In one run (issue 15's "Measure"):

1. references: the five calls of one order made one after another by a plain
   client (a live intent's floor), and live intents on the idle fleet;
2. alone: shop A's file (``fulfilment submit FILE``, bulk lane) on its own:
   the bulk rate the fleet gives one shop;
3. together: shop A's file again (new references), shop B's file 5 s later,
   and a storefront submitting one live intent every 0.5 s throughout.

Reported: live time to outcome (``finished_at - submitted_at``) p50 and p99
beside the five calls' own time (goal p99 <= 1.0 s); shop B's completion time
beside its fair share (B's lines at half the fleet's bulk rate alone; goal
<= 1.5x); the bulk rate together beside alone (goal >= 0.9); and the flow
control's own cost on the same Redis: commands and round trips per intent.

Usage: python bench/lanes.py [--a-lines 10000] [--b-lines 1000] [--workers 2]
Prints a table and writes bench/results/lanes.json (lanes-N.json for another
--a-lines). Loopback only.
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
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from fulfilment.config import Settings  # noqa: E402
from fulfilment.harness.cluster import Cluster, env_for  # noqa: E402
from fulfilment.harness.processes import (  # noqa: E402
    Child,
    RedisServer,
    SandboxProcess,
    free_port,
    wait_for,
)
from fulfilment.keys import Keys  # noqa: E402
from fulfilment.onebox import build_client  # noqa: E402
from fulfilment.release import BulkRelease  # noqa: E402
from fulfilment.wiring import redis_client  # noqa: E402
from schemas.intent import AutoItem, Buyer  # noqa: E402
from schemas.result import OrderResult  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "lanes.json"
LATENCY_MS = 50


def intent(reference: str, **extra: Any) -> dict[str, Any]:
    return {"reference": reference, "buyer": {"email": "bench@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}], **extra}


def write_file(path: Path, references: list[str], shop: str) -> None:
    with path.open("w") as out:
        for reference in references:
            out.write(json.dumps(intent(reference, shop=shop)) + "\n")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(share * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


def five_calls(settings: Settings, times: int) -> list[float]:
    """The five calls of one order, one after another, from a plain client: seconds each."""
    client = build_client(settings, redis_client(settings))
    took = []
    for n in range(times):
        started = time.monotonic()
        order = client.create_order()
        client.add_seats_auto(order.id, AutoItem(session_id=1002, price_type_id=3, quantity=1))
        client.set_buyer(order.id, Buyer(email="bench@example.com"))
        client.pre_confirm(order.id)
        client.confirm(order.id, f"plain-{n}")
        took.append(time.monotonic() - started)
    client.close()
    return took


def to_outcome(result: OrderResult) -> float:
    assert result.finished_at is not None and result.submitted_at is not None
    return (result.finished_at - result.submitted_at).total_seconds()


def upload(env: dict[str, str], tmp: Path, path: Path, batch: str) -> Child:
    """``fulfilment submit FILE`` (bulk lane, the default), as a shop would run it."""
    return Child([sys.executable, "-m", "tasks.commands", "submit", str(path), "--batch", batch,
                  "--quiet"], tmp / f"submit-{batch}.log", env)


class Storefront(threading.Thread):
    """One live intent every ``every`` seconds until stopped (``submit``: the live lane)."""

    def __init__(self, tag: str, every: float) -> None:
        super().__init__(name=f"storefront-{tag}", daemon=True)
        self.tag, self.every = tag, every
        self.references: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        from tasks import submit

        n = 0
        while not self.stopping.is_set():
            reference = f"{self.tag}-{n}"
            answer = submit(intent(reference, shop="storefront"))
            assert (answer.status, answer.lane) == ("accepted", "live"), answer
            self.references.append(reference)
            n += 1
            self.stopping.wait(self.every)


def bulk_span(results: dict[str, OrderResult], references: list[str]) -> tuple[float, float]:
    """First submitted_at and last finished_at of these references (epoch seconds)."""
    first = min(results[r].submitted_at.timestamp() for r in references  # type: ignore[union-attr]
                if results[r].submitted_at)
    last = max(results[r].finished_at.timestamp() for r in references  # type: ignore[union-attr]
               if results[r].finished_at)
    return first, last


def release_cost(url: str, intents: int, bound: int) -> dict[str, float]:
    """Flow control alone on the same Redis: park ``intents`` (two shops, 500 a call), then
    release them all by top-ups, one finished per call, as workers do."""
    client = redis.Redis.from_url(url)
    keys = Keys(f"cost-{uuid.uuid4().hex[:6]}")
    release = BulkRelease(client, keys, in_flight=bound, clock=time.time)
    before = int(client.info("stats")["total_commands_processed"])
    started = time.perf_counter()
    for shop in ("a", "b"):
        refs = [f"{shop}{n}" for n in range(intents // 2)]
        for start in range(0, len(refs), 500):
            release.park(shop, refs[start:start + 500])
    parked = time.perf_counter()
    round_trips = 0
    in_flight = release.release(limit=bound)
    round_trips += 1
    while in_flight:
        finished = in_flight.pop(0)
        in_flight += release.release(finished=finished, limit=4)
        round_trips += 1
    done = time.perf_counter()
    commands = int(client.info("stats")["total_commands_processed"]) - before
    inside = client.info("commandstats")
    client.delete(*client.keys(f"{keys.prefix}:*") or ["none"])
    client.close()
    return {"intents": intents, "bound": bound,
            "park_us_per_intent": 1e6 * (parked - started) / intents,
            "release_us_per_intent": 1e6 * (done - parked) / intents,
            "round_trips_per_intent": (round_trips + intents / 500) / intents,
            "server_commands_per_intent": commands / intents,
            "lua_calls": sum(int(v.get("calls", 0)) for k, v in inside.items()
                             if k in {"cmdstat_evalsha", "cmdstat_eval"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a-lines", type=int, default=10_000)
    parser.add_argument("--b-lines", type=int, default=1_000)
    parser.add_argument("--b-after", type=float, default=5.0, help="Seconds after A's start.")
    parser.add_argument("--live-every", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--in-flight", type=int, default=64,
                        help="FULFILMENT_BULK_IN_FLIGHT.")
    parser.add_argument("--latency-ms", type=int, default=LATENCY_MS)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-lanes-"))
    server = RedisServer(tmp / "redis", free_port(), appendfsync="always")
    sandbox = SandboxProcess(tmp / "sandbox.log")
    settings = Settings.defaults().with_overrides(
        onebox_api_url=sandbox.url, redis_url=server.url, broker_url=server.url,
        key_prefix=f"bench-{uuid.uuid4().hex[:6]}", require_durable_redis=True,
        bulk_in_flight=args.in_flight, retry_deadline=3600)
    cluster = Cluster(settings, sandbox, tmp)
    env = {**{k: v for k, v in os.environ.items()
              if not k.startswith(("ONEBOX_", "FULFILMENT_"))},
           **env_for(settings), "PYTHONPATH": str(ROOT)}
    from tasks.app import configure

    configure(settings)  # this process is the storefront and reads the results
    out: dict[str, Any] = {}
    try:
        sandbox.admin.set_faults({"endpoints": {"*": {"latency_ms": args.latency_ms}}})
        calls = five_calls(settings, 20)
        workers = [cluster.start_worker(concurrency=args.concurrency, pool="threads")
                   for _ in range(args.workers)]
        cluster.start_beat()
        for worker in workers:
            wait_for(lambda w=worker: " ready." in w.output(), timeout=120,  # type: ignore[misc]
                     what="a worker")
        # 1. live intents on the idle fleet
        idle = Storefront("idle", args.live_every)
        idle.start()
        time.sleep(10 * args.live_every)  # ten intents' worth of the storefront's pace
        idle.stopping.set()
        idle.join()
        idle_results = cluster.collect(set(idle.references), timeout=120)
        # 2. shop A's file alone
        alone = [f"alone-{n}" for n in range(args.a_lines)]
        write_file(tmp / "alone.jsonl", alone, "shop-a")
        submit = upload(env, tmp, tmp / "alone.jsonl", "alone")
        results = cluster.collect(set(alone), timeout=7200)
        assert submit.process.wait(timeout=600) == 0, submit.output()[-2000:]
        first, last = bulk_span(results, alone)
        rate_alone = len(alone) / (last - first)
        # 3. together: A's file, B's 5 s later, the storefront throughout
        shop_a = [f"a-{n}" for n in range(args.a_lines)]
        shop_b = [f"b-{n}" for n in range(args.b_lines)]
        write_file(tmp / "a.jsonl", shop_a, "shop-a")
        write_file(tmp / "b.jsonl", shop_b, "shop-b")
        live = Storefront("live", args.live_every)
        live.start()
        submit_a = upload(env, tmp, tmp / "a.jsonl", "shop-a")
        time.sleep(args.b_after)  # the scenario's own schedule, not a synchronisation
        b_started = time.time()
        submit_b = upload(env, tmp, tmp / "b.jsonl", "shop-b")
        together = cluster.collect({*shop_a, *shop_b}, timeout=7200)
        live.stopping.set()
        live.join()
        live_results = cluster.collect(set(live.references), timeout=120)
        for child in (submit_a, submit_b):
            assert child.process.wait(timeout=600) == 0, child.output()[-2000:]
        first_a, last_bulk = bulk_span(together, shop_a + shop_b)
        _, last_b = bulk_span(together, shop_b)
        rate_together = (len(shop_a) + len(shop_b)) / (last_bulk - first_a)
        during = [to_outcome(r) for r in live_results.values()
                  if r.submitted_at and first_a <= r.submitted_at.timestamp() <= last_bulk]
        b_time = last_b - b_started
        b_fair = len(shop_b) / (rate_alone / 2)
        statuses: dict[str, int] = {}
        for result in [*together.values(), *results.values(), *live_results.values()]:
            statuses[result.status] = statuses.get(result.status, 0) + 1
        audit = sandbox.admin.audit()
        out = {
            "five_calls_s": {"p50": statistics.median(calls), "p99": percentile(calls, 0.99)},
            "live_idle_s": {"n": len(idle_results),
                            "p50": statistics.median(map(to_outcome, idle_results.values())),
                            "p99": percentile([to_outcome(r) for r in idle_results.values()],
                                              0.99)},
            "live_during_bulk_s": {"n": len(during), "p50": statistics.median(during),
                                   "p99": percentile(during, 0.99), "max": max(during)},
            "bulk_alone_orders_per_s": rate_alone,
            "bulk_together_orders_per_s": rate_together,
            "shop_b_s": b_time, "shop_b_fair_share_s": b_fair,
            "statuses": statuses, "duplicate_orders": len(audit["duplicates"]),
        }
    finally:
        cluster.stop()
    out["flow_control_cost"] = release_cost(server.url, 10_000, args.in_flight)
    server.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    live_p99, floor = out["live_during_bulk_s"]["p99"], out["five_calls_s"]["p50"]
    rows = [
        ("five calls, one after another (plain client)", f"{floor:.3f} s p50", "", ""),
        ("live, idle fleet: time to outcome", f"{out['live_idle_s']['p50']:.3f} s p50",
         f"{out['live_idle_s']['p99']:.3f} s p99", ""),
        ("live, while the bulk runs: time to outcome",
         f"{out['live_during_bulk_s']['p50']:.3f} s p50", f"{live_p99:.3f} s p99",
         f"goal p99 <= 1.0 s: {'met' if live_p99 <= 1.0 else 'missed'} "
         f"(n={out['live_during_bulk_s']['n']})"),
        (f"shop B ({args.b_lines:,} lines) done after", f"{out['shop_b_s']:.1f} s",
         f"fair share {out['shop_b_fair_share_s']:.1f} s",
         f"{out['shop_b_s'] / out['shop_b_fair_share_s']:.2f}x (goal <= 1.5x)"),
        (f"bulk orders/s, A {args.a_lines:,} + B together", f"{rate_together:.1f}",
         f"alone {rate_alone:.1f}", f"{rate_together / rate_alone:.2f} (goal >= 0.9)"),
    ]
    cost = out["flow_control_cost"]
    print(f"\n{args.workers} workers x threads -c {args.concurrency}, "
          f"{args.latency_ms} ms per call, in flight {args.in_flight}; {out['statuses']}, "
          f"{out['duplicate_orders']} duplicate orders")
    for name, a, b, c in rows:
        print(f"{name:48} {a:>14} {b:>18}  {c}")
    print(f"flow control on this Redis (appendfsync always): "
          f"{cost['server_commands_per_intent']:.2f} commands (calls) per intent, "
          f"{cost['round_trips_per_intent']:.3f} round trips per intent, park "
          f"{cost['park_us_per_intent']:.0f} us + release {cost['release_us_per_intent']:.0f} "
          f"us per intent")
    written = RESULTS if args.a_lines == 10_000 else \
        RESULTS.with_name(f"lanes-{args.a_lines}.json")
    written.parent.mkdir(exist_ok=True)
    written.write_text(json.dumps({
        "machine": platform.platform(), "cpus": os.cpu_count(), "latency_ms": args.latency_ms,
        "workers": args.workers, "pool": "threads", "concurrency": args.concurrency,
        "a_lines": args.a_lines, "b_lines": args.b_lines, "b_after_s": args.b_after,
        "live_every_s": args.live_every, "in_flight": args.in_flight, **out}, indent=2) + "\n")
    print(f"\nwritten to {written.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
