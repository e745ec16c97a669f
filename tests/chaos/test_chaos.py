"""Exactly once, whatever fails: real Redis, real worker processes, the sandbox.

Each scenario runs 400 intents (FULFILMENT_CHAOS_INTENTS; docs/reliability.md: 500) through a
deployment of its own (a redis-server with the append-only file on and
``appendfsync always``, as docs/operations.md demands of production, with the fsync
shim that lets it simulate a host crash; the sandbox; Celery workers as
processes under a supervisor that counts their deaths)
while something breaks, then checks from the sandbox's audit and the results
queue that every reference ends confirmed exactly once or failed with a
reason, that no seat is sold twice and that no reference is without outcome.
Set FULFILMENT_CHAOS_REPORT to a file to have each scenario's counts appended.

The scenarios that do not break Redis itself (workers killed, Onebox failing
every way, calls finished after the client gave up) run again with RabbitMQ
as the broker (a vhost of their own on the machine's RabbitMQ; the ledger
stays on the private Redis), with FULFILMENT_CHAOS_RABBITMQ_INTENTS intents
each: fewer, so that the three add about three minutes to CI.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis

from fulfilment.config import Settings
from fulfilment.harness.cluster import Cluster, env_for
from fulfilment.harness.processes import RedisServer, SandboxProcess, child_pids, wait_for
from fulfilment.results import consume_failures, consume_results
from fulfilment.wiring import broker_connection, redis_client
from schemas.intent import SeatRef
from schemas.result import HELD, OrderResult
from tasks import app as celery_app
from tasks.app import configure
from tests.services import free_port, rabbitmq_vhost, require, unique_prefix

#: Under pytest -n --dist loadfile (CI) this module's scenarios run one at a time, as they
#: were tuned (each wants most of the machine), beside the lighter tests in the other process.
pytestmark = pytest.mark.integration

INTENTS = max(int(os.environ.get("FULFILMENT_CHAOS_INTENTS", "400")), 1)
#: Intents per scenario with RabbitMQ as the broker (measured: see docs/operations.md, "Brokers").
RABBITMQ_INTENTS = max(int(os.environ.get("FULFILMENT_CHAOS_RABBITMQ_INTENTS", "100")), 1)
#: The scenarios run on both brokers: ``@BOTH_BROKERS`` (the fixture reads the parameter).
BOTH_BROKERS = pytest.mark.parametrize("chaos", ["redis", "rabbitmq"], indirect=True)
#: One intent in this many asks for a recital seat the box office sold first.
BOUND_TO_FAIL_EVERY = 50
SOLD_SEATS = (1, 2, 3, 4)
#: What the chaos Redis runs with: ``always`` as production must; ``everysec`` only
#: to watch the host-crash scenario fail (with FULFILMENT_REQUIRE_DURABLE_REDIS waived).
APPENDFSYNC = os.environ.get("FULFILMENT_CHAOS_APPENDFSYNC", "always")


@pytest.fixture
def chaos(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A deployment of the scenario's own; the broker is its Redis unless the
    test is parametrized ``rabbitmq`` (``BOTH_BROKERS``)."""
    broker = getattr(request, "param", "redis")
    # As in production, a killed worker's purchase is resumed (visibility timeout,
    # or the sweep past stuck_after) well within a basket's life: a worker killed
    # between marking its confirm and sending it leaves a pre-confirmed order,
    # which the resumed run reads and confirms. Resumed after it expired, that
    # order is gone (404: no proof either way) and the intent ends unsettled.
    # Elsewhere a short basket keeps the waits for abandoned baskets short.
    basket_ttl = 40 if request.node.get_closest_marker("kills_workers") else 20
    with ExitStack() as stack:
        broker_url = stack.enter_context(rabbitmq_vhost()) if broker == "rabbitmq" else None
        yield from _chaos_cluster(tmp_path, broker_url, basket_ttl)


def _chaos_cluster(tmp_path: Path, broker_url: str | None,
                   basket_ttl: int = 20, **overrides: Any) -> Iterator[Cluster]:
    require("redis-server", subprocess.run(["which", "redis-server"], capture_output=True,
                                           check=False).returncode == 0)
    server = RedisServer(tmp_path / "redis", free_port(), appendfsync=APPENDFSYNC,
                         simulate_host_crash=True)
    sandbox = SandboxProcess(tmp_path / "sandbox.log", "--basket-ttl", str(basket_ttl),
                             "--seed", "7")
    settings = Settings.defaults().with_overrides(
        onebox_api_url=sandbox.url, redis_url=server.url, broker_url=broker_url or server.url,
        key_prefix=unique_prefix("chaos"), onebox_read_timeout=2.0,
        retry_base_delay=0.05, retry_max_delay=1.0, retry_deadline=600, retry_max_attempts=12,
        visibility_timeout=20, task_soft_time_limit=8, task_time_limit=10,
        stuck_after=20, sweep_interval=5, require_durable_redis=APPENDFSYNC == "always",
        metrics_port=free_port(),  # the scenario's own (tests run side by side: pytest -n)
    ).with_overrides(**overrides)
    configure(settings)
    cluster = Cluster(settings, sandbox, tmp_path)
    cluster.redis_server = server  # type: ignore[attr-defined]
    cluster.chaos_intents = RABBITMQ_INTENTS if broker_url else INTENTS  # type: ignore[attr-defined]
    cluster.basket_ttl = basket_ttl  # type: ignore[attr-defined]
    # The recovery sweep runs in every scenario, as in production: a broker may
    # lose a message (a Redis restart between BRPOP and the unacked write does),
    # and the ledger is what finds it again.
    cluster.start_beat()
    cluster.supervise()
    try:
        sell_recital_front_row(cluster)  # so one intent in fifty is bound to fail
        yield cluster
    finally:
        cluster.stop()
        server.stop()
        celery_app.close()
        cluster.remove_broker_objects()


#: References spelled like keys of ours, or like another intent's keys.
KEY_LIKE_REFERENCES = ("open", "ledger", "ledger:open", "lease", "intake", "intake:processing",
                       "intake:lock", "sweep:lock", "broker", "broker:unacked", "onebox:token",
                       "results", "failures", "purchase", "purchase.continue", "maintenance")


def intents(tag: str, count: int = INTENTS, references: list[str] | None = None,
            first_seat: int = 1) -> list[dict[str, Any]]:
    """Intents that every Onebox answer can buy (each names its rate: see ``missing_rate_id``)."""
    documents = []
    for i in range(count):
        items: list[dict[str, Any]] = (
            [{"seats": [{"id": first_seat + i, "session_id": 1001, "rate_id": 1}]}] if i % 2 == 0
            else [{"session_id": 1002, "price_type_id": 3, "quantity": 1 + i % 3,
                   "rate_id": 1}])
        if i % BOUND_TO_FAIL_EVERY == BOUND_TO_FAIL_EVERY - 1:
            items.append({"seats": [{"id": SOLD_SEATS[i % 4], "session_id": 1003,
                                     "rate_id": 1}]})
        reference = references[i] if references else f"{tag}-{i:05d}"
        documents.append({"reference": reference, "items": items, "batch": tag,
                          "buyer": {"email": f"b{i}@example.com", "phone": "+34 600 000 000"}})
    return documents


def expected_failures(documents: list[dict[str, Any]]) -> set[str]:
    return {d["reference"] for d in documents if len(d["items"]) > 1}


def sell_recital_front_row(cluster: Cluster) -> None:
    cluster.sell_at_box_office(*(SeatRef(id=s, session_id=1003) for s in SOLD_SEATS))


def submit(documents: list[dict[str, Any]]) -> set[str]:
    from tasks import submit_many

    submissions = list(submit_many(documents))
    assert {s.status for s in submissions} == {"accepted"}
    return {d["reference"] for d in documents}


def start(cluster: Cluster, tag: str, *concurrency: int) -> list[dict[str, Any]]:
    """Start a worker per concurrency given, and submit the scenario's intents."""
    for processes in concurrency:
        cluster.start_worker(concurrency=processes)
    documents = intents(tag, int(cluster.chaos_intents))  # type: ignore[attr-defined]
    submit(documents)
    return documents


def verify(cluster: Cluster, scenario: str, documents: list[dict[str, Any]],
           submitted: int, *, before_settling: Callable[[], object] | None = None
           ) -> dict[str, int]:
    """Every intent ends once: confirmed, or (bound to fail) failed with nothing bought.

    With ``before_settling``, an ``unsettled`` outcome is allowed: once it has
    run (Onebox lets orders be read again), ``fulfilment settle`` must turn each
    into its final outcome, which then counts like any other.
    """
    references = {d["reference"] for d in documents}
    cluster.collect(references, timeout=300)
    unsettled = sorted(r for r in references if cluster.results[r][0].status == "unsettled")
    # "Unsettled" claims a confirm may have gone out: Onebox must have seen one for
    # that order (any answer). One it never saw could not have bought anything.
    confirm_calls = cluster.sandbox.admin.confirm_calls()
    never_sent = [(r, cluster.results[r][0].order_id) for r in unsettled
                  if cluster.results[r][0].order_id not in confirm_calls]
    assert not never_sent, f"unsettled, but no confirm ever reached the order: {never_sent[:5]}"
    if unsettled:
        assert before_settling is not None, f"unsettled: {unsettled[:5]}"
        settle(cluster, unsettled, before_settling)
    statuses = cluster.assert_exactly_once(references)
    bound_to_fail = expected_failures(documents)
    worn_out = []
    for reference in references:
        result = cluster.results[reference][0]
        if reference in bound_to_fail:
            assert result.status == "failed", reference
            assert result.error is not None
            if result.error.code != "ORDER_SEAT_NOT_AVAILABLE":
                worn_out.append(result.error)
        elif reference in unsettled and result.status == "failed":
            # Its confirm met a fault (a 503, say) and Onebox would not let the order
            # be read: the operator's settlement found it never confirmed. Failed,
            # truthfully, with nothing bought (assert_exactly_once checked Onebox).
            assert result.error is not None and result.error.code == "CONFIRM_NOT_DONE", result
        else:
            assert result.status == "confirmed", (reference, result.error)
    # An intent bound to fail may wear out its baskets on the faults (each lost seats
    # call abandons one, which may hold the seat it wants until it expires) before
    # Onebox's "not available" is final: failed either way, nothing bought. Once a
    # scenario, not the rule.
    assert len(worn_out) <= 1, worn_out
    deliveries = sum(len(v) for k, v in cluster.results.items() if k in references)
    counts = {"submitted": submitted, "intents": len(references),
              "confirmed": statuses["confirmed"], "failed": statuses["failed"],
              "unsettled_then_settled": len(unsettled),
              "unsettled_confirm_never_sent": len(never_sent),
              # assert_exactly_once: a failed reference has no confirmed order at Onebox
              "confirmed_reported_failed": 0,
              "worker_deaths": cluster.restarts,
              "duplicate_orders": len(cluster.sandbox.admin.audit()["duplicates"]),
              "seats_sold_twice": cluster.sandbox.admin.audit()["seats_sold_twice"],
              "lost": len(references - cluster.results.keys()),
              "redelivered_results": deliveries - len(references)}
    if cluster.on_rabbitmq:
        scenario = f"{scenario}, RabbitMQ broker"
    print(f"\nchaos {scenario}: {json.dumps(counts)}")
    report = os.environ.get("FULFILMENT_CHAOS_REPORT")
    if report:
        with Path(report).open("a") as out:
            out.write(json.dumps({"scenario": scenario, **counts}) + "\n")
    return counts


def settle(cluster: Cluster, unsettled: list[str], before: Callable[[], object]) -> None:
    """The operator's part: ``fulfilment settle`` each, and read the final outcomes."""
    for reference in unsettled:
        for result in cluster.results.pop(reference):
            assert result.order_code, result  # what the operator looks up
    before()
    env = {**os.environ, **env_for(cluster.settings)}
    done = subprocess.run([sys.executable, "-m", "tasks.commands", "settle", *unsettled],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # The final results; the unsettled ones may be delivered again meanwhile (the
    # last message a consumer stopped on is redelivered: at least once). Read the
    # queue to the end each time, so a redelivered "unsettled" cannot hide the rest.
    deadline = time.monotonic() + 60
    with broker_connection(cluster.settings) as connection:
        while waiting := {r for r in unsettled
                          if all(o.status == "unsettled" for o in cluster.results.get(r, []))}:
            assert time.monotonic() < deadline, (
                f"not settled: {sorted(waiting)[:5]}; settle said: "
                f"{(done.stdout + done.stderr)[-2000:]}")
            for result in consume_results(connection, cluster.topology, timeout=0.2,
                                          idle_timeout=2.0):
                cluster.results.setdefault(result.reference, []).append(result)
    for reference in unsettled:
        cluster.results[reference] = [o for o in cluster.results[reference]
                                      if o.status != "unsettled"]


def reached(cluster: Cluster, target: int) -> Callable[[], bool]:
    """A ``wait_for`` condition: at least ``target`` intents have an outcome."""
    return lambda: progress(cluster) >= target


def progress(cluster: Cluster) -> int:
    """How many intents have an outcome in the ledger so far (0 while Redis is away)."""
    client = redis_client(cluster.settings)
    try:
        return sum(1 for key in client.scan_iter(cluster.keys.ledger_pattern, count=1000)
                   if client.hexists(key, "outcome"))
    except redis.RedisError:
        return 0
    finally:
        client.close()


@BOTH_BROKERS
@pytest.mark.kills_workers
def test_worker_processes_killed_with_sigkill(chaos: Cluster) -> None:
    # Given two workers and the intents on their way
    documents = start(chaos, "kill", 2, 2)
    # When pool processes and whole workers are killed with SIGKILL as they work
    rng = random.Random(1)
    for round_ in range(6):
        target = len(documents) * (round_ + 1) // 8
        wait_for(reached(chaos, target), timeout=120, what=f"{target} outcomes")
        workers = [w for w in chaos.workers if w.log_path.name.startswith("worker")]
        victim = workers[rng.randrange(len(workers))]
        if round_ % 2 == 0:
            for pid in child_pids(victim.pid):
                os.kill(pid, signal.SIGKILL)  # its pool processes: the task is redelivered
        else:
            # The whole worker: the supervisor starts it again, and its messages
            # come back after the visibility timeout.
            victim.kill(signal.SIGKILL)
    # Then every intent has one outcome, no order twice, no seat twice
    verify(chaos, "worker SIGKILL x6", documents, len(documents))
    assert chaos.restarts >= 3


def test_redis_restarted_mid_run(chaos: Cluster) -> None:
    documents = start(chaos, "redis", 3)
    server: RedisServer = chaos.redis_server  # type: ignore[attr-defined]
    for fraction in (3, 2):
        target = len(documents) // fraction
        wait_for(reached(chaos, target), timeout=120, what=f"{target} outcomes")
        server.restart()
    counts = verify(chaos, "Redis restarted x2 (append-only file)", documents, len(documents))
    # Workers ride out a Redis restart: none died and had to be started again
    assert counts["worker_deaths"] == 0, chaos.worker_logs()


def test_host_crashes_lose_nothing_that_was_recorded(chaos: Cluster) -> None:
    # Given two workers and intents on their way
    documents = start(chaos, "crash", 2, 2)
    server: RedisServer = chaos.redis_server  # type: ignore[attr-defined]
    # When the Redis host crashes three times mid-run: SIGKILL, and every byte
    # of the append-only file that no fsync covered is lost
    for fraction in (8, 3, 1.5):
        target = int(len(documents) / fraction)
        wait_for(reached(chaos, target), timeout=180, what=f"{target} outcomes")
        server.crash()
    # Then no accepted intent is lost, none bought twice, no confirmed order reported failed
    counts = verify(chaos, "host crash x3 (unsynced writes lost, appendfsync always)",
                    documents, len(documents))
    assert counts["lost"] == 0


def test_references_spelled_like_our_own_keys(chaos: Cluster) -> None:
    # Given references named like our keys, and like other intents' keys
    count = INTENTS
    references = [f"keys-{i:05d}" for i in range(count)]
    spelled = [*KEY_LIKE_REFERENCES, *(f"keys-{i:05d}:{kind}" for i in range(20)
                                       for kind in ("ledger", "lease"))]
    for index, name in enumerate(spelled):
        references[index * (count // len(spelled))] = name
    documents = intents("keys", count, references)
    chaos.start_worker(concurrency=3)
    submit(documents)
    # Then each is bought once, like any other
    verify(chaos, "references spelled like our keys", documents, len(documents))


@BOTH_BROKERS
def test_onebox_failing_every_way_on_every_step(chaos: Cluster) -> None:
    every_way = {"error_500": 0.03, "error_503": 0.03, "throttle_429": 0.04, "retry_after": 0.2,
                 "lost_response": 0.03, "slow_after": 0.01, "slow_after_ms": 2500,
                 "latency_ms": 2, "latency_jitter_ms": 20}
    chaos.sandbox.admin.set_faults({"seed": 11, "endpoints": {"*": every_way}})
    documents = start(chaos, "faults", 4)
    counts = verify(chaos, "Onebox 500/503/429/slow/lost on every step", documents,
                    len(documents))
    faults = chaos.sandbox.admin.audit()["faults"]
    steps = ("create", "seats", "seats_auto", "buyer_data", "pre_confirm", "confirm")
    lost_on = [step for step in steps if faults.get(step, {}).get("lost_response")]
    # At 3% a step, the RabbitMQ run's fewer intents may miss one step by chance.
    assert len(lost_on) >= (len(steps) if len(documents) >= 300 else 4), (lost_on, faults)
    assert counts["lost"] == 0


def test_every_intent_submitted_three_times_by_concurrent_producers(chaos: Cluster,
                                                                    tmp_path: Path) -> None:
    chaos.start_worker(concurrency=3)
    documents = intents("triple")
    files = []
    for producer in range(3):
        shuffled = documents[:]
        random.Random(producer).shuffle(shuffled)
        path = tmp_path / f"producer-{producer}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in shuffled))
        files.append(path)
    env = {**os.environ, **env_for(chaos.settings)}
    producers = [subprocess.Popen([sys.executable, "-m", "tasks.commands", "submit", "--quiet",
                                   str(path)], stdout=subprocess.PIPE, text=True, env=env)
                 for path in files]
    outputs = [p.communicate(timeout=300)[0] for p in producers]
    enqueued = sum(int(out.strip().splitlines()[-1].split()[0]) for out in outputs)
    assert enqueued == len(documents), outputs
    verify(chaos, "each intent submitted 3x by 3 producers at once", documents,
           3 * len(documents))


def test_two_workers_and_the_recovery_sweep_together(chaos: Cluster) -> None:
    # Given two workers, and beat sweeping every 5 s
    documents = start(chaos, "sweep", 2, 2)
    # And part of the work lost from the broker: tasks deleted off the queue,
    # as a broker that lost messages would
    client = redis_client(chaos.settings)
    lost_tasks = threading.Event()

    def drop_queued_tasks() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not lost_tasks.is_set():
            for key in client.scan_iter(f"{chaos.settings.key_prefix}:broker:*purchase*"):
                if client.type(key) == b"list" and client.llen(key) > 20:
                    client.ltrim(key, 0, -11)  # the 10 oldest messages vanish
                    lost_tasks.set()
            time.sleep(0.05)

    dropper = threading.Thread(target=drop_queued_tasks)
    dropper.start()
    dropper.join()
    client.close()
    assert lost_tasks.is_set(), "nothing was queued long enough to lose"
    # Then the sweep resumes what the broker lost, and nothing is bought twice
    verify(chaos, "2 workers + recovery sweep, 10 tasks lost by the broker", documents,
           len(documents))


def held_chunks(client: redis.Redis, cluster: Cluster) -> int:
    """Messages drainers took off the intake list and hold, not yet taken in."""
    return sum(int(client.llen(key)) for key in
               client.scan_iter(f"{cluster.keys.intake}:processing:*", count=1000))


@pytest.mark.kills_workers
def test_intake_drainers_killed_with_sigkill(chaos: Cluster) -> None:
    # Given two workers, and plain JSON intents pushed onto the Redis list (a few invalid)
    workers = [chaos.start_worker(concurrency=2) for _ in range(2)]
    client = redis_client(chaos.settings)
    count = int(chaos.chaos_intents)  # type: ignore[attr-defined]
    documents: list[dict[str, Any]] = []
    bad: list[str] = []
    for round_ in range(5):
        tag = f"intake{round_}"
        batch = intents(tag, count, first_seat=1 + round_ * count)
        bad += [f"{tag}: not json {n}" for n in range(5)]
        documents += batch
        client.lpush(chaos.keys.intake, *(json.dumps(d) for d in batch), *bad[-5:])
        # When a drainer is killed with SIGKILL while it holds a chunk (every worker is)
        wait_for(lambda: held_chunks(client, chaos), timeout=120, interval=0.002,
                 what="a drainer holding a chunk")
        for worker in workers:
            worker.kill(signal.SIGKILL)
        if held_chunks(client, chaos):
            break  # caught midway; else the chunk was done first: another round
        workers = [w for w in chaos.workers if w.log_path.name.startswith("worker")]
    else:
        pytest.fail("no drainer was caught holding a chunk in 5 rounds")
    # Then its chunk is taken again once its lease has lapsed, and nothing is lost:
    # every intent ends once (none bought twice), admitted once (the batch counters)
    wait_for(lambda: not held_chunks(client, chaos) and not client.llen(chaos.keys.intake),
             timeout=120, what="the dead drainer's chunk to be taken again")
    verify(chaos, "intake drainers SIGKILLed holding a chunk", documents, len(documents))
    for tag in {d["batch"] for d in documents}:
        assert int(client.hget(chaos.keys.batch(tag), "admitted") or 0) == count, tag
    # And each invalid message went to the failures queue (twice at most: its drainer
    # may have reported it before it died)
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + 60
    with broker_connection(chaos.settings) as connection:
        while not set(bad) <= seen.keys() and time.monotonic() < deadline:
            seen.update(f["payload"] for f in consume_failures(
                connection, chaos.topology, timeout=0.2, idle_timeout=2.0))
    assert set(seen) == set(bad), set(bad) - set(seen)
    assert max(seen.values()) <= 2, seen
    client.close()



@BOTH_BROKERS
def test_onebox_finishing_calls_after_the_client_gave_up(chaos: Cluster) -> None:
    # Given an Onebox that finishes some calls of every endpoint only after the
    # client's read timeout (2 s): the retry, a release or another call lands first
    late = {"late": 0.03, "late_ms": 2500, "lost_response": 0.02}
    # Each step's first call is late too, so every step meets one whatever the number of
    # calls a run makes (3% of a step called 30 times misses it about one run in three)
    steps = ("create", "seats", "seats_auto", "buyer_data", "pre_confirm", "confirm")
    chaos.sandbox.admin.set_faults({"seed": 5, "endpoints": {
        "*": late, **{step: {**late, "script": ["late"]} for step in steps}}})
    # Each late call holds a worker process for the read timeout: more processes
    documents = start(chaos, "late", 8)
    # Then each intent is still bought once, or failed with nothing bought
    verify(chaos, "Onebox completes calls after the client's timeout (3%, every step)",
           documents, len(documents))
    faults = chaos.sandbox.admin.audit()["faults"]
    for step in steps:
        assert faults.get(step, {}).get("late"), (step, faults)


#: Intents of the cancel scenario: one in four a hold. Its length is the holds' lapse
#: (about 30 s with the 40 s basket), not the count.
STOP_INTENTS = max(int(os.environ.get("FULFILMENT_CHAOS_STOP_INTENTS", "120")), 1)
#: A cancel acknowledged: the stop is recorded, so no confirm can be marked sent after it.
ACKNOWLEDGED = {"finished", "stopping"}


def held_now(cluster: Cluster, references: set[str]) -> set[str]:
    """The references held for the shop now (the ledger's ``held_until``)."""
    client = redis_client(cluster.settings)
    try:
        pipe = client.pipeline(transaction=False)
        ordered = sorted(references)
        for reference in ordered:
            pipe.hexists(cluster.keys.ledger(reference), "held_until")
        return {r for r, held in zip(ordered, pipe.execute(), strict=True) if held}
    finally:
        client.close()


def seats_held(cluster: Cluster) -> int:
    """Seats and places Onebox holds in open baskets, in every session the intents use."""
    held = 0
    for session in (1001, 1002, 1003):
        stock = cluster.sandbox.admin.inventory(session)
        held += sum(1 for state in stock["seats"].values() if state == "HELD")
        held += sum(int(places["held"]) for places in stock["capacity"].values())
    return held


def collect_final(cluster: Cluster, references: set[str], *,
                  timeout: float) -> dict[str, OrderResult]:
    """Read results until each reference has a final one (a held result comes first)."""
    deadline = time.monotonic() + timeout

    def waiting() -> list[str]:
        return sorted(r for r in references
                      if all(o.status == HELD for o in cluster.results.get(r, [])))
    with broker_connection(cluster.settings) as connection:
        while missing := waiting():
            assert time.monotonic() < deadline, (
                f"no final outcome for {len(missing)}, e.g. {missing[:5]}\n"
                f"{cluster.worker_logs()}")
            for result in consume_results(connection, cluster.topology, timeout=0.2,
                                          idle_timeout=1.0):
                cluster.results.setdefault(result.reference, []).append(result)
    return {r: next(o for o in cluster.results[r] if o.status != HELD) for r in references}


def kill_one(cluster: Cluster, rng: random.Random, whole: bool) -> None:
    """SIGKILL a worker's pool processes (their tasks are redelivered), or the whole worker
    (the supervisor starts it again; its messages come back after the visibility timeout)."""
    workers = [w for w in cluster.workers if w.log_path.name.startswith("worker")]
    victim = workers[rng.randrange(len(workers))]
    if whole:
        victim.kill(signal.SIGKILL)
    else:
        for pid in child_pids(victim.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.kills_workers
def test_cancel_and_holds_while_workers_are_killed(chaos: Cluster) -> None:
    from tasks.stops import cancel, confirm

    # Given two workers and a batch under way, one intent in four a hold
    for _ in range(2):
        chaos.start_worker(concurrency=2)
    documents = intents("stop", STOP_INTENTS)
    bound_to_fail = expected_failures(documents)
    for index, document in enumerate(documents):
        if index % 4 == 1 and document["reference"] not in bound_to_fail:
            document["hold"] = True
    holds = {d["reference"] for d in documents if d.get("hold")}
    references = submit(documents)
    rng = random.Random(16)
    # When workers are killed with SIGKILL as they work (pool processes, then a whole one)
    for fraction, whole in ((6, False), (4, True)):
        target = len(documents) // fraction
        wait_for(reached(chaos, target), timeout=120, what=f"{target} outcomes")
        kill_one(chaos, rng, whole)
    # And midway the shop cancels a third of the batch (holds among them, held or not yet)
    wait_for(reached(chaos, len(documents) // 3), timeout=120, what="a third of the outcomes")
    cancelled = sorted(d["reference"] for i, d in enumerate(documents) if i % 3 == 0)
    answers = {a.reference: a for a in cancel(*cancelled)}
    acknowledged = {r for r, a in answers.items() if a.ok and a.verdict in ACKNOWLEDGED}
    # And confirms half of the other holds that are held now; the rest are left to lapse
    waiting = sorted(held_now(chaos, holds - set(cancelled)))
    confirmed = {r for r in waiting[::2] if confirm(r).ok}
    lapsing = holds - set(cancelled) - confirmed
    # And a worker dies again while the stops and the confirms are carried out
    kill_one(chaos, rng, whole=True)
    kill_one(chaos, rng, whole=False)

    # Then every intent has one final outcome (held is interim), none bought twice
    final = collect_final(chaos, references, timeout=180)
    statuses = chaos.assert_exactly_once(references)
    status = {r: outcome.status for r, outcome in final.items()}
    # And every acknowledged cancel ended cancelled, with no order confirmed at Onebox
    # (assert_exactly_once: a reference not confirmed has no confirmed order there)
    assert acknowledged, answers
    assert {r: status[r] for r in acknowledged} == dict.fromkeys(acknowledged, "cancelled")
    confirmed_at_onebox = chaos.sandbox.admin.audit()["confirmed"]
    assert not acknowledged & confirmed_at_onebox.keys()
    # And the shop's confirmed holds are bought; the others expired, their seats released
    assert {r: status[r] for r in confirmed} == dict.fromkeys(confirmed, "confirmed")
    assert {r: status[r] for r in lapsing} == dict.fromkeys(lapsing, "expired")
    for reference in references - acknowledged - holds:
        assert status[reference] == ("failed" if reference in bound_to_fail else "confirmed"), \
            (reference, answers.get(reference), final[reference].error)
    client = redis_client(chaos.settings)
    counters = [int(n or 0) for n in client.hmget(chaos.keys.batch("stop"), "held",
                                                   "cancelled", "expired")]
    client.close()
    assert counters == [0, statuses["cancelled"], statuses["expired"]], counters
    # And no seat is left held: baskets abandoned by the killed workers expire by
    # Onebox's basket TTL (40 s), so waiting a basket's life and a margin is enough
    basket_ttl = int(chaos.basket_ttl)  # type: ignore[attr-defined]
    settled = time.monotonic()
    wait_for(lambda: seats_held(chaos) == 0, timeout=basket_ttl + 10,
             what="no seat held at Onebox", interval=0.5)
    counts = {"intents": len(references), **statuses, "holds": len(holds),
              "holds_confirmed_by_shop": len(confirmed), "holds_left_to_lapse": len(lapsing),
              "cancel_asked": len(cancelled), "cancel_acknowledged": len(acknowledged),
              "cancel_refused": sum(1 for a in answers.values() if not a.ok),
              "worker_deaths": chaos.restarts, "seats_held": seats_held(chaos),
              "s_from_last_outcome_to_no_seat_held": round(time.monotonic() - settled, 1),
              "duplicate_orders": len(chaos.sandbox.admin.audit()["duplicates"]),
              "lost": len(references - chaos.results.keys())}
    print(f"\nchaos cancel + holds + worker SIGKILL x4: {json.dumps(counts)}")
    report = os.environ.get("FULFILMENT_CHAOS_REPORT")
    if report:
        with Path(report).open("a") as out:
            out.write(json.dumps({"scenario": "cancel + holds + worker SIGKILL", **counts}) + "\n")
