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

With ``--cancel`` and ``--holds`` (issue 16's "Measure"), on the same fleet after those:

4. cancel: a 10,000-line bulk batch (``submit_many``) runs a few seconds, then
   ``fulfilment batch cancel`` (``tasks.stops.cancel_batch``): seconds from the
   call until every intent not confirmed has its ``cancelled`` outcome (goal
   <= 30 s) and until all are published; seats left held (sandbox inventory,
   goal 0); orders Onebox confirmed after their cancel was acknowledged (the
   sandbox's confirm time against the start of the cancel's round trip; goal 0).
   Reference, in the same run: the same cancel of a 10,000-line batch with the
   workers stopped, every intent waiting in its lane: the cancel's own cost
   (ledger scripts and publishing the outcomes), which no fleet can beat.
5. holds: 1,000 held intents (``"hold": true``), the shop confirming every
   other one as its ``held`` result arrives, the rest left to lapse (Onebox's
   basket shortened to ``--hold-basket-ttl``): one final outcome each, and the
   sandbox's inventory right (sold = the confirmed ones' places, none held).

Usage: python bench/lanes.py [--a-lines 10000] [--b-lines 1000] [--workers 2]
                             [--cancel] [--holds] [--skip-lanes]
Prints a table and writes bench/results/lanes.json (lanes-N.json for another
--a-lines; lanes-stops.json with --skip-lanes). Loopback only.
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
from collections import Counter
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
from fulfilment.results import consume_results  # noqa: E402
from fulfilment.stops import CHUNK, Answer  # noqa: E402
from fulfilment.wiring import broker_connection, redis_client  # noqa: E402
from schemas.intent import AutoItem, Buyer  # noqa: E402
from schemas.result import HELD, OrderResult  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "lanes.json"
LATENCY_MS = 50


SESSION, PRICE_TYPE = 1002, 3
#: The holds' price type: no other phase buys it, so its inventory is theirs alone.
HOLD_PRICE_TYPE = 4
#: A cancel acknowledged: its stop is recorded, no confirm can be marked sent after it.
ACKNOWLEDGED = {"finished", "stopping"}


def intent(reference: str, price_type: int = PRICE_TYPE, **extra: Any) -> dict[str, Any]:
    return {"reference": reference, "buyer": {"email": "bench@example.com"},
            "items": [{"session_id": SESSION, "price_type_id": price_type, "quantity": 1}],
            **extra}


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


def places(sandbox: SandboxProcess, price_type: int) -> dict[str, int]:
    """Onebox's count of one price type's places: total, free, held, sold."""
    return {k: int(v) for k, v in
            sandbox.admin.inventory(SESSION)["capacity"][str(price_type)].items()}


def open_and_published(client: redis.Redis, keys: Keys, batch: str) -> tuple[int, int]:
    """Intents of the batch without an outcome, and outcomes published (its counters)."""
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.batch_open(batch))
    pipe.hget(keys.batch(batch), "published")
    waiting, published = pipe.execute()
    return int(waiting), int(published or 0)


class Watch(threading.Thread):
    """From the cancel's start: when the batch first had every outcome written, every one
    published, and no seat held beyond ``held_before`` (polled every 10 ms / 50 ms)."""

    def __init__(self, cluster: Cluster, batch: str, lines: int, held_before: int) -> None:
        super().__init__(name=f"watch-{batch}", daemon=True)
        self.cluster, self.batch, self.lines, self.held_before = (cluster, batch, lines,
                                                                  held_before)
        self.seen: dict[str, float] = {}

    def run(self) -> None:
        client = redis.Redis.from_url(self.cluster.settings.redis_url)
        deadline, polls = time.monotonic() + 300, 0
        while len(self.seen) < 3 and time.monotonic() < deadline:
            waiting, published = open_and_published(client, self.cluster.keys, self.batch)
            now = time.time()
            if waiting == 0:
                self.seen.setdefault("every_outcome", now)
            if published >= self.lines:
                self.seen.setdefault("every_published", now)
            if polls % 5 == 0 and \
                    places(self.cluster.sandbox, PRICE_TYPE)["held"] <= self.held_before:
                self.seen.setdefault("no_seat_held", now)
            polls += 1
            time.sleep(0.01)
        client.close()


def timed_cancel(batch: str) -> tuple[list[Answer], dict[str, float], float, float, float]:
    """``fulfilment batch cancel``'s work, in this process: the answers; for each reference
    the time its round trip began (its stop was recorded after: a lower bound); the
    call's start, its last answer (every stop recorded) and its return (the outcomes it
    wrote published). Host clock, which the sandbox on this host shares."""
    from tasks.stops import cancel_batch

    started = chunk_started = last = time.time()
    answers: list[Answer] = []
    asked_from: dict[str, float] = {}
    for answer in cancel_batch(batch):
        if len(answers) % CHUNK == 0:  # the chunk's round trip ran before its first answer
            chunk_started = last
        answers.append(answer)
        asked_from[answer.reference] = chunk_started
        last = time.time()
    return answers, asked_from, started, last, time.time()


def cancel_measure(cluster: Cluster, batch: str, lines: int, run_for: float) -> dict[str, Any]:
    """Submit ``lines`` bulk intents, let them run ``run_for`` s, cancel the batch; time it."""
    from tasks import submit_many

    references = [f"{batch}-{n}" for n in range(lines)]
    held_before = places(cluster.sandbox, PRICE_TYPE)["held"]
    submitted = list(submit_many((intent(r, shop="shop-c") for r in references), batch=batch))
    assert {s.status for s in submitted} == {"accepted"}, submitted[:3]
    time.sleep(run_for)  # the scenario's schedule: the batch runs a while, not a sync
    confirmed = cluster.sandbox.admin.audit()["confirmed"]
    confirmed_before = sum(1 for r in references if confirmed.get(r))
    watch = Watch(cluster, batch, lines, held_before)
    watch.start()
    answers, asked_from, started, acknowledged_at, returned_at = timed_cancel(batch)
    watch.join()
    assert len(watch.seen) == 3, f"not within 300 s: {watch.seen}"
    results = cluster.collect(set(references), timeout=600)
    audit = cluster.sandbox.admin.audit()
    verdicts = Counter(a.verdict for a in answers)
    acknowledged = {a.reference for a in answers if a.ok and a.verdict in ACKNOWLEDGED}
    confirmed_at = audit["confirmed_at"]
    statuses = Counter(r.status for r in results.values())
    two_outcomes = sum(1 for r in references
                       if len({o.result_id for o in cluster.results[r]}) > 1
                       or len({o.status for o in cluster.results[r]}) > 1)
    return {
        "lines": lines, "ran_before_cancel_s": run_for,
        "confirmed_before_cancel": confirmed_before,
        "answers": dict(verdicts), "acknowledged": len(acknowledged),
        "every_stop_recorded_s": acknowledged_at - started,
        "cancel_call_s": returned_at - started,
        "to_every_outcome_s": watch.seen["every_outcome"] - started,
        "to_every_outcome_published_s": watch.seen["every_published"] - started,
        "to_no_seat_held_s": watch.seen["no_seat_held"] - started,
        "seats_held_after": places(cluster.sandbox, PRICE_TYPE)["held"] - held_before,
        "statuses": dict(statuses),
        "not_confirmed_nor_cancelled": lines - statuses["confirmed"] - statuses["cancelled"],
        "two_outcomes": two_outcomes,
        # An acknowledged cancel with an order Onebox confirmed at all (nothing may be bought
        # after the stop is recorded, and before it a confirm makes the answer "too late").
        "acknowledged_but_confirmed": sum(1 for r in acknowledged if audit["confirmed"].get(r)),
        "confirmed_after_acknowledged": sum(
            1 for r in acknowledged for code in audit["confirmed"].get(r, [])
            if confirmed_at[code] > asked_from[r]),
        # Confirms landing after the last answer: all marked sent before (too late).
        "confirms_landing_after_every_stop": sum(
            1 for r in references for code in audit["confirmed"].get(r, [])
            if confirmed_at[code] > acknowledged_at),
        "duplicate_orders": len(audit["duplicates"]),
    }


def holds_measure(cluster: Cluster, count: int, basket_ttl: float) -> dict[str, Any]:
    """``count`` held intents; the shop confirms every other one as it is held, the rest
    lapse. One final outcome each, and Onebox's inventory of their price type right."""
    from tasks import submit_many
    from tasks.stops import confirm

    references = [f"hold-{n}" for n in range(count)]
    to_confirm = set(references[::2])
    before = places(cluster.sandbox, HOLD_PRICE_TYPE)
    restore = cluster.sandbox.admin.configure(basket_ttl=basket_ttl)["basket_ttl"]
    started = time.time()
    try:
        submitted = list(submit_many(
            (intent(r, HOLD_PRICE_TYPE, hold=True, shop="shop-h") for r in references),
            batch="holds"))
        assert {s.status for s in submitted} == {"accepted"}, submitted[:3]
        answers: dict[str, Answer] = {}
        finals: dict[str, OrderResult] = {}
        held: dict[str, OrderResult] = {}
        deadline = time.monotonic() + 600
        with broker_connection(cluster.settings) as connection:
            while len(finals) < count:
                assert time.monotonic() < deadline, f"{count - len(finals)} without outcome"
                for result in consume_results(connection, cluster.topology, timeout=0.2,
                                              idle_timeout=0.5):
                    cluster.results.setdefault(result.reference, []).append(result)
                    if not result.reference.startswith("hold-"):
                        continue
                    if result.status == HELD:
                        held.setdefault(result.reference, result)
                        if result.reference in to_confirm and result.reference not in answers:
                            answers[result.reference] = confirm(result.reference)
                    else:
                        finals.setdefault(result.reference, result)
        finished = time.time()
    finally:
        cluster.sandbox.admin.configure(basket_ttl=restore)
    after = places(cluster.sandbox, HOLD_PRICE_TYPE)
    statuses = Counter(r.status for r in finals.values())
    client = redis.Redis.from_url(cluster.settings.redis_url)
    held_counter = int(client.hget(cluster.keys.batch("holds"), "held") or 0)
    client.close()
    late = [(finals[r].finished_at - held[r].hold_expires_at).total_seconds()  # type: ignore[operator]
            for r in references if finals[r].status == "expired" and r in held]
    span = [(held[r].hold_expires_at - held[r].finished_at).total_seconds()  # type: ignore[operator]
            for r in held]
    audit = cluster.sandbox.admin.audit()
    confirmed = statuses["confirmed"]
    return {
        "holds": count, "held_results": len(held), "shop_confirms": len(answers),
        "shop_confirms_accepted": sum(1 for a in answers.values() if a.ok),
        "statuses": dict(statuses), "phase_s": finished - started,
        "hold_lasted_s": statistics.median(span) if span else None,
        "expired_after_hold_time_s": {"p50": statistics.median(late) if late else None,
                                      "max": max(late) if late else None},
        "two_outcomes": sum(1 for r in references
                            if len({o.result_id for o in cluster.results[r]}) > 1
                            or len({o.status for o in cluster.results[r]
                                    if o.status != HELD}) > 1),
        "batch_held_counter": held_counter,
        "inventory_before": before, "inventory_after": after,
        "inventory_right": (after["sold"] - before["sold"] == confirmed
                            and after["held"] == 0
                            and after["free"] == after["total"] - after["sold"]),
        "confirmed_at_onebox": sum(len(audit["confirmed"].get(r, [])) for r in references),
        "duplicate_orders": len(audit["duplicates"]),
    }


def lanes_measure(args: argparse.Namespace, cluster: Cluster, env: dict[str, str],
                  tmp: Path) -> dict[str, Any]:
    """Issue 15's phases 1-3 on the running fleet (see the module's docstring)."""
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
    statuses: dict[str, int] = {}
    for result in [*together.values(), *results.values(), *live_results.values()]:
        statuses[result.status] = statuses.get(result.status, 0) + 1
    return {
        "live_idle_s": {"n": len(idle_results),
                        "p50": statistics.median(map(to_outcome, idle_results.values())),
                        "p99": percentile([to_outcome(r) for r in idle_results.values()],
                                          0.99)},
        "live_during_bulk_s": {"n": len(during), "p50": statistics.median(during),
                               "p99": percentile(during, 0.99), "max": max(during)},
        "bulk_alone_orders_per_s": rate_alone,
        "bulk_together_orders_per_s": rate_together,
        "shop_b_s": last_b - b_started, "shop_b_fair_share_s": len(shop_b) / (rate_alone / 2),
        "statuses": statuses,
    }


def lanes_rows(args: argparse.Namespace, out: dict[str, Any]) -> list[tuple[str, ...]]:
    live_p99, floor = out["live_during_bulk_s"]["p99"], out["five_calls_s"]["p50"]
    rate_together, rate_alone = out["bulk_together_orders_per_s"], out["bulk_alone_orders_per_s"]
    return [
        ("live, idle fleet: time to outcome", f"{out['live_idle_s']['p50']:.3f} s p50",
         f"{out['live_idle_s']['p99']:.3f} s p99", ""),
        ("live, while the bulk runs: time to outcome",
         f"{out['live_during_bulk_s']['p50']:.3f} s p50", f"{live_p99:.3f} s p99",
         f"goal p99 <= 1.0 s: {'met' if live_p99 <= 1.0 else 'missed'} "
         f"(n={out['live_during_bulk_s']['n']}; floor {floor:.3f} s)"),
        (f"shop B ({args.b_lines:,} lines) done after", f"{out['shop_b_s']:.1f} s",
         f"fair share {out['shop_b_fair_share_s']:.1f} s",
         f"{out['shop_b_s'] / out['shop_b_fair_share_s']:.2f}x (goal <= 1.5x)"),
        (f"bulk orders/s, A {args.a_lines:,} + B together", f"{rate_together:.1f}",
         f"alone {rate_alone:.1f}", f"{rate_together / rate_alone:.2f} (goal >= 0.9)"),
    ]


def stops_rows(out: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    cancel, idle = out.get("cancel"), out.get("cancel_workers_stopped")
    if cancel is not None:
        done = cancel["to_every_outcome_s"]
        rows += [
            (f"cancel {cancel['lines']:,} running: every outcome", f"{done:.1f} s",
             f"workers stopped {idle['to_every_outcome_s']:.1f} s" if idle else "",
             f"goal <= 30 s: {'met' if done <= 30 else 'missed'} "
             f"({cancel['statuses'].get('cancelled', 0):,} cancelled, "
             f"{cancel['statuses'].get('confirmed', 0):,} confirmed)"),
            ("cancel: every stop recorded / call returned",
             f"{cancel['every_stop_recorded_s']:.1f} s", f"{cancel['cancel_call_s']:.1f} s",
             f"workers stopped: {idle['every_stop_recorded_s']:.1f} s / "
             f"{idle['cancel_call_s']:.1f} s" if idle else ""),
            ("cancel: every outcome published / no seat held",
             f"{cancel['to_every_outcome_published_s']:.1f} s",
             f"{cancel['to_no_seat_held_s']:.1f} s",
             f"workers stopped: {idle['to_every_outcome_published_s']:.1f} s published"
             if idle else ""),
            ("cancel: seats held after; confirmed after ack",
             f"{cancel['seats_held_after']}", f"{cancel['confirmed_after_acknowledged']}",
             f"goal 0 and 0 ({cancel['acknowledged']:,} acknowledged, "
             f"{cancel['answers'].get('too_late', 0)} too late)"),
        ]
    holds = out.get("holds")
    if holds is not None:
        after = holds["inventory_after"]
        rows.append((f"holds: {holds['holds']:,} held, every other confirmed",
                     " ".join(f"{n} {s}" for s, n in sorted(holds["statuses"].items())),
                     f"sold {after['sold'] - holds['inventory_before']['sold']}, "
                     f"held {after['held']}",
                     f"inventory {'right' if holds['inventory_right'] else 'WRONG'}; "
                     f"{holds['two_outcomes']} with two outcomes; lapsed released "
                     f"{holds['expired_after_hold_time_s']['p50']:.1f} s p50 after time"))
    return rows


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
    parser.add_argument("--skip-lanes", action="store_true",
                        help="Only the phases asked for below (and the five calls).")
    parser.add_argument("--cancel", action="store_true", help="Phase 4: cancel a batch.")
    parser.add_argument("--cancel-lines", type=int, default=10_000)
    parser.add_argument("--cancel-after", type=float, default=5.0,
                        help="Seconds the batch runs before it is cancelled.")
    parser.add_argument("--holds", action="store_true", help="Phase 5: held intents.")
    parser.add_argument("--hold-count", type=int, default=1_000)
    parser.add_argument("--hold-basket-ttl", type=float, default=30.0,
                        help="Onebox's basket during phase 5: a hold lapses 10 s before.")
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
        out["five_calls_s"] = {"p50": statistics.median(calls), "p99": percentile(calls, 0.99)}
        workers = [cluster.start_worker(concurrency=args.concurrency, pool="threads")
                   for _ in range(args.workers)]
        cluster.start_beat()
        for worker in workers:
            wait_for(lambda w=worker: " ready." in w.output(), timeout=120,  # type: ignore[misc]
                     what="a worker")
        if not args.skip_lanes:
            out.update(lanes_measure(args, cluster, env, tmp))
        if args.cancel:
            out["cancel"] = cancel_measure(cluster, "cancel", args.cancel_lines,
                                           args.cancel_after)
        if args.holds:
            out["holds"] = holds_measure(cluster, args.hold_count, args.hold_basket_ttl)
        if args.cancel:
            # The reference: the same cancel with no worker running (each intent waits
            # in its lane and gets its outcome from the cancel itself).
            for child in cluster.workers:
                child.stop()
            out["cancel_workers_stopped"] = cancel_measure(cluster, "cancel-idle",
                                                           args.cancel_lines, 0.0)
        out["duplicate_orders"] = len(sandbox.admin.audit()["duplicates"])
    finally:
        cluster.stop()
    if not args.skip_lanes:
        out["flow_control_cost"] = release_cost(server.url, 10_000, args.in_flight)
    server.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    floor = out["five_calls_s"]["p50"]
    rows: list[tuple[str, ...]] = [
        ("five calls, one after another (plain client)", f"{floor:.3f} s p50", "", "")]
    if not args.skip_lanes:
        rows += lanes_rows(args, out)
    rows += stops_rows(out)
    print(f"\n{args.workers} workers x threads -c {args.concurrency}, "
          f"{args.latency_ms} ms per call, in flight {args.in_flight}; "
          f"{out.get('statuses', '')} {out['duplicate_orders']} duplicate orders")
    for name, a, b, c in rows:
        print(f"{name:52} {a:>14} {b:>22}  {c}")
    if not args.skip_lanes:
        cost = out["flow_control_cost"]
        print(f"flow control on this Redis (appendfsync always): "
              f"{cost['server_commands_per_intent']:.2f} commands (calls) per intent, "
              f"{cost['round_trips_per_intent']:.3f} round trips per intent, park "
              f"{cost['park_us_per_intent']:.0f} us + release "
              f"{cost['release_us_per_intent']:.0f} us per intent")
    written = (RESULTS.with_name("lanes-stops.json") if args.skip_lanes else
               RESULTS if args.a_lines == 10_000 else
               RESULTS.with_name(f"lanes-{args.a_lines}.json"))
    written.parent.mkdir(exist_ok=True)
    written.write_text(json.dumps({
        "machine": platform.platform(), "cpus": os.cpu_count(), "latency_ms": args.latency_ms,
        "workers": args.workers, "pool": "threads", "concurrency": args.concurrency,
        "a_lines": args.a_lines, "b_lines": args.b_lines, "b_after_s": args.b_after,
        "live_every_s": args.live_every, "in_flight": args.in_flight,
        "skip_lanes": args.skip_lanes, "cancel_lines": args.cancel_lines if args.cancel else 0,
        "cancel_after_s": args.cancel_after, "hold_count": args.hold_count if args.holds else 0,
        "hold_basket_ttl_s": args.hold_basket_ttl, **out}, indent=2) + "\n")
    print(f"\nwritten to {written.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
