"""How many bytes of Redis does a finished intent keep, and what does a week of them cost?

A ledger entry lives for ``FULFILMENT_LEDGER_RETENTION`` (7 days) after its
last change, so a finished intent's bytes, times the order rate, times the
retention, is the Redis the ledger needs in a steady state. Everything real:
the machine's Redis (a database and key prefix of this run's own, removed at
the end) and the sandbox over loopback; the purchases go through the flow
(``fulfilment.flow.advance``) as a worker runs them. Three groups of the same
intents, each in a batch of its own, measured in the same run:

- in flight: admitted and pre-confirmed (the intent, the buyer with it, kept
  while the purchase runs);
- finished as before (the reference): bought and published with the outcome
  script as it was before issue 13 (this script's text without its ``HDEL``),
  so the entry still holds the whole intent;
- finished now: bought and published as the ledger does now.

Per intent: ``MEMORY USAGE <key> SAMPLES 0`` of its ledger entry (the only key
an intent leaves of its own: its lease is gone once the run ends, and a
published intent leaves the open set), and its share of its batch's keys (the
counters, and the members set that lists every reference for batch status).
"data B" is what the entry's fields and values hold (the rest is Redis's own
structures: a hash with a value over 64 bytes, as the outcome is, is a hash
table, not a listpack). Two intent shapes: a full buyer (e-mail, names, phone, two more fields, two
items, metadata) and a minimal one (an e-mail, one item).

Usage: python bench/finished_entry.py [--intents 100] [--rate 130] [--redis-url URL]
Prints a table and writes bench/results/finished_entry.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from fulfilment import ledger as ledger_module  # noqa: E402
from fulfilment.config import Settings  # noqa: E402
from fulfilment.flow import Proceed, Services, Stage, advance  # noqa: E402
from fulfilment.ledger import Ledger  # noqa: E402
from fulfilment.sandbox import SandboxOptions, start_in_thread  # noqa: E402
from fulfilment.wiring import build_services  # noqa: E402
from schemas.intent import load_intent  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "finished_entry.json"
WEEK = 7 * 24 * 3600


def full_intent(reference: str, batch: str) -> dict[str, Any]:
    return {"reference": reference, "batch": batch,
            "buyer": {"email": "maria.fernandez-lopez@example.com", "name": "María",
                      "surname": "Fernández López", "phone": "+34 600 123 456",
                      "postal_code": "28013", "document_id": "12345678Z"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 2},
                      {"session_id": 1002, "price_type_id": 3, "quantity": 1}],
            "metadata": {"shop": "web-es", "cart_id": "c-8f3a2b91", "campaign": "spring"}}


def minimal_intent(reference: str, batch: str) -> dict[str, Any]:
    return {"reference": reference, "batch": batch, "buyer": {"email": "ana@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]}


SHAPES: dict[str, Callable[[str, str], dict[str, Any]]] = {
    "full buyer": full_intent, "minimal": minimal_intent}


def old_finish_ledger(services: Services) -> Ledger:
    """The same ledger with the outcome script as it was: the outcome written, nothing dropped."""
    old = Ledger(services.ledger.redis, services.ledger.keys, services.settings.ledger_retention)
    script = "\n".join(line for line in ledger_module._FINISH.splitlines()
                       if "'HDEL'" not in line)
    assert script != ledger_module._FINISH, "the outcome script no longer drops with HDEL"
    old._finish = services.ledger.redis.register_script(script)
    return old


def run_group(services: Services, shape: str, group: str, count: int,
              target: Stage) -> dict[str, Any]:
    """Buy ``count`` intents of one shape up to ``target``; measure what each keeps."""
    client, keys = services.ledger.redis, services.ledger.keys
    batch = f"{group.split(maxsplit=1)[0]}-{shape.split(maxsplit=1)[0]}-{uuid.uuid4().hex[:6]}"
    references = [f"{batch}-{i}" for i in range(count)]
    for reference in references:
        services.ledger.admit(load_intent(SHAPES[shape](reference, batch)))
        decision = advance(services, reference, target)
        assert isinstance(decision, Proceed), (reference, decision)
    entries = [_usage(client, keys.ledger(reference)) for reference in references]
    raw = [client.hgetall(keys.ledger(reference)) for reference in references]
    fields = [len(entry) for entry in raw]
    payload = [sum(len(k) + len(v) for k, v in entry.items()) for entry in raw]
    outcome = [len(entry.get(b"outcome", b"")) for entry in raw]
    batch_bytes = sum(_usage(client, key) for key in
                      (keys.batch(batch), keys.batch_open(batch), keys.batch_members(batch)))
    leases = sum(int(client.exists(keys.lease(reference))) for reference in references)
    open_left = sum(client.zscore(keys.open_intents, reference) is not None
                    for reference in references)
    has_buyer = sum(int(client.hexists(keys.ledger(reference), "intent"))
                    for reference in references)
    entry = statistics.mean(entries)
    return {"shape": shape, "group": group, "intents": count,
            "entry_bytes_mean": round(entry, 1), "entry_bytes_min": min(entries),
            "entry_bytes_max": max(entries), "fields_mean": statistics.mean(fields),
            "payload_bytes_mean": round(statistics.mean(payload), 1),
            "outcome_bytes_mean": round(statistics.mean(outcome), 1),
            "batch_bytes_per_intent": round(batch_bytes / count, 1),
            "bytes_per_intent": round(entry + batch_bytes / count, 1),
            "leases_left": leases, "still_open": open_left, "entries_with_intent": has_buyer}


def _usage(client: redis.Redis, key: str) -> int:
    return int(client.memory_usage(key, samples=0) or 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intents", type=int, default=100, help="Intents per group and shape.")
    parser.add_argument("--rate", type=float, default=130.0,
                        help="Orders per second for the capacity figure (README's planning rate).")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    args = parser.parse_args()
    prefix = f"bench-finished-{uuid.uuid4().hex[:8]}"
    rows: list[dict[str, Any]] = []
    with start_in_thread(SandboxOptions()) as sandbox:
        settings = Settings.defaults().with_overrides(
            onebox_api_url=sandbox.url, redis_url=args.redis_url, broker_url=args.redis_url,
            key_prefix=prefix, require_durable_redis=False)
        services = build_services(settings)
        before = dataclasses.replace(services, ledger=old_finish_ledger(services))
        try:
            for shape in SHAPES:
                rows.append(run_group(services, shape, "in flight (pre-confirmed)",
                                      args.intents, Stage.PRE_CONFIRMED))
                rows.append(run_group(before, shape, "finished as before (reference)",
                                      args.intents, Stage.PUBLISHED))
                rows.append(run_group(services, shape, "finished now", args.intents,
                                      Stage.PUBLISHED))
        finally:
            _clean(services.ledger.redis, prefix)
            services.ledger.redis.close()
    for row in rows:
        row["week_gb_at_rate"] = round(row["bytes_per_intent"] * args.rate * WEEK / 1e9, 1)
    print(f"\nbytes of Redis per intent (MEMORY USAGE), {args.intents} intents a group; "
          f"a week at {args.rate:g} orders/s (FULFILMENT_LEDGER_RETENTION 7 days)")
    header = (f"{'shape':<11} {'entry':<31} {'entry B':>8} {'batch B':>8} {'total B':>8} "
              f"{'data B':>7} {'fields':>6} {'w/ intent':>9} {'week GB':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['shape']:<11} {row['group']:<31} {row['entry_bytes_mean']:>8.0f} "
              f"{row['batch_bytes_per_intent']:>8.0f} {row['bytes_per_intent']:>8.0f} "
              f"{row['payload_bytes_mean']:>7.0f} {row['fields_mean']:>6.1f} "
              f"{row['entries_with_intent']:>9} "
              f"{row['week_gb_at_rate']:>8.1f}")
    for shape in SHAPES:
        old, new = (next(r for r in rows if r["shape"] == shape and r["group"].startswith(g))
                    for g in ("finished as before", "finished now"))
        print(f"{shape}: a finished intent keeps {new['bytes_per_intent']:.0f} B, "
              f"{old['bytes_per_intent'] - new['bytes_per_intent']:.0f} B "
              f"({1 - new['bytes_per_intent'] / old['bytes_per_intent']:.0%}) less than before")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                   "redis": _redis_version(args.redis_url),
                                   "intents_per_group": args.intents, "rate": args.rate,
                                   "retention_s": WEEK, "rows": rows}, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")
    return 0


def _clean(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])


def _redis_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
