"""One duplicate rule on every way in: the batch is not part of a purchase's identity.

The same intent sent again is a duplicate whether it came without a batch, in
the same batch or in another one, through ``submit``, ``submit_many``, a bulk
file or the Redis intake list; only a different purchase under a used
reference is a conflict (fakeredis: the admission script is the ledger's own).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
from kombu import Connection

from fulfilment.batches import batch_status
from fulfilment.bulk import JsonlReader
from fulfilment.intake import Intake
from fulfilment.keys import Keys
from fulfilment.ledger import Ledger
from fulfilment.producer import ACCEPTED, DUPLICATE, REFUSED, Producer, ReferenceConflictError
from fulfilment.redis_text import text
from fulfilment.results import ResultPublisher
from fulfilment.topology import Topology
from schemas.intent import dump_intent, intent_fingerprint, load_intent

KEYS = Keys("dup")


def intent(reference: str, **extra: Any) -> dict[str, Any]:
    return {"reference": reference, "buyer": {"email": "ana@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}], **extra}


class World:
    """A producer, the intake and a ledger on one fakeredis."""

    def __init__(self, connection: Connection) -> None:
        self.redis = fakeredis.FakeRedis()
        self.ledger = Ledger(self.redis, KEYS, 3600)
        self.dispatched: list[str] = []
        self.producer = Producer(self.ledger, self.dispatched.append, max_quantity=50,
                                 dispatch_many=self.dispatched.extend)
        self.intake = Intake(self.redis, KEYS, self.producer,
                             ResultPublisher(connection, Topology.for_keys(KEYS)))

    # Each way in: the document as the producer writes it, and the upload's batch.

    def submit(self, document: dict[str, Any], batch: str | None) -> str:
        try:
            return self.producer.submit(_in(document, batch)).status
        except ReferenceConflictError:
            return REFUSED

    def submit_many(self, document: dict[str, Any], batch: str | None) -> str:
        return next(iter(self.producer.submit_many([document], batch=batch))).status

    def bulk_file(self, document: dict[str, Any], batch: str | None) -> str:
        records = JsonlReader(io.BytesIO(json.dumps(document).encode() + b"\n"))
        raws = [record.raw for record in records if record.raw is not None]
        return next(iter(self.producer.submit_many(raws, batch=batch))).status

    def intake_list(self, document: dict[str, Any], batch: str | None) -> str:
        self.redis.lpush(KEYS.intake, json.dumps(_in(document, batch)))
        report = self.intake.drain()
        return {(1, 0, 0): ACCEPTED, (0, 1, 0): DUPLICATE, (0, 0, 1): REFUSED}[
            (report.accepted, report.duplicates, report.refused)]


def _in(document: dict[str, Any], batch: str | None) -> dict[str, Any]:
    return document if batch is None else {**document, "batch": batch}


Path = Callable[[World, dict[str, Any], "str | None"], str]
PATHS: dict[str, Path] = {"submit": World.submit, "submit_many": World.submit_many,
                          "bulk file": World.bulk_file, "intake list": World.intake_list}


@pytest.fixture
def world() -> Iterator[World]:
    with Connection("memory://localhost/", transport_options={"polling_interval": 0.01}) as c:
        yield World(c)


@pytest.mark.parametrize(("first", "second"), [
    (("submit", None), ("bulk file", "night-17")),
    (("submit_many", None), ("submit_many", "b1")),
    (("bulk file", "night-17"), ("bulk file", "night-18")),
    (("bulk file", "b1"), ("submit", None)),
    (("intake list", None), ("submit_many", "b2")),
    (("submit", "b1"), ("intake list", "b2")),
    (("intake list", "b1"), ("bulk file", None)),
])
def test_the_same_intent_again_is_a_duplicate_in_whatever_batch_it_comes(
        world: World, first: tuple[str, str | None], second: tuple[str, str | None]) -> None:
    # Given an intent taken in one way, in one batch or none
    (way_in, batch), (again_in, again_batch) = first, second
    assert PATHS[way_in](world, intent("shop-1"), batch) == ACCEPTED
    # When the same intent comes again another way, in another batch or none
    status = PATHS[again_in](world, intent("shop-1"), again_batch)
    # Then it is a duplicate, started once, and counted once, in its first batch
    assert status == DUPLICATE
    assert world.dispatched == ["shop-1"]
    entry = world.ledger.get("shop-1")
    assert entry is not None and entry.intent.batch == batch
    if batch is not None:
        assert batch_status(world.redis, KEYS, batch).admitted == 1
    if again_batch not in (None, batch):
        assert not batch_status(world.redis, KEYS, again_batch).exists


@pytest.mark.parametrize("way_in", sorted(PATHS))
def test_another_purchase_under_a_used_reference_is_still_a_conflict(
        world: World, way_in: str) -> None:
    assert world.submit(intent("shop-2"), "b1") == ACCEPTED
    changed = intent("shop-2", items=[{"session_id": 1002, "price_type_id": 3,
                                       "quantity": 2}])
    assert PATHS[way_in](world, changed, "b1") == REFUSED
    assert PATHS[way_in](world, changed, None) == REFUSED
    assert world.dispatched == ["shop-2"]


def test_the_ledger_keeps_the_fingerprint_the_intent_itself_gives() -> None:
    ledger = Ledger(fakeredis.FakeRedis(), KEYS, 3600)
    batched = load_intent(intent("shop-3", batch="b1"))
    ledger.admit(batched)
    stored = ledger.redis.hget(KEYS.ledger("shop-3"), "fingerprint")
    assert stored is not None and text(stored) == batched.fingerprint()
    assert batched.fingerprint() == load_intent(intent("shop-3")).fingerprint() == \
        intent_fingerprint(dump_intent(load_intent(intent("shop-3", batch="b9"))))
