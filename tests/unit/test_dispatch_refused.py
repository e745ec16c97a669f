"""A broker that refuses a dispatch fails no submission: admitted is accepted.

The intents stay admitted and are reported so, ``awaiting_dispatch`` (the
recovery sweep starts them); the producer tries the broker again a few seconds
later and says once when it stops taking messages and once when it is back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import fakeredis
import pytest
from kombu import Connection
from kombu.exceptions import OperationalError

from fulfilment.intake import Intake
from fulfilment.keys import Keys
from fulfilment.ledger import Ledger
from fulfilment.producer import ACCEPTED, DISPATCH_RETRY_AFTER, DUPLICATE, Producer
from fulfilment.results import ResultPublisher
from fulfilment.topology import Topology

KEYS = Keys("refused")


def intent(reference: str) -> dict[str, Any]:
    return {"reference": reference, "buyer": {"email": "ana@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]}


class Broker:
    """Takes dispatches while ``up``; counts every attempt."""

    def __init__(self) -> None:
        self.up = True
        self.attempts = 0
        self.started: list[str] = []

    def one(self, reference: str) -> None:
        self.many([reference])

    def many(self, references: Sequence[str]) -> None:
        self.attempts += 1
        if not self.up:
            raise OperationalError("[Errno 111] Connection refused")
        self.started.extend(references)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(fakeredis.FakeRedis(), KEYS, 3600)


def test_a_file_goes_on_while_the_broker_is_away_and_every_admitted_intent_is_counted(
        ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    # (its own level: a CLI command run earlier in this process may have quietened ours)
    caplog.set_level(logging.INFO, logger="fulfilment.producer")
    # Given a broker that is down, and a producer sending chunks of two
    broker, clock = Broker(), Clock()
    producer = Producer(ledger, broker.one, max_quantity=50, dispatch_many=broker.many,
                        clock=clock)
    broker.up = False
    submissions = producer.submit_many((intent(f"r-{n}") for n in range(8)), chunk=2)
    # When the first chunks are taken in: admitted, their dispatch refused
    first = [next(submissions) for _ in range(4)]
    # Then each is accepted, awaiting dispatch; the broker was tried once, not per chunk
    assert [(s.reference, s.status, s.awaiting_dispatch) for s in first] == [
        (f"r-{n}", ACCEPTED, True) for n in range(4)]
    assert broker.attempts == 1
    # When the broker is back, and the retry interval has passed
    broker.up = True
    clock.now += DISPATCH_RETRY_AFTER
    rest = list(submissions)
    # Then the next chunks are started, and nothing was lost on the way
    assert [(s.reference, s.awaiting_dispatch) for s in rest] == [
        (f"r-{n}", False) for n in range(4, 8)]
    assert broker.started == ["r-4", "r-5", "r-6", "r-7"]
    assert all(ledger.get(f"r-{n}") is not None for n in range(8))
    # And the outage read as one warning when it began and one line when it ended
    lines = [r.getMessage() for r in caplog.records if r.name == "fulfilment.producer"
             and r.levelname == "WARNING"]
    assert lines == ["the broker did not take a dispatch (OperationalError): admitted intents "
                     "wait in the ledger for the recovery sweep until it is back",
                     "the broker takes dispatches again"]
    # And the file submitted again is all duplicates (taken once, started by the sweep)
    again = list(producer.submit_many(intent(f"r-{n}") for n in range(8)))
    assert {s.status for s in again} == {DUPLICATE}


def test_one_intent_whose_dispatch_is_refused_is_accepted_and_kept(ledger: Ledger) -> None:
    broker = Broker()
    broker.up = False
    producer = Producer(ledger, broker.one, max_quantity=50, clock=Clock())
    submission = producer.submit(intent("one"))
    assert (submission.status, submission.awaiting_dispatch) == (ACCEPTED, True)
    assert ledger.get("one") is not None


def test_the_intake_takes_a_message_whose_dispatch_the_broker_refused(ledger: Ledger) -> None:
    broker = Broker()
    broker.up = False
    producer = Producer(ledger, broker.one, max_quantity=50, clock=Clock())
    with Connection("memory://localhost/") as connection:
        intake = Intake(ledger.redis, KEYS, producer,
                        ResultPublisher(connection, Topology.for_keys(KEYS)))
        ledger.redis.lpush(KEYS.intake, json.dumps(intent("listed")))
        report = intake.drain()
    assert (report.accepted, report.awaiting_dispatch, report.refused) == (1, 1, 0)
    assert ledger.redis.llen(KEYS.intake_processing) == 0
    assert ledger.get("listed") is not None


def test_a_bug_in_the_dispatch_is_not_taken_for_a_broker_outage(ledger: Ledger) -> None:
    def broken(references: Sequence[str]) -> None:
        raise TypeError("not a broker's answer")

    producer = Producer(ledger, print, max_quantity=50, dispatch_many=broken)
    with pytest.raises(TypeError):
        list(producer.submit_many([intent("bug")]))
