"""Batched admission and a batch's counters, kept by the ledger's scripts (fakeredis)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import fakeredis
import pytest

from fulfilment.batches import batch_outcomes, batch_status, describe
from fulfilment.keys import Keys
from fulfilment.ledger import Admission, Ledger
from fulfilment.producer import ACCEPTED, DUPLICATE, REFUSED, Producer
from fulfilment.redis_text import text
from schemas.intent import load_intent
from schemas.result import OrderResult, ResultError, result_id_for

KEYS = Keys("t")


def intent(reference: str, **extra: Any) -> dict[str, Any]:
    return {"reference": reference, "buyer": {"email": "ana@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}], **extra}


class CountingRedis(fakeredis.FakeRedis):
    """Counts pipelines executed: one per Redis round trip of many commands."""

    pipelines = 0

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        def counted(raise_on_error: bool = True) -> Any:
            type(self).pipelines += 1
            return execute(raise_on_error)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe


@pytest.fixture
def client() -> CountingRedis:
    CountingRedis.pipelines = 0
    return CountingRedis()


@pytest.fixture
def ledger(client: CountingRedis) -> Ledger:
    return Ledger(client, KEYS, 3600)


class Dispatcher:
    def __init__(self) -> None:
        self.one: list[str] = []
        self.many: list[list[str]] = []

    def __call__(self, reference: str) -> None:
        self.one.append(reference)

    def dispatch_many(self, references: Sequence[str]) -> None:
        self.many.append(list(references))


def outcome(reference: str, status: str, batch: str | None = "b1",
            code: str | None = None) -> OrderResult:
    error = ResultError(code=code or "X", message="m") if status != "confirmed" else None
    return OrderResult(result_id=result_id_for(reference), reference=reference, status=status,
                       batch=batch, order_code="AB12" if status != "failed" else None,
                       error=error, submitted_at=datetime.now(UTC),
                       finished_at=datetime.now(UTC))


def test_submit_many_admits_a_chunk_per_round_trip_and_dispatches_it_with_one_call(
        ledger: Ledger) -> None:
    # Given a producer with a fan-out dispatcher
    sent = Dispatcher()
    producer = Producer(ledger, sent, max_quantity=50, dispatch_many=sent.dispatch_many)
    # When 1,200 intents go in, in chunks of 500
    submissions = list(producer.submit_many((intent(f"r-{i}") for i in range(1200)),
                                            batch="b1", chunk=500))
    # Then each is accepted in order, three pipelines admitted them, and three
    # fan-out calls (not 1,200 dispatches) started them
    assert [s.reference for s in submissions] == [f"r-{i}" for i in range(1200)]
    assert {s.status for s in submissions} == {ACCEPTED}
    assert CountingRedis.pipelines == 3
    assert [len(refs) for refs in sent.many] == [500, 500, 200] and sent.one == []
    assert batch_status(ledger.redis, KEYS, "b1").admitted == 1200


def test_each_answer_as_today_duplicates_conflicts_and_bad_lines(ledger: Ledger) -> None:
    sent = Dispatcher()
    producer = Producer(ledger, sent, max_quantity=50, dispatch_many=sent.dispatch_many)
    assert producer.submit(intent("old", batch="b1")).status == ACCEPTED
    documents = [intent("a"), intent("old", batch="b1"), intent("old", items=[]),
                 intent("c", batch="other"), intent("a"),
                 intent("d", buyer={"email": "no"}), intent("e")]
    submissions = list(producer.submit_many(documents, batch="b1"))
    assert [(s.reference, s.status) for s in submissions] == [
        ("a", ACCEPTED), ("old", DUPLICATE), ("old", REFUSED), ("c", REFUSED),
        ("a", DUPLICATE), ("d", REFUSED), ("e", ACCEPTED)]
    assert "items" in submissions[2].errors
    assert "batch" in submissions[3].errors
    assert "buyer" in submissions[5].errors
    assert sent.many == [["a", "e"]] and sent.one == ["old"]
    # Intents given no batch joined the upload's; refused ones are nowhere
    assert ledger.get("a") is not None and ledger.get("a").intent.batch == "b1"  # type: ignore[union-attr]
    assert ledger.get("c") is None
    assert batch_status(ledger.redis, KEYS, "b1").admitted == 3


def test_submitting_the_same_intents_again_is_all_duplicates(ledger: Ledger) -> None:
    sent = Dispatcher()
    producer = Producer(ledger, sent, max_quantity=50, dispatch_many=sent.dispatch_many)
    documents = [intent(f"r-{i}") for i in range(20)]
    assert {s.status for s in producer.submit_many(documents, batch="b1")} == {ACCEPTED}
    assert {s.status for s in producer.submit_many(documents, batch="b1")} == {DUPLICATE}
    assert len(sent.many) == 1
    assert batch_status(ledger.redis, KEYS, "b1").admitted == 20


def test_the_counters_follow_finish_settle_and_publish_atomically(ledger: Ledger) -> None:
    # Given four intents of batch b1 admitted
    answers = ledger.admit_many([load_intent(intent(f"r-{i}", batch="b1")) for i in range(4)])
    assert answers == [Admission.NEW] * 4
    # When one is confirmed and published, one failed, one unsettled
    ledger.finish("r-0", outcome("r-0", "confirmed"))
    ledger.get("r-0")
    ledger.mark_published("r-0")
    ledger.finish("r-1", outcome("r-1", "failed", code="ORDER_SEAT_NOT_AVAILABLE"))
    ledger.finish("r-2", outcome("r-2", "unsettled", code="CONFIRM_UNKNOWN"))
    # (writes repeated by a redelivered task count nothing twice)
    ledger.finish("r-0", outcome("r-0", "failed"))
    ledger.mark_published("r-0")
    # Then the status says so, with the oldest open intent
    status = batch_status(ledger.redis, KEYS, "b1")
    assert (status.admitted, status.in_progress, status.confirmed, status.failed,
            status.unsettled, status.published) == (4, 1, 1, 1, 1, 1)
    assert status.failed_by_code == {"ORDER_SEAT_NOT_AVAILABLE": 1}
    assert status.oldest_open is not None and status.oldest_open.reference == "r-3"
    assert status.oldest_open.stage == "queued" and not status.done
    # When the unsettled one is published, then settled as confirmed (a fresh
    # ledger: it does not know the batch of r-2 and must ask)
    ledger.get("r-2")
    ledger.mark_published("r-2")
    other = Ledger(ledger.redis, KEYS, 3600)
    other.settle("r-2", outcome("r-2", "confirmed"))
    other.mark_published("r-2")
    other.finish("r-3", outcome("r-3", "failed", code="ORDER_SEAT_NOT_AVAILABLE"))
    status = batch_status(ledger.redis, KEYS, "b1")
    assert (status.in_progress, status.confirmed, status.failed, status.unsettled,
            status.published) == (0, 2, 2, 0, 2)
    assert status.failed_by_code == {"ORDER_SEAT_NOT_AVAILABLE": 2}
    assert status.done and status.oldest_open is None
    # And the outcomes are read back from the ledger in admission order
    assert [(o["reference"], o["status"]) for o in batch_outcomes(ledger.redis, KEYS, "b1")] \
        == [("r-0", "confirmed"), ("r-1", "failed"), ("r-2", "confirmed"), ("r-3", "failed")]
    assert "in progress          0" in "\n".join(describe(status))


def test_an_intent_without_a_batch_touches_no_batch_key(ledger: Ledger) -> None:
    ledger.admit(load_intent(intent("solo")))
    ledger.finish("solo", outcome("solo", "confirmed", batch=None))
    ledger.mark_published("solo")
    assert sorted(text(k) for k in ledger.redis.keys("*")) == [KEYS.ledger("solo")]


def test_an_entry_admitted_before_batches_were_counted_counts_nothing(ledger: Ledger) -> None:
    ledger.admit(load_intent(intent("legacy", batch="b1")))
    ledger.redis.hdel(KEYS.ledger("legacy"), "batch")  # as written by the previous version
    ledger.redis.delete(KEYS.batch("b1"), KEYS.batch_open("b1"), KEYS.batch_members("b1"))
    ledger.finish("legacy", outcome("legacy", "confirmed"))
    ledger.mark_published("legacy")
    assert not batch_status(ledger.redis, KEYS, "b1").exists
    assert ledger.get("legacy").published  # type: ignore[union-attr]


def test_an_unknown_batch_has_no_status(ledger: Ledger) -> None:
    status = batch_status(ledger.redis, KEYS, "nope")
    assert not status.exists and not status.done
    assert describe(status) == ["batch nope: no intent admitted (unknown batch, or expired)"]


def test_held_cancelled_and_expired_are_counted_and_shown_when_there_are_some(
        ledger: Ledger) -> None:
    # Given five intents of batch b2: one held (the ledger's gauge +1, its entry held),
    # one cancelled, one expired, one confirmed, one still queued
    ledger.admit_many([load_intent(intent(f"h-{i}", batch="b2", hold=True)) for i in range(5)])
    ledger.record("h-0", order_id="o-0", items_done=1, buyer_set=True, code="AX0")
    ledger.redis.hset(KEYS.ledger("h-0"), "held_until", "1800000600")
    ledger.redis.hincrby(KEYS.batch("b2"), "held", 1)
    ledger.finish("h-1", outcome("h-1", "cancelled", batch="b2", code="CANCELLED"))
    ledger.finish("h-2", outcome("h-2", "expired", batch="b2", code="HOLD_EXPIRED"))
    ledger.finish("h-3", outcome("h-3", "confirmed", batch="b2"))
    # When its status is read
    status = batch_status(ledger.redis, KEYS, "b2")
    # Then held counts among the intents in progress; cancelled and expired are outcomes
    assert (status.admitted, status.in_progress, status.held, status.confirmed,
            status.cancelled, status.expired, status.outcomes) == (5, 2, 1, 1, 1, 1, 3)
    assert status.failed_by_code == {} and not status.done
    assert status.oldest_open is not None and status.oldest_open.reference == "h-0"
    assert status.oldest_open.stage == "held"
    document = status.as_dict()
    assert (document["held"], document["cancelled"], document["expired"]) == (1, 1, 1)
    lines = describe(status)
    assert lines[1:] == [
        "  in progress          2",
        "    held               1  (seats held, waiting for the shop's confirm or cancel)",
        "  confirmed            1",
        "  failed               0",
        "  unsettled            0",
        "  cancelled            1  (stopped before a confirm was sent)",
        "  expired              1  (holds not confirmed in time, released)",
        "  published            0  (outcomes on the results queue)",
        lines[-1],
    ]
    assert lines[-1].startswith("  oldest open: h-0, admitted ") and ", held, " in lines[-1]


def test_a_batch_without_holds_or_stops_reads_as_before(ledger: Ledger) -> None:
    ledger.admit(load_intent(intent("p-0", batch="b3")))
    ledger.finish("p-0", outcome("p-0", "confirmed", batch="b3"))
    status = batch_status(ledger.redis, KEYS, "b3")
    assert (status.held, status.cancelled, status.expired) == (0, 0, 0)
    assert [line.split()[0] for line in describe(status)[1:]] == [
        "in", "confirmed", "failed", "unsettled", "published"]
    assert status.as_dict()["held"] == 0  # the JSON always has every count
