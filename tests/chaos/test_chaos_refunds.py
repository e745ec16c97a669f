"""Chaos after the sale (issue 17): refunds and Onebox's webhooks under worker kills and faults.

One scenario, on a deployment of its own built as tests/chaos/test_chaos.py builds
its (a redis-server with ``appendfsync always``, the sandbox, two Celery workers
under a supervisor, celery beat), plus the ``fulfilment webhooks`` receiver with
the sandbox sending it Onebox's webhooks, each several times (its answers are
treated as lost). In three phases:

1. Purchases while Onebox loses confirm answers and refuses every order read:
   some end ``unsettled``; pool processes are SIGKILLed midway.
2. Refunds of confirmed purchases (some asked twice, with another id) while the
   reads are still refused and refund answers are lost; a whole worker and the
   pool processes are SIGKILLed as they work; one refund is admitted and its
   message lost before any worker took it (the recovery sweep must resume it).
3. Reads work again, and Onebox would refund an item twice if asked twice
   (``repeat_refund=again``: no 409 to hide a blind resend). A refund's worker is
   SIGKILLed after Onebox did the refund and before its answer was recorded; more
   refunds, lost answers among them.

Then every purchase has one final outcome (the unsettled ones settled by the
schedule or by their PURCHASE webhook), every refund id exactly one outcome,
Onebox refunded no item twice and sold nothing twice, the refunded seats and
places are on sale again, and each refunded order reached the shop as one
after-sale event. Set FULFILMENT_CHAOS_REPORT to a file to have the counts appended.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from fulfilment.harness.cluster import Cluster, env_for
from fulfilment.harness.processes import Child, WebhooksProcess, child_pids, wait_for
from fulfilment.results import consume_aftersale, consume_refund_results, consume_results
from fulfilment.wiring import broker_connection, redis_client
from schemas.aftersale import AftersaleEvent, aftersale_id_for
from schemas.refund import RefundResult
from schemas.result import UNSETTLED, OrderResult
from tests.chaos.test_chaos import _chaos_cluster, expected_failures, intents, reached, submit

pytestmark = pytest.mark.integration

#: Purchases of the scenario (at least 40: it refunds 20 of those confirmed).
REFUND_INTENTS = max(int(os.environ.get("FULFILMENT_CHAOS_REFUND_INTENTS", "60")), 40)
SECRET = "whsec-Chaos-Refunds-17"
#: Refunds in phase 2 (the first TWICE asked again with another id) and phase 3.
FIRST_WAVE, TWICE, SECOND_WAVE = 10, 4, 8


@pytest.fixture
def aftersale(tmp_path: Path) -> Iterator[Cluster]:
    # Unsettled intents are read again 1 s after, doubling (beat looks every 5 s); a
    # killed worker's lease lapses in 5 s, so a redelivered refund waits little; a 5 s
    # read timeout leaves the test time to kill a worker whose refund call is answered late.
    yield from _chaos_cluster(tmp_path, None, 40, settle_first=1.0, lease_ttl=5.0,
                              onebox_read_timeout=5.0, webhook_secret=SECRET)


def workers(cluster: Cluster) -> list[Child]:
    return [w for w in cluster.workers if w.log_path.name.startswith("worker")]


def kill_pools(cluster: Cluster) -> int:
    """SIGKILL every worker's pool processes: the tasks they held are redelivered."""
    killed = 0
    for worker in workers(cluster):
        for pid in child_pids(worker.pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


def collect_refunds(cluster: Cluster, ids: set[str], found: dict[str, list[RefundResult]], *,
                    timeout: float, quiet: float = 0.0) -> None:
    """Refund outcomes into ``found`` until every id in ``ids`` has one (then ``quiet``
    seconds more, so a second outcome would show)."""
    deadline = time.monotonic() + timeout
    with broker_connection(cluster.settings) as connection:
        while not ids <= found.keys():
            assert time.monotonic() < deadline, (
                f"no refund outcome for {sorted(ids - found.keys())}\n{cluster.worker_logs()}")
            for result in consume_refund_results(connection, cluster.topology, timeout=0.2,
                                                 idle_timeout=1.0):
                found.setdefault(result.refund_id, []).append(result)
        if quiet:
            for result in consume_refund_results(connection, cluster.topology, timeout=0.2,
                                                 idle_timeout=quiet):
                found.setdefault(result.refund_id, []).append(result)


def collect_settled(cluster: Cluster, references: set[str], *,
                    timeout: float) -> dict[str, OrderResult]:
    """Results until each reference has a final one (``unsettled`` is not); the
    unsettled ones are then dropped, as ``fulfilment settle``'s test does."""
    deadline = time.monotonic() + timeout

    def waiting() -> list[str]:
        return sorted(r for r in references
                      if all(o.status == UNSETTLED for o in cluster.results.get(r, [])))

    with broker_connection(cluster.settings) as connection:
        while missing := waiting():
            assert time.monotonic() < deadline, (
                f"still unsettled: {missing[:5]}\n{cluster.worker_logs()}")
            for result in consume_results(connection, cluster.topology, timeout=0.2,
                                          idle_timeout=1.0):
                cluster.results.setdefault(result.reference, []).append(result)
    for reference in references:
        cluster.results[reference] = [o for o in cluster.results[reference]
                                      if o.status != UNSETTLED]
    return {r: cluster.results[r][0] for r in references}


def collect_aftersale(cluster: Cluster, codes: set[str], *,
                      timeout: float) -> dict[str, list[AftersaleEvent]]:
    """After-sale events until each order code has a refund one, then 2 s more (any other
    would show)."""
    found: dict[str, list[AftersaleEvent]] = {}
    deadline = time.monotonic() + timeout
    with broker_connection(cluster.settings) as connection:
        while not codes <= found.keys():
            assert time.monotonic() < deadline, (
                f"no after-sale refund event for {sorted(codes - found.keys())[:5]}\n"
                f"{cluster.worker_logs()}")
            for event in consume_aftersale(connection, cluster.topology, timeout=0.2,
                                           idle_timeout=1.0):
                found.setdefault(event.order_code, []).append(event)
        for event in consume_aftersale(connection, cluster.topology, timeout=0.2,
                                       idle_timeout=2.0):
            found.setdefault(event.order_code, []).append(event)
    return found


@pytest.mark.kills_workers
@pytest.mark.timeout(240)
def test_refunds_and_webhooks_while_workers_are_killed(aftersale: Cluster) -> None:
    from fulfilment.refunds import submit_refund
    from tasks import refund, runtime

    cluster, admin = aftersale, aftersale.sandbox.admin
    started = time.monotonic()
    # Given the webhooks receiver, and the sandbox sending it Onebox's webhooks, each
    # three times (it treats every answer as lost), with a new delivery id each time
    receiver = WebhooksProcess(cluster.tmp / "webhooks.log", env_for(cluster.settings))
    cluster.workers.append(receiver)  # stopped with the deployment
    admin.webhooks(url=receiver.endpoint, secret=SECRET, retries=2, backoff_min=0.2,
                   backoff_max=1.0, delivery="lost_answer")
    # And an Onebox that loses confirm answers and will not show any order
    admin.configure(orders_mgmt_read="403")
    admin.set_faults({"seed": 17, "endpoints": {"confirm": {"lost_response": 0.3}}})

    # When a batch is bought by two workers whose pool processes are SIGKILLed midway
    for _ in range(2):
        cluster.start_worker(concurrency=2)
    documents = intents("refunds", REFUND_INTENTS)
    references = submit(documents)
    pools_killed = 0
    for fraction in (3.0, 1.5):
        target = int(len(documents) / fraction)
        wait_for(reached(cluster, target), timeout=120, what=f"{target} outcomes")
        pools_killed += kill_pools(cluster)
    first = cluster.collect(references, timeout=120)
    unsettled = sorted(r for r, o in first.items() if o.status == UNSETTLED)
    confirmed = sorted(r for r, o in first.items() if o.status == "confirmed")
    assert unsettled, "no purchase ended unsettled: the scenario would settle nothing"
    assert len(confirmed) >= FIRST_WAVE + 2 + SECOND_WAVE, (len(confirmed), first)
    purchases_done = time.monotonic()

    # And, reads still refused and refund answers lost, refunds are asked for while a
    # whole worker and then the pool processes are SIGKILLed; some twice, another id
    admin.set_faults({"seed": 18, "endpoints": {"refund": {"lost_response": 0.3}}})
    asked: dict[str, str] = {}  # refund id -> reference
    wave = confirmed[:FIRST_WAVE]
    for n, reference in enumerate(wave):
        asked[refund(reference, refund_id=f"{reference}-r1").refund_id] = reference
        if n == len(wave) // 2:
            workers(cluster)[0].kill(signal.SIGKILL)  # back after the visibility timeout
    for reference in wave[:TWICE]:
        asked[refund(reference, refund_id=f"{reference}-r2").refund_id] = reference
    pools_killed += kill_pools(cluster)
    # And one refund is admitted whose message is lost before any worker takes it
    lost_reference = confirmed[FIRST_WAVE]
    lost = submit_refund(runtime.services(), {"reference": lost_reference,
                                              "refund_id": f"{lost_reference}-lost"},
                         lambda document: None)
    asked[lost.refund_id] = lost_reference
    found: dict[str, list[RefundResult]] = {}
    client = redis_client(cluster.settings)

    def each_done_or_waiting_to_read() -> bool:
        # A refund Onebox answered "an item refunded already" for several items waits to
        # read the order (which items?): it cannot end while reads are refused.
        states = [client.hmget(cluster.keys.refund(i), "state", "outcome") for i in asked]
        return all(outcome is not None or state == b"conflict" for state, outcome in states)

    wait_for(each_done_or_waiting_to_read, timeout=120, interval=0.2,
             what="each refund done, or waiting for Onebox to show its order")
    first_wave_done = time.monotonic()

    # And then Onebox shows orders again, and refunds an item twice if asked twice
    admin.configure(orders_mgmt_read="ok", repeat_refund="again")
    admin.set_faults({"seed": 19, "endpoints": {"refund": {
        "script": ["slow_after"], "slow_after_ms": 8000, "lost_response": 0.3}}})
    # And a refund's worker is SIGKILLed after Onebox did it, before its answer was recorded
    killed_reference = confirmed[FIRST_WAVE + 1]
    killed_code = first[killed_reference].order_code
    assert killed_code
    killed_id = refund(killed_reference, refund_id=f"{killed_reference}-killed").refund_id
    asked[killed_id] = killed_reference

    def sent_not_answered() -> bool:
        if not admin.audit()["refunded"].get(killed_code):
            return False
        state, outcome = client.hmget(cluster.keys.refund(killed_id), "state", "outcome")
        return state == b"sent" and outcome is None

    wait_for(sent_not_answered, timeout=60, interval=0.02,
             what="the refund done at Onebox, its answer not yet recorded")
    killed_mid_refund = kill_pools(cluster)
    assert killed_mid_refund
    pools_killed += killed_mid_refund
    # And more refunds, lost answers among them
    for reference in confirmed[FIRST_WAVE + 2:FIRST_WAVE + 2 + SECOND_WAVE]:
        asked[refund(reference, refund_id=f"{reference}-r1").refund_id] = reference
    collect_refunds(cluster, set(asked), found, timeout=120)
    refunds_done = time.monotonic()

    # Then every purchase has one final outcome: none is left unsettled
    final = collect_settled(cluster, references, timeout=120)
    statuses = cluster.assert_exactly_once(references)  # no order twice, no seat twice
    bound_to_fail = expected_failures(documents)
    for reference, outcome in final.items():
        assert outcome.status == ("failed" if reference in bound_to_fail else "confirmed"), \
            (reference, outcome.error)
    assert client.zcard(cluster.keys.unsettled) == 0
    settled = time.monotonic()
    # And every refund id has exactly one outcome (delivered at least once), refunded
    collect_refunds(cluster, set(asked), found, timeout=30, quiet=2.0)
    assert found.keys() == asked.keys(), set(found) ^ set(asked)
    for refund_id, outcomes in found.items():
        assert len({o.result_id for o in outcomes}) == 1, (refund_id, outcomes)
        assert {o.status for o in outcomes} == {"refunded"}, (refund_id, outcomes)
    outcome_of = {refund_id: outcomes[0] for refund_id, outcomes in found.items()}
    # And Onebox refunded each refunded order's items once, none twice (every item: the
    # seats and places back on sale, below). An outcome names the items it refunded
    # unless Onebox said "already refunded" and would not show the order.
    audit = admin.audit()
    refunded = {reference: final[reference].order_code for reference in set(asked.values())}
    for refund_id, reference in asked.items():
        code = refunded[reference]
        assert code is not None and set(audit["refunded"].get(code, {}).values()) == {1}, \
            (reference, audit["refunded"].get(code))
        named = {str(item) for item in outcome_of[refund_id].items}
        assert named <= audit["refunded"][code].keys(), (refund_id, named)
    assert audit["refunded_twice"] == 0
    # And the refund killed after its POST was read back, not sent again
    assert outcome_of[killed_id].attempts == 1, outcome_of[killed_id]
    # Every worker's log, those killed and started again included
    logs = "".join(path.read_text(errors="replace")
                   for path in sorted(cluster.tmp.glob("worker*.log")))
    assert f"read back order {killed_code}: refunded; nothing sent again" in logs
    # (killed before its client gave up on the answer: no run saw the call time out)
    assert not [line for line in logs.splitlines()
                if f"ref={killed_reference} " in line and "refund not done yet" in line]
    # And the refunded seats and places are on sale again; the others stay sold
    documents_by_reference = {d["reference"]: d for d in documents}
    seats = admin.inventory(1001)["seats"]
    places_sold = 0
    for reference, outcome in final.items():
        items = documents_by_reference[reference]["items"][0]
        if outcome.status != "confirmed":
            continue
        if "seats" in items:
            seat = str(items["seats"][0]["id"])
            assert seats[seat] == ("FREE" if reference in refunded else "SOLD"), reference
        elif reference not in refunded:
            places_sold += items["quantity"]
    assert admin.inventory(1002)["capacity"]["3"]["sold"] == places_sold
    # And each refunded order reached the shop as one after-sale refund event (its id
    # the same however often delivered), however many times its webhook came; no other
    events = collect_aftersale(cluster, {c for c in refunded.values() if c}, timeout=60)
    assert events.keys() == set(refunded.values())
    assert {code: {(e.action, e.event_id, e.reference) for e in found_events}
            for code, found_events in events.items()} == {
        code: {("refund", aftersale_id_for(code, "refund"), reference)}
        for reference, code in refunded.items() if code}
    webhooks = admin.webhooks()
    client.close()

    counts = {
        "intents": len(references), **statuses,
        "unsettled_then_settled": len(unsettled),
        # What each unsettled purchase's PURCHASE webhook (handed over once) found, and
        # how many it settled once the purchase ended unsettled (kept, then Onebox's word)
        "purchase_webhook_of_unsettled": dict(Counter(
            line.rstrip().rsplit(": ", 1)[-1] for line in logs.splitlines()
            if "webhook for order" in line and "settles it" not in line
            and any(f"ref={reference} " in line for reference in unsettled))),
        "settled_by_the_purchase_webhook": sum(
            "PURCHASE webhook for order" in line and line.rstrip().endswith("settles it")
            for line in logs.splitlines()),
        "refund_ids": len(asked), "refunded_orders": len(refunded),
        "already_refunded": sum(o.already_refunded for o in outcome_of.values()),
        "refund_outcomes_redelivered": sum(len(v) for v in found.values()) - len(found),
        "refund_calls": audit["requests"].get("refund", 0),
        "refund_conflicts_409": audit["refund_conflicts"],
        "refund_faults": audit["faults"].get("refund", {}),
        "refunded_twice": audit["refunded_twice"],
        "duplicate_orders": len(audit["duplicates"]),
        "seats_sold_twice": audit["seats_sold_twice"],
        "webhooks_sent": webhooks["sent"], "webhook_notifications": webhooks["notifications"],
        "aftersale_refund_events": sum(len(v) for v in events.values()),
        "pool_processes_killed": pools_killed, "workers_killed": 1,
        "worker_restarts": cluster.restarts,
        "seconds": {"purchases": round(purchases_done - started, 1),
                    "first_refunds": round(first_wave_done - purchases_done, 1),
                    "second_refunds": round(refunds_done - first_wave_done, 1),
                    "settled_after": round(settled - refunds_done, 1),
                    "total": round(time.monotonic() - started, 1)},
    }
    print(f"\nchaos refunds and webhooks: {json.dumps(counts)}")
    report = os.environ.get("FULFILMENT_CHAOS_REPORT")
    if report:
        with Path(report).open("a") as out:
            out.write(json.dumps({"scenario": "refunds and webhooks", **counts}) + "\n")
