"""Every ledger script, on fakeredis and on a real Redis.

fakeredis runs Lua with an interpreter of its own; these run each script where
production runs it too, and say what each one promises: an admission tells a
duplicate from a conflicting reuse, an outcome is written once and counted once
in its batch, a settled outcome replaces an unsettled one, a write never
re-creates an entry that is gone, and a worker whose lease passed on writes
nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from fulfilment.batches import batch_status
from fulfilment.keys import Keys
from fulfilment.lease import Leases
from fulfilment.ledger import Admission, Begun, LeaseLostError, Ledger, UnknownIntentError
from schemas.intent import load_intent
from schemas.result import OrderResult, ResultError, result_id_for
from tests.conftest import LedgerStore

NOW = 1_800_000_000.0


def document(reference: str, quantity: int = 1, **extra: Any) -> dict[str, Any]:
    return {"reference": reference, "buyer": {"email": "ana@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": quantity}], **extra}


def outcome(reference: str, status: str, batch: str | None = "b1") -> OrderResult:
    error = None if status == "confirmed" else ResultError(code="X", message="m", step="confirm")
    return OrderResult(result_id=result_id_for(reference), reference=reference, status=status,
                       batch=batch, order_code="AB12" if status != "failed" else None,
                       order_id=None, error=error, attempts=1,
                       submitted_at=datetime.fromtimestamp(NOW, UTC),
                       finished_at=datetime.fromtimestamp(NOW + 1, UTC), metadata={})


@pytest.fixture
def ledger(ledger_store: LedgerStore) -> Ledger:
    return Ledger(ledger_store.client, Keys(ledger_store.prefix), 3600, clock=lambda: NOW)


def test_admission_tells_new_duplicate_and_conflict(ledger: Ledger) -> None:
    assert ledger.admit(load_intent(document("r1"))) is Admission.NEW
    assert ledger.admit(load_intent(document("r1"))) is Admission.DUPLICATE
    # The same reference for another purchase is refused, and the first one stands
    assert ledger.admit(load_intent(document("r1", quantity=2))) is Admission.CONFLICT
    entry = ledger.get("r1")
    assert entry is not None and entry.intent.items[0].quantity == 1  # type: ignore[union-attr]
    assert ledger.open_count() == 1


def test_an_outcome_is_written_once_and_counted_once(ledger: Ledger) -> None:
    ledger.admit(load_intent(document("r1", batch="b1")))
    first = ledger.finish("r1", outcome("r1", "confirmed"))
    # A second verdict (a redelivery that reached another) leaves the first standing
    again = ledger.finish("r1", outcome("r1", "failed"))
    assert first.status == again.status == "confirmed"
    entry = ledger.get("r1")
    assert entry is not None and entry.outcome is not None
    assert entry.outcome.status == "confirmed"
    status = batch_status(ledger.redis, ledger.keys, "b1")
    assert (status.admitted, status.confirmed, status.failed) == (1, 1, 0)
    ledger.mark_published("r1")
    ledger.mark_published("r1")
    assert batch_status(ledger.redis, ledger.keys, "b1").published == 1
    assert ledger.open_count() == 0


def test_settling_replaces_only_an_unsettled_outcome(ledger: Ledger) -> None:
    ledger.admit(load_intent(document("r1", batch="b1")))
    ledger.finish("r1", outcome("r1", "unsettled"))
    ledger.mark_published("r1")
    assert ledger.settle("r1", outcome("r1", "confirmed")).status == "confirmed"
    # Settled: a later settlement changes nothing
    assert ledger.settle("r1", outcome("r1", "failed")).status == "confirmed"
    status = batch_status(ledger.redis, ledger.keys, "b1")
    assert (status.unsettled, status.confirmed, status.failed, status.published) == (0, 1, 0, 0)


def test_no_write_recreates_an_entry_that_is_gone(ledger: Ledger) -> None:
    ledger.admit(load_intent(document("r1")))
    ledger.redis.delete(ledger.keys.ledger("r1"))
    with pytest.raises(UnknownIntentError):
        ledger.record("r1", items_done=1)
    with pytest.raises(UnknownIntentError):
        ledger.finish("r1", outcome("r1", "confirmed", batch=None))
    assert not ledger.redis.exists(ledger.keys.ledger("r1"))


def test_a_holder_whose_lease_passed_on_writes_nothing(ledger_store: LedgerStore) -> None:
    # Given two workers, each with its own connection, and the first holding the intent
    keys = Keys(ledger_store.prefix)
    first = Ledger(ledger_store.client, keys, 3600, clock=lambda: NOW)
    second = Ledger(ledger_store.client, keys, 3600, clock=lambda: NOW)
    first.admit(load_intent(document("r1")))
    leases = Leases(ledger_store.client, keys, ttl=60)
    stale, fresh = leases.offer("r1"), leases.offer("r1")
    state, entry = first.begin("r1", stale.key, stale.token, 60, done_when_finished=True)
    assert state is Begun.LEASED and entry is not None
    # When its lease lapses (it stalled) and the second worker takes the intent
    ledger_store.client.delete(stale.key)
    state, _ = second.begin("r1", fresh.key, fresh.token, 60, done_when_finished=True)
    assert state is Begun.LEASED
    # Then the first's writes are refused, every kind of them, and the second's go through
    with first.fenced(stale.key, stale.token, entry):
        for write in (lambda: first.record("r1", order_id="stale", items_done=3),
                      lambda: first.count_failure("r1"),
                      lambda: first.finish("r1", outcome("r1", "failed", batch=None))):
            with pytest.raises(LeaseLostError):
                write()
    with second.fenced(fresh.key, fresh.token):
        second.record("r1", order_id="fresh", items_done=1)
    stands = second.get("r1")
    assert stands is not None
    assert (stands.order_id, stands.items_done, stands.outcome) == ("fresh", 1, None)
