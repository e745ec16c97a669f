"""Owed dispatches on a real Redis: each mark is sent once, and never after the intent moved.

The scripts in ``fulfilment.owed`` are what keeps "send again when the broker
is back" from sending twice: one claimer wins a mark, and a mark whose entry
progressed since (a task began it, the sweep resumed it) is dropped unsent.
"""

from __future__ import annotations

import pytest
import redis

from fulfilment.keys import Keys
from fulfilment.ledger import Ledger
from fulfilment.owed import OwedDispatches
from schemas.intent import load_intent

pytestmark = pytest.mark.integration


class Clock:
    """A clock the test moves: every write's ``updated_at`` differs from the last."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def parts(redis_client: redis.Redis, prefix: str) -> tuple[Ledger, OwedDispatches, Clock]:
    clock = Clock()
    keys = Keys(prefix)
    return Ledger(redis_client, keys, 3600, clock=clock), OwedDispatches(redis_client, keys), clock


def admit(ledger: Ledger, reference: str) -> str:
    ledger.admit(load_intent({"reference": reference, "items": [
        {"session_id": 1002, "price_type_id": 3, "quantity": 1}],
        "buyer": {"email": "owed@example.com"}}))
    return reference


def test_a_mark_is_claimed_once(parts: tuple[Ledger, OwedDispatches, Clock]) -> None:
    ledger, owed, clock = parts
    references = [admit(ledger, f"owed-{i}") for i in range(3)]
    # Given three intents whose dispatch failed
    assert owed.mark(references) == 3
    # When two workers claim them
    first, second = owed.claim(clock()), owed.claim(clock())
    # Then each is handed out once, and nothing is left owed
    assert sorted(first) == references and second == []
    assert owed.count() == 0


def test_a_mark_whose_intent_moved_is_dropped_unsent(
        parts: tuple[Ledger, OwedDispatches, Clock]) -> None:
    ledger, owed, clock = parts
    moved, still = admit(ledger, "owed-moved"), admit(ledger, "owed-still")
    owed.mark([moved, still])
    # When a task begins one of them (or the sweep resumes it) before the claim
    ledger.record(moved)
    # Then only the other is sent again, and neither stays owed
    assert owed.claim(clock()) == [still]
    assert owed.count() == 0


def test_a_claim_records_progress_so_the_sweep_leaves_it_be(
        parts: tuple[Ledger, OwedDispatches, Clock]) -> None:
    ledger, owed, clock = parts
    reference = admit(ledger, "owed-swept")
    owed.mark([reference])
    assert ledger.stuck(clock.now) == [reference]
    claimed_at = clock()
    assert owed.claim(claimed_at) == [reference]
    assert ledger.stuck(claimed_at - 0.5) == []


def test_only_open_entries_are_marked(parts: tuple[Ledger, OwedDispatches, Clock]) -> None:
    owed = parts[1]
    assert owed.mark(["owed-never-admitted"]) == 0
    assert owed.count() == 0
