"""Hold, confirm, cancel end to end: real Redis, a real worker and beat, the sandbox over HTTP,
on both brokers.

One deployment per broker walks each way a hold ends (confirmed by the shop, cancelled,
lapsed), a cancel before the confirm was sent and one after, and checks: one outcome per
intent (the held result interim, with the same result_id), nothing bought twice, and no
seat left held at Onebox.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from fulfilment.harness.cluster import Cluster
from fulfilment.harness.processes import wait_for
from fulfilment.redis_text import text
from tests.deployment import deployment

pytestmark = pytest.mark.integration

SESSION, PRICE_TYPE = 1002, 3
#: Onebox's basket in the sandbox: a hold lapses HOLD_MARGIN (10 s) before it, or halfway.
BASKET_TTL = 16


def intent(reference: str, **extra: Any) -> dict[str, Any]:
    return {"reference": reference, "buyer": {"email": f"{reference}@example.com"},
            "items": [{"session_id": SESSION, "price_type_id": PRICE_TYPE, "quantity": 2}],
            **extra}


def held_seats(cluster: Cluster) -> int:
    return int(cluster.sandbox.admin.inventory(SESSION)["capacity"][str(PRICE_TYPE)]["held"])


def ledger_field(cluster: Cluster, reference: str, name: str) -> str | None:
    client = redis.Redis.from_url(cluster.settings.redis_url)
    try:
        value = client.hget(cluster.keys.ledger(reference), name)
    finally:
        client.close()
    return text(value) if value is not None else None


def counter(cluster: Cluster, batch: str, name: str) -> int:
    client = redis.Redis.from_url(cluster.settings.redis_url)
    try:
        return int(client.hget(cluster.keys.batch(batch), name) or 0)
    finally:
        client.close()


def statuses_of(cluster: Cluster, reference: str) -> list[str]:
    return [r.status for r in cluster.results.get(reference, [])]


def wait_status(cluster: Cluster, reference: str, status: str, timeout: float = 90) -> None:
    """Read results until ``reference`` has one with ``status`` (a held one comes first)."""
    from fulfilment.results import consume_results
    from fulfilment.wiring import broker_connection

    def seen() -> bool:
        with broker_connection(cluster.settings) as connection:
            for result in consume_results(connection, cluster.topology, timeout=0.2,
                                          idle_timeout=0.5):
                cluster.results.setdefault(result.reference, []).append(result)
        return status in statuses_of(cluster, reference)
    wait_for(seen, timeout=timeout, what=f"{reference} {status}", interval=0.1)


def test_holds_end_confirmed_cancelled_or_expired_and_cancels_stop_in_time(
        redis_url: str, broker_url: str, prefix: str, tmp_path: Path) -> None:
    from tasks import submit, submit_many
    from tasks.stops import cancel, confirm

    with deployment(tmp_path, redis_url, prefix, "--basket-ttl", str(BASKET_TTL),
                    broker_url=broker_url, retry_deadline=120,
                    release_interval=0.5) as cluster:
        cluster.start_worker(concurrency=4, pool="threads", beat=True)
        # Given three held intents of one batch
        holds = ["hold-confirm", "hold-cancel", "hold-lapse"]
        answers = list(submit_many([intent(r, hold=True) for r in holds], batch="holds",
                                   lane="live"))
        assert {a.status for a in answers} == {"accepted"}, answers
        for reference in holds:
            wait_status(cluster, reference, "held")
        held = {r: cluster.results[r][0] for r in holds}
        assert all(h.status == "held" and h.order_code and h.hold_expires_at
                   for h in held.values()), held
        assert counter(cluster, "holds", "held") == 3
        assert held_seats(cluster) == 6

        # When the shop confirms one, cancels one and lets the third lapse
        assert confirm("hold-confirm").ok
        assert cancel("hold-cancel")[0].ok
        for reference, status in [("hold-confirm", "confirmed"), ("hold-cancel", "cancelled"),
                                  ("hold-lapse", "expired")]:
            wait_status(cluster, reference, status)
        finals = {r: cluster.results[r][-1] for r in holds}

        # Then each ends with one final outcome, the held result's result_id
        assert finals["hold-confirm"].status == "confirmed"
        assert finals["hold-cancel"].status == "cancelled"
        assert finals["hold-lapse"].status == "expired"
        assert finals["hold-lapse"].error is not None
        assert finals["hold-lapse"].error.code == "HOLD_EXPIRED"
        for reference in holds:
            assert {r.result_id for r in cluster.results[reference]} == \
                {held[reference].result_id}
        # And a confirm after the lapse is refused, saying why; a second cancel says the same
        late = confirm("hold-lapse")
        assert not late.ok and "hold" in late.message and "expired" in late.message, late
        assert cancel("hold-cancel")[0].ok
        assert not cancel("hold-confirm")[0].ok
        assert "too late, confirm was sent" in cancel("hold-confirm")[0].message
        assert [counter(cluster, "holds", name) for name in
                ("held", "confirmed", "cancelled", "expired")] == [0, 1, 1, 1]

        # Given a purchase whose confirm Onebox answers slowly, and one slow at adding seats
        cluster.sandbox.admin.set_faults({"endpoints": {
            "confirm": {"latency_ms": 3000}, "seats_auto": {"latency_ms": 1500}}})
        assert submit(intent("late-cancel")).status == "accepted"
        wait_for(lambda: ledger_field(cluster, "late-cancel", "confirm_sent") == "1",
                 timeout=60, what="the confirm sent")
        # When the shop cancels it while the confirm is out
        too_late = cancel("late-cancel")[0]
        # Then it is refused, and the purchase is bought as if nothing was asked
        assert not too_late.ok and "too late, confirm was sent" in too_late.message
        assert submit(intent("early-cancel")).status == "accepted"
        wait_for(lambda: ledger_field(cluster, "early-cancel", "order_id"), timeout=60,
                 what="the basket opened")
        # And one cancelled while its basket is being filled stops, its seats released
        assert cancel("early-cancel")[0].ok
        results = cluster.collect({"late-cancel", "early-cancel"}, timeout=90)
        assert results["late-cancel"].status == "confirmed"
        assert results["early-cancel"].status == "cancelled"

        every = {*holds, "late-cancel", "early-cancel"}
        statuses = cluster.assert_exactly_once(every)
        assert statuses == {"confirmed": 2, "cancelled": 2, "expired": 1}, statuses
        # No seat left held: the bought ones are sold, the rest free
        # (well before the baskets would expire by themselves)
        wait_for(lambda: held_seats(cluster) == 0, timeout=BASKET_TTL / 4, what="no seat held")
