"""The session cap with real worker processes and the sandbox: Onebox never sees more
baskets of a capped session open at once than the cap, and other sessions go on.

Runs on both brokers (the cap lives in Redis either way).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fulfilment.harness.cluster import Cluster
from tests.deployment import deployment

pytestmark = pytest.mark.integration

CAPPED = 1002




@pytest.fixture
def cluster(redis_url: str, broker_url: str, prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    with deployment(tmp_path, redis_url, prefix, session_cap=2, retry_deadline=300,
                    lease_ttl=3.0, broker_url=broker_url) as running:
        yield running


def intent(reference: str, item: dict[str, Any]) -> dict[str, Any]:
    return {"reference": reference, "items": [item],
            "buyer": {"email": f"{reference}@example.com"}}


def test_a_capped_session_never_has_more_open_baskets_than_the_cap(cluster: Cluster) -> None:
    from tasks import submit_many

    # Given two worker processes with six threads each, and Onebox at 40 ms a call
    cluster.sandbox.admin.set_faults({"endpoints": {"*": {"latency_ms": 40}}})
    for _ in range(2):
        cluster.start_worker(concurrency=6, pool="threads")
    # When 16 intents for one session (cap 2) are submitted, then 2 for each of two others
    capped = [intent(f"cap-{i}", {"session_id": CAPPED, "price_type_id": 3, "quantity": 1})
              for i in range(16)]
    other = [intent(f"other-{i}", {"seats": [{"id": 1200 + i, "session_id": 1001}]})
             for i in range(2)]
    other += [intent(f"other-{i}", {"session_id": 1003, "price_type_id": 6, "quantity": 1})
              for i in range(2, 4)]
    submissions = [*submit_many(capped), *submit_many(other)]
    assert {s.status for s in submissions} == {"accepted"}, submissions
    references = {s.reference for s in submissions if s.reference}
    results = cluster.collect(references, timeout=180)
    # Then every intent is confirmed exactly once
    assert cluster.assert_exactly_once(references) == {"confirmed": 20}
    # And Onebox never held more than 2 open baskets of the capped session, and did hold 2
    audit = cluster.sandbox.admin.audit()
    assert audit["peak_open_orders_by_session"][str(CAPPED)] == 2, audit
    # And the other sessions' intents were not held back: each ran its two stages once,
    # and all were done before the capped session's line was
    for i in range(4):
        assert results[f"other-{i}"].attempts == 2, results[f"other-{i}"]
    def finished(reference: str) -> float:
        moment = results[reference].finished_at
        assert moment is not None
        return moment.timestamp()

    last_other = max(finished(f"other-{i}") for i in range(4))
    last_capped = max(finished(f"cap-{i}") for i in range(16))
    assert last_other < last_capped
    # And no slot is left held
    holders = cluster.keys.session_cap(CAPPED, "holders")
    client = redis.Redis.from_url(cluster.settings.redis_url)
    try:
        assert client.zcard(holders) == 0
    finally:
        client.close()
