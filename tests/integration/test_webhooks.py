"""Onebox's webhooks end to end (issue 17, item 4): a real ``fulfilment webhooks`` process,
a real worker, real Redis, and the sandbox as a process sending webhooks as Onebox does.

One deployment for the module (one worker, concurrency 1: webhook tasks run in the order
they were handed over, so a later webhook's event is a barrier proving nothing earlier
is still coming).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator

import pytest
import redis
import requests

from fulfilment.flow import Proceed, Services, Stage, advance
from fulfilment.harness.cluster import Cluster, env_for
from fulfilment.harness.processes import WebhooksProcess, wait_for
from fulfilment.lookup import intent_status
from fulfilment.onebox import build_client
from fulfilment.results import consume_aftersale, consume_results
from fulfilment.wiring import broker_connection, build_services, redis_client
from schemas.aftersale import AftersaleEvent
from schemas.intent import Buyer, SeatRef, load_intent
from schemas.result import UNSETTLED, OrderResult, ResultError, result_id_for
from tests import services as real
from tests.deployment import deployment

pytestmark = pytest.mark.integration

SECRET = "whsec-Integration-91c2"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    redis_url, prefix = real.redis_url(), real.unique_prefix()
    tmp = tmp_path_factory.mktemp("webhooks")
    with deployment(tmp, redis_url, prefix, webhook_secret=SECRET) as running:
        running.start_worker(concurrency=1)
        yield running
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def receiver(cluster: Cluster) -> WebhooksProcess:
    process = WebhooksProcess(cluster.tmp / "webhooks.log", env_for(cluster.settings))
    cluster.workers.append(process)  # stopped with the deployment
    return process


@pytest.fixture(scope="module")
def services(cluster: Cluster) -> Iterator[Services]:
    built = build_services(cluster.settings, redis_client(cluster.settings))
    yield built
    built.ledger.redis.close()


def confirmed_order(cluster: Cluster, seat: int) -> str:
    """An order sold outside this deployment (as the box office would): its code."""
    client = build_client(cluster.settings, redis_client(cluster.settings))
    try:
        order = client.create_order()
        client.add_seats(order.id, [SeatRef(id=seat, session_id=1001)])
        client.set_buyer(order.id, Buyer(email="box@example.com"))
        client.pre_confirm(order.id)
        code = client.confirm(order.id, f"box-{uuid.uuid4().hex[:8]}").code
    finally:
        client.close()
    assert code
    return code


def post(receiver: WebhooksProcess, action: str, code: str, *, secret: str | None = SECRET,
         delivery: str | None = None) -> requests.Response:
    body = json.dumps({"code": code, "url": f"http://onebox/orders/{code}"}).encode()
    headers = {"Content-Type": "application/json", "ob-event": "ORDER", "ob-action": action,
               "ob-delivery-id": delivery or str(uuid.uuid4()), "ob-hook-id": "hook-1"}
    if secret is not None:
        headers["ob-signature"] = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return requests.post(receiver.endpoint, data=body, headers=headers, timeout=10)


def events_until(cluster: Cluster, code: str, action: str) -> list[AftersaleEvent]:
    """The order's after-sale events, read until (code, action)'s arrives: everything
    handed over before it has been acted on by then (one worker, in order). Each is
    read whole (``limit=1``), so each is acknowledged."""
    seen: list[AftersaleEvent] = []
    with broker_connection(cluster.settings) as connection:
        while True:
            taken = list(consume_aftersale(connection, cluster.topology, timeout=0.2,
                                           idle_timeout=60, limit=1))
            if not taken:
                raise AssertionError(f"no {action} event for {code}; got {seen}\n"
                                     f"{cluster.worker_logs()}")
            seen += [event for event in taken if event.order_code == code]
            if (taken[0].order_code, taken[0].action) == (code, action):
                return seen


def test_a_webhook_delivered_three_times_acts_once(
        cluster: Cluster, receiver: WebhooksProcess, services: Services) -> None:
    # Given an unsettled purchase: its confirm reached Onebox, which could not say so in time
    ledger, reference = services.ledger, f"wh-{uuid.uuid4().hex[:8]}"
    ledger.admit(load_intent({"reference": reference, "buyer": {"email": "ana@example.com"},
                              "items": [{"session_id": 1002, "price_type_id": 3,
                                         "quantity": 1}]}))
    assert isinstance(advance(services, reference, Stage.PRE_CONFIRMED), Proceed)
    entry = ledger.get(reference)
    assert entry is not None and entry.code and entry.order_id
    services.client.confirm(entry.order_id, reference)
    ledger.record(reference, confirm_sent=True)
    ledger.finish(reference, OrderResult(
        result_id=result_id_for(reference), reference=reference, status=UNSETTLED,
        order_code=entry.code, error=ResultError(code="CONFIRM_UNSETTLED",
                                                 message="Onebox could not tell")))
    ledger.mark_published(reference)
    # When Onebox's PURCHASE webhook comes three times, each with a new delivery id
    answers = [post(receiver, "PURCHASE", entry.code) for _ in range(3)]
    # Then the first is handed over, the others acknowledged as duplicates
    assert [(a.status_code, a.json()["status"]) for a in answers] == [
        (200, "accepted"), (200, "duplicate"), (200, "duplicate")]
    # And the same for a REFUND of that order (a barrier for what follows, too)
    refunds = [post(receiver, "REFUND", entry.code).json()["status"] for _ in range(3)]
    assert refunds == ["accepted", "duplicate", "duplicate"]
    [refund] = events_until(cluster, entry.code, "refund")
    assert (refund.reference, refund.action) == (reference, "refund")
    # And the purchase was settled once: one confirmed result
    with broker_connection(cluster.settings) as connection:
        results = [r for r in consume_results(connection, cluster.topology, timeout=0.2,
                                              idle_timeout=1.0) if r.reference == reference]
    assert [r.status for r in results] == ["confirmed"]
    assert intent_status(ledger.redis, ledger.keys, reference).state == "confirmed"


@pytest.mark.parametrize("secret", [None, "not-the-secret"], ids=["unsigned", "forged"])
def test_a_forged_or_unsigned_webhook_is_refused_and_changes_nothing(
        cluster: Cluster, receiver: WebhooksProcess, secret: str | None) -> None:
    code = confirmed_order(cluster, 10 if secret else 11)
    client = redis.Redis.from_url(cluster.settings.redis_url)
    # When a CANCEL comes unsigned, or signed with another secret
    answer = post(receiver, "CANCEL", code, secret=secret)
    # Then it is refused, and nothing about the order is written
    assert answer.status_code == 401
    assert list(client.scan_iter(match=f"{cluster.settings.key_prefix}:*{code}*")) == []
    # And nothing is published: the next (signed) webhook's event comes first
    assert post(receiver, "REFUND", code).json()["status"] == "accepted"
    assert [e.action for e in events_until(cluster, code, "refund")] == ["refund"]
    client.close()


def test_a_box_office_cancel_reaches_the_shop_once_through_the_sandbox_webhooks(
        cluster: Cluster, receiver: WebhooksProcess) -> None:
    admin = cluster.sandbox.admin
    code = confirmed_order(cluster, 12)
    # Given the sandbox sends webhooks to the receiver, and never sees its answers (so it
    # sends each one 1 + 2 retries times, each with a new delivery id)
    admin.webhooks(url=receiver.endpoint, secret=SECRET, retries=2, backoff_min=0.05,
                   backoff_max=0.2, delivery="lost_answer")
    try:
        # When the box office cancels the order
        assert admin.box_office(code, "CANCEL")["notified"] is True
        sent = wait_for(lambda: [d for d in admin.webhooks()["deliveries"]
                                 if d["code"] == code and d["outcome"] == "dropped"],
                        timeout=30, what="the sandbox to give the CANCEL up")
        assert sent
        deliveries = [d for d in admin.webhooks()["deliveries"] if d["code"] == code]
        # Then the receiver got it three times, with three delivery ids, and took it once
        assert [d["status"] for d in deliveries] == [200, 200, 200]
        assert len({d["delivery_id"] for d in deliveries}) == 3
        assert [d["answer"] for d in deliveries] == ["accepted", "duplicate", "duplicate"]
        # And the shop gets one aftersale.cancel (a REFUND after it is the barrier)
        admin.webhooks(delivery="normal")
        admin.box_office(code, "REFUND")
        events = events_until(cluster, code, "refund")
        assert [(e.order_code, e.action) for e in events] == [(code, "cancel"), (code, "refund")]
        assert events[0].reference is None  # an order this deployment did not buy
    finally:
        admin.webhooks(url="")
