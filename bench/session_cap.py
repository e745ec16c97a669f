"""What does ``FULFILMENT_SESSION_CAP`` cost per intent, in Redis commands and time?

Everything real: the machine's Redis (a database and key prefix of this run's
own, removed at the end) and the sandbox over loopback; each purchase runs
through the flow as a worker's two tasks do (``advance`` up to BASKET, then up
to PUBLISHED), in this process, one after another. Every Redis command the
worker's client sends is counted (the ledger's, the lease's, the Onebox
guard's and token cache's, the cap's; the results publisher's broker
connection is not). Three rows, measured in the same run:

- cap off (the reference): ``FULFILMENT_SESSION_CAP=0``;
- cap on, never full: every intent takes its slot at once;
- one wait: a run held back by the cap (its session full), the cost of each
  time a waiting intent asks again.

Usage: python bench/session_cap.py [--intents 200] [--redis-url URL]
Prints a table and writes bench/results/session_cap.json.
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
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from fulfilment.config import Settings  # noqa: E402
from fulfilment.flow import Proceed, RetryIn, Services, Stage, advance  # noqa: E402
from fulfilment.sandbox import SandboxOptions, start_in_thread  # noqa: E402
from fulfilment.wiring import build_services  # noqa: E402
from schemas.intent import load_intent  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "session_cap.json"


def intent(reference: str) -> Any:
    return load_intent({"reference": reference, "buyer": {"email": "ana@example.com"},
                        "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]})


class Counted:
    """Counts the commands a Redis client sends (by name; a script call as EVALSHA)."""

    def __init__(self, client: redis.Redis) -> None:
        self.counts: Counter[str] = Counter()
        sent: Callable[..., Any] = client.execute_command

        def counting(*args: Any, **options: Any) -> Any:
            self.counts[str(args[0]).upper()] += 1
            return sent(*args, **options)

        client.execute_command = counting  # type: ignore[method-assign]

    def measure(self, action: Callable[[], object]) -> tuple[Counter[str], float]:
        before = self.counts.copy()
        start = time.perf_counter()
        action()
        return self.counts - before, time.perf_counter() - start


def purchase(services: Services, reference: str) -> None:
    services.ledger.admit(intent(reference))
    assert isinstance(advance(services, reference, Stage.BASKET), Proceed)
    assert isinstance(advance(services, reference, Stage.PUBLISHED), Proceed)


def row(name: str, samples: list[tuple[Counter[str], float]]) -> dict[str, Any]:
    totals = [sum(counts.values()) for counts, _ in samples]
    scripts = [counts["EVALSHA"] for counts, _ in samples]
    names: Counter[str] = Counter()
    for counts, _ in samples:
        names.update(counts)
    return {"row": name, "runs": len(samples),
            "commands_mean": round(statistics.mean(totals), 2),
            "scripts_mean": round(statistics.mean(scripts), 2),
            "ms_median": round(statistics.median(s for _, s in samples) * 1000, 2),
            "by_command": {k: round(v / len(samples), 2) for k, v in sorted(names.items())}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intents", type=int, default=200)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    args = parser.parse_args()
    prefix = f"bench-sesscap-{uuid.uuid4().hex[:8]}"
    rows: list[dict[str, Any]] = []
    with start_in_thread(SandboxOptions()) as sandbox:
        base = Settings.defaults().with_overrides(
            onebox_api_url=sandbox.url, redis_url=args.redis_url, broker_url=args.redis_url,
            key_prefix=prefix, require_durable_redis=False)
        off = build_services(base.with_overrides(session_cap=0))
        on = build_services(base.with_overrides(session_cap=args.intents + 10))
        one = build_services(base.with_overrides(session_cap=1))
        try:
            purchase(off, "warm-off")
            purchase(on, "warm-on")
            for name, tag, services in (("cap off (reference)", "off", off),
                                        ("cap on, never full", "on", on)):
                counted = Counted(services.ledger.redis)
                samples = []
                for i in range(args.intents):
                    samples.append(counted.measure(partial(purchase, services, f"{tag}-{i}")))
                rows.append(row(name, samples))
            # One wait: the session held by an open basket, each waiter asks once.
            one.ledger.admit(intent("holder"))
            assert isinstance(advance(one, "holder", Stage.BASKET), Proceed)
            counted = Counted(one.ledger.redis)
            waits = []
            for i in range(args.intents):
                one.ledger.admit(intent(f"waiter-{i}"))

                def ask(reference: str = f"waiter-{i}") -> None:
                    decision = advance(one, reference, Stage.BASKET)
                    assert isinstance(decision, RetryIn) and decision.reason == "SESSION_CAP"

                waits.append(counted.measure(ask))
            rows.append(row("one wait (held back)", waits))
        finally:
            _clean(off.ledger.redis, prefix)
            for services in (off, on, one):
                services.ledger.redis.close()
    print(f"\nRedis commands per intent, {args.intents} intents a row (a purchase: its "
          "basket and confirm runs; a wait: one run held back)")
    header = f"{'row':<22} {'commands':>9} {'scripts':>8} {'ms (median)':>12}  by command"
    print(header)
    print("-" * len(header))
    for r in rows:
        spread = ", ".join(f"{k} {v:g}" for k, v in r["by_command"].items())
        print(f"{r['row']:<22} {r['commands_mean']:>9.2f} {r['scripts_mean']:>8.2f} "
              f"{r['ms_median']:>12.2f}  {spread}")
    added = rows[1]["commands_mean"] - rows[0]["commands_mean"]
    print(f"the cap adds {added:.2f} commands per purchase "
          f"({added / rows[0]['commands_mean']:.0%} of the reference)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                   "intents": args.intents, "rows": rows}, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")
    return 0


def _clean(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])


if __name__ == "__main__":
    raise SystemExit(main())
