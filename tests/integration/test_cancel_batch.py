"""A batch cancelled while it waits in its lane: real Redis, both brokers, no worker.

Every intent gets its ``cancelled`` outcome from the cancel itself, and the
cancel publishes them: more than a chunk, so they are shared by its publishing
threads (``fulfilment.stops.PUBLISHERS``), each on a connection of its own.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import redis

from fulfilment.results import consume_results
from fulfilment.stops import CHUNK
from fulfilment.wiring import broker_connection
from tests.deployment import deployment

pytestmark = pytest.mark.integration

#: More than a chunk: the outcomes are published by several threads.
COUNT = CHUNK + 20


def test_a_waiting_batch_is_cancelled_and_each_outcome_published_once(
        redis_url: str, broker_url: str, prefix: str, tmp_path: Path) -> None:
    from tasks import submit_many
    from tasks.stops import cancel_batch

    with deployment(tmp_path, redis_url, prefix, broker_url=broker_url) as cluster:
        # Given a batch of bulk intents no worker has started (none runs)
        references = [f"wait-{n:04d}" for n in range(COUNT)]
        admitted = list(submit_many(
            [{"reference": r, "buyer": {"email": "w@example.com"},
              "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]}
             for r in references], batch="waiting"))
        assert {a.status for a in admitted} == {"accepted"}
        # When the shop cancels the batch
        answers = list(cancel_batch("waiting"))
        # Then each is cancelled at once (never run: one attempt, the cancel's)
        assert Counter(a.verdict for a in answers) == {"finished": COUNT}
        # (published before it returned: one reading of the queue to its end finds them)
        with broker_connection(cluster.settings) as connection:
            results = list(consume_results(connection, cluster.topology, timeout=0.2,
                                           idle_timeout=2.0))
        assert {(r.status, r.attempts) for r in results} == {("cancelled", 1)}
        # And each outcome is published once, and counted
        published = Counter(r.reference for r in results)
        assert published == dict.fromkeys(references, 1)
        client = redis.Redis.from_url(redis_url)
        try:
            counters = client.hmget(cluster.keys.batch("waiting"), "cancelled", "published")
            assert [int(n or 0) for n in counters] == [COUNT, COUNT]
            assert client.zcard(cluster.keys.batch_open("waiting")) == 0
        finally:
            client.close()
