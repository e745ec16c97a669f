"""What a finished intent keeps (issue 13, item 11), on a real Redis and the sandbox.

Once the outcome is written, the ledger entry drops the intent (the buyer's
e-mail, phone and names) in the same script, and keeps only what the readers
of a finished entry need. Each reader is run here against such an entry:
status, duplicate admission, batch status and outcomes, publishing again on
a redelivery, the recovery sweep, health, and settle.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from fulfilment import recovery
from fulfilment.batches import batch_outcomes, batch_status
from fulfilment.config import Settings
from fulfilment.flow import Proceed, Services, Stage, advance, settle
from fulfilment.health import check_health
from fulfilment.ledger import DROPPED_AT_OUTCOME, KEPT_AFTER_OUTCOME, Admission
from fulfilment.lookup import intent_status
from fulfilment.results import consume_results
from fulfilment.topology import Topology
from fulfilment.wiring import broker_connection, build_services, redis_client
from schemas.intent import load_intent
from schemas.result import UNSETTLED, OrderResult, ResultError, result_id_for

pytestmark = pytest.mark.integration

BUYER = {"email": "ana.secreta@example.com", "phone": "+34 600 111 222", "name": "Ana",
         "surname": "Secretaria"}
METADATA = {"shop": "web-7", "cart": "c-991"}
BATCH = "night-1"


def document(reference: str, **changes: Any) -> dict[str, Any]:
    return {"reference": reference, "buyer": BUYER, "batch": BATCH, "metadata": METADATA,
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}], **changes}


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    built = build_services(settings, redis_client(settings))
    yield built
    built.ledger.redis.close()


def raw_entry(services: Services, reference: str) -> dict[str, bytes]:
    raw: dict[bytes, bytes] = services.ledger.redis.hgetall(  # type: ignore[assignment]
        services.ledger.keys.ledger(reference))
    return {key.decode(): value for key, value in raw.items()}


def assert_no_buyer(entry: dict[str, bytes]) -> None:
    assert not set(DROPPED_AT_OUTCOME) & set(entry)
    assert set(entry) <= set(KEPT_AFTER_OUTCOME)
    stored = b"".join(entry.values())
    for value in BUYER.values():
        assert value.encode() not in stored, value


def test_a_finished_entry_keeps_no_buyer_and_every_reader_still_works(
        services: Services, settings: Settings) -> None:
    ledger, keys, reference = services.ledger, services.ledger.keys, "keep-1"
    # Given an admitted intent (its buyer stored while the purchase runs)
    assert ledger.admit(load_intent(document(reference))) is Admission.NEW
    assert BUYER["email"].encode() in raw_entry(services, reference)["intent"]
    # When the purchase ends (its outcome written, not yet published)
    assert isinstance(advance(services, reference, Stage.FINISHED), Proceed)
    # Then the entry keeps no personal data, only what the readers below need
    entry = raw_entry(services, reference)
    assert_no_buyer(entry)
    assert {"fingerprint", "outcome", "code", "order_id", "item_ids", "batch"} <= set(entry)

    # status
    status = intent_status(ledger.redis, keys, reference)
    assert (status.found, status.state, status.batch, status.published) == (
        True, "confirmed", BATCH, False)
    assert status.order_code and status.order_id and status.attempts >= 1
    # duplicate admission: the same intent is a duplicate, another payload a conflict
    assert ledger.admit(load_intent(document(reference))) is Admission.DUPLICATE
    changed = document(reference, buyer={**BUYER, "email": "other@example.com"})
    assert ledger.admit(load_intent(changed)) is Admission.CONFLICT
    # batch status and the batch's outcomes
    counted = batch_status(ledger.redis, keys, BATCH)
    assert (counted.admitted, counted.confirmed, counted.in_progress) == (1, 1, 0)
    [outcome] = list(batch_outcomes(ledger.redis, keys, BATCH))
    assert outcome["status"] == "confirmed" and outcome["metadata"] == METADATA
    # the recovery sweep finds it stuck (unpublished) and sends it on
    later = dataclasses.replace(services, clock=lambda: time.time() + 3600)
    sent: list[str] = []
    assert recovery.sweep(later, sent.append) == [reference] == sent
    # publishing (and publishing again on a redelivery) sends the one outcome
    first = advance(services, reference, Stage.PUBLISHED)
    again = advance(services, reference, Stage.PUBLISHED)
    assert isinstance(first, Proceed) and isinstance(again, Proceed)
    assert first.outcome == again.outcome and first.outcome is not None
    topology = Topology.for_keys(keys, settings.effective_broker_url)
    with broker_connection(settings) as connection:
        published = list(consume_results(connection, topology, timeout=0.2, idle_timeout=1.0))
    assert [(r.reference, r.status, r.batch, dict(r.metadata)) for r in published] == [
        (reference, "confirmed", BATCH, METADATA)]
    assert intent_status(ledger.redis, keys, reference).published
    assert batch_status(ledger.redis, keys, BATCH).published == 1
    # health reads the open set: nothing stuck
    stuck = {c.name: c for c in check_health(settings, onebox=False).checks}["stuck"]
    assert stuck.status == "ok" and stuck.data["open"] == 0
    assert_no_buyer(raw_entry(services, reference))


def test_the_lease_holders_copy_drops_the_intent_with_the_outcome(services: Services) -> None:
    """Inside a run, reads come from memory: they must say what Redis now holds."""
    ledger, reference = services.ledger, "keep-2"
    ledger.admit(load_intent(document(reference)))
    lease = services.leases.offer(reference)
    _, entry = ledger.begin(reference, lease.key, lease.token, 15, done_when_finished=True)
    assert entry is not None and entry.stored_intent is not None
    with lease, ledger.fenced(lease.key, lease.token, entry):
        ledger.finish(reference, unsettled(reference, order_id="o-1"))
        held = ledger.get(reference)
    assert held is not None and held.stored_intent is None
    assert not set(DROPPED_AT_OUTCOME) & set(held.fields)


def unsettled(reference: str, *, order_code: str | None = None,
              order_id: str | None = None) -> OrderResult:
    return OrderResult(
        result_id=result_id_for(reference), reference=reference, status=UNSETTLED,
        batch=BATCH, order_code=order_code, order_id=order_id, metadata=METADATA,
        error=ResultError(code="CONFIRM_UNSETTLED", message="Onebox could not tell",
                          step="confirm"),
        submitted_at=datetime.now(UTC), finished_at=datetime.now(UTC))


def test_settle_resolves_a_finished_unsettled_entry_that_kept_no_buyer(
        services: Services, settings: Settings) -> None:
    ledger, keys, reference = services.ledger, services.ledger.keys, "keep-3"
    # Given a pre-confirmed order whose confirm went out and could not be settled
    ledger.admit(load_intent(document(reference)))
    assert isinstance(advance(services, reference, Stage.PRE_CONFIRMED), Proceed)
    code = intent_status(ledger.redis, keys, reference).order_code
    assert code
    ledger.record(reference, confirm_sent=True)
    ledger.finish(reference, unsettled(reference, order_code=code))
    assert_no_buyer(raw_entry(services, reference))
    assert batch_status(ledger.redis, keys, BATCH).unsettled == 1
    # When the operator settles it (Onebox now answers: the order is pre-confirmed only)
    outcome = settle(services, reference)
    # Then it is fenced and failed, with the intent's batch and metadata, and published
    assert outcome is not None and outcome.status == "failed"
    assert outcome.error is not None and outcome.error.code == "CONFIRM_NOT_DONE"
    assert (outcome.batch, dict(outcome.metadata)) == (BATCH, METADATA)
    counted = batch_status(ledger.redis, keys, BATCH)
    assert (counted.unsettled, counted.failed, counted.published) == (0, 1, 1)
    status = intent_status(ledger.redis, keys, reference)
    assert (status.state, status.published, status.order_code) == ("failed", True, code)
    topology = Topology.for_keys(keys, settings.effective_broker_url)
    with broker_connection(settings) as connection:
        [published] = list(consume_results(connection, topology, timeout=0.2,
                                           idle_timeout=1.0))
    assert published.status == "failed" and published.result_id == result_id_for(reference)
    assert_no_buyer(raw_entry(services, reference))

