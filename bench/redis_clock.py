"""What does counting every stamp on Redis's clock cost per order?

Two measures, each beside its reference measured in the same run:

- a reading: ``RedisClock()`` (monotonic time plus an offset, one ``TIME``
  every ``REFRESH`` s) against ``time.time()``, the process's own clock;
- an order: intents driven through ``advance`` to a published outcome in this
  process (a scripted Onebox answering at once, a private redis-server), with
  the ledger and the flow on a ``RedisClock`` against the same on the process's
  clock: Redis commands per order (``INFO commandstats`` deltas) and this
  process's CPU per order.

Usage: python bench/redis_clock.py [--orders 300] [--rounds 3]
Prints a table and writes bench/results/redis_clock.json. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from kombu import Connection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fulfilment.clock import REFRESH, RedisClock  # noqa: E402
from fulfilment.config import Settings  # noqa: E402
from fulfilment.flow import Proceed, Services, Stage, advance  # noqa: E402
from fulfilment.harness.processes import RedisServer, free_port  # noqa: E402
from fulfilment.keys import Keys  # noqa: E402
from fulfilment.lease import Leases  # noqa: E402
from fulfilment.ledger import Ledger  # noqa: E402
from fulfilment.results import ResultPublisher  # noqa: E402
from fulfilment.retry import RetryPolicy  # noqa: E402
from fulfilment.topology import Topology  # noqa: E402
from schemas.intent import load_intent  # noqa: E402
from tests.unit.test_flow import FakeOnebox  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "redis_clock.json"


def commands(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(value["calls"]) for value in stats.values())


def reading_ns(clock: Callable[[], float], number: int = 200_000) -> float:
    return min(timeit.repeat(clock, number=number, repeat=5)) / number * 1e9


def orders(client: redis.Redis, clock: Callable[[], float] | None, count: int) -> dict[str, float]:
    """Drive ``count`` intents to a published outcome; commands and CPU per order."""
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    with Connection("memory://localhost/") as connection:
        services = Services(
            settings=Settings.defaults().with_overrides(key_prefix=prefix),
            client=FakeOnebox(),  # type: ignore[arg-type]
            ledger=Ledger(client, keys, 3600, clock=clock),
            publisher=ResultPublisher(connection, Topology.for_keys(keys)),
            leases=Leases(client, keys, 60), policy=RetryPolicy(jitter=False))
        references = [f"o-{n}" for n in range(count)]
        before, cpu = commands(client), time.process_time()
        for reference in references:
            services.ledger.admit(load_intent({
                "reference": reference, "buyer": {"email": "bench@example.com"},
                "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]}))
            assert isinstance(advance(services, reference, Stage.PUBLISHED), Proceed)
        cpu = time.process_time() - cpu
        # INFO itself is one command; the deltas are read the same way in both rows.
        return {"commands_per_order": (commands(client) - before - 1) / count,
                "cpu_ms_per_order": cpu / count * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-clock-")), free_port(),
                         appendfsync=None)
    try:
        client = redis.Redis.from_url(server.url)
        clock = RedisClock(client)
        clock()
        rows: dict[str, dict[str, float]] = {
            "reading: time.time() (reference)": {"ns": reading_ns(time.time)},
            "reading: RedisClock()": {"ns": reading_ns(clock)},
        }
        local: list[dict[str, float]] = []
        shared: list[dict[str, float]] = []
        for _ in range(args.rounds):  # interleaved: the machine's load hits both alike
            shared.append(orders(client, None, args.orders))
            local.append(orders(client, time.time, args.orders))
        for name, runs in (("order: process clock (reference)", local),
                           ("order: Redis's clock", shared)):
            rows[name] = {key: min(run[key] for run in runs) for key in runs[0]}
    finally:
        server.stop()
    print(f"{'what':<36} {'ns/reading':>11} {'commands/order':>15} {'CPU ms/order':>13}")
    for name, row in rows.items():
        ns = f"{row['ns']:.0f}" if "ns" in row else "-"
        per = f"{row['commands_per_order']:.2f}" if "commands_per_order" in row else "-"
        cpu = f"{row['cpu_ms_per_order']:.2f}" if "cpu_ms_per_order" in row else "-"
        print(f"{name:<36} {ns:>11} {per:>15} {cpu:>13}")
    print(f"(one TIME per process every {REFRESH:g} s; {args.orders} orders x {args.rounds} "
          f"rounds, best round; CPU is this process's, flow and ledger in one thread)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "orders": args.orders, "rounds": args.rounds,
                                   "refresh_s": REFRESH, "machine": platform.platform()},
                                  indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
