"""Chaos: each of Onebox's other possible answers in turn, under a little of every fault.

The same deployment as every chaos scenario (``tests/chaos/test_chaos.py``: its private
Redis, the sandbox, workers under a supervisor), one batch of intents per answer that
docs/sandbox.md chose where the real API is unknown, the other way.

A module of its own so that under pytest -n --dist loadfile (CI) it runs beside the
other scenarios, not after them: it is the longest (21 batches in turn) and mostly waits
(retries spent, baskets lapsing), where they want the machine.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import pytest

from fulfilment.harness.cluster import Cluster
from tests.chaos.test_chaos import chaos, intents, submit, verify

pytestmark = pytest.mark.integration

__all__ = ["chaos"]  # the deployment fixture, shared with the other scenarios

#: Intents per API alternative (each alternative is a scenario of its own).
ALTERNATIVE_INTENTS = max(int(os.environ.get("FULFILMENT_CHAOS_ALTERNATIVE_INTENTS", "60")), 1)

#: A little of every fault on every endpoint, "done after the client gave up" included.
EVERY_FAULT = {"error_503": 0.02, "lost_response": 0.02, "late": 0.03, "late_ms": 2500,
               "latency_ms": 1, "latency_jitter_ms": 10}


#: Every answer docs/sandbox.md chose where the real API is unknown, the other way.
ALTERNATIVES: list[dict[str, Any]] = [
    {"release_outside_basket": "refuse"},
    {"release_outside_basket": "ignored"},
    {"orders_mgmt_read": "401"},
    {"orders_mgmt_read": "403"},
    {"orders_mgmt_read": "404"},
    {"orders_mgmt_lag_ms": 3000},
    {"orders_mgmt_scope": "confirmed"},
    {"repeat_status_call": "idempotent"},
    {"expired_orders": "readable"},
    {"refused_calls_touch": False},
    {"reads_touch": True},
    {"seats_auto_items": "per_call"},
    {"buyer_data": "merge"},
    {"empty_body": "refuse"},
    {"create_body": "ignored"},
    {"check_order": "status_first"},
    {"change_pre_confirmed": "to_basket"},
    {"code_after_basket": "new"},
    {"release_unknown_items": "ignore"},
    {"missing_rate_id": "required"},
    {"seat_unavailable_status": 400},
]


@pytest.mark.timeout(900)
def test_every_other_answer_onebox_might_give(chaos: Cluster) -> None:
    # Given one deployment, a little of every fault on every endpoint, and each of
    # Onebox's other possible answers in turn (a batch of intents per answer)
    chaos.sandbox.admin.set_faults({"seed": 13, "endpoints": {"*": EVERY_FAULT}})
    chaos.start_worker(concurrency=4)
    # Short baskets: an abandoned one of unknown content lets go of its seats sooner
    defaults = chaos.sandbox.admin.configure(basket_ttl=8)
    chosen = os.environ.get("FULFILMENT_CHAOS_ALTERNATIVES", "")  # keys, to run a few
    for number, switch in enumerate(ALTERNATIVES):
        [(key, value)] = switch.items()
        if chosen and key not in chosen.split(","):
            continue
        chaos.sandbox.admin.configure(**switch)
        documents = intents(f"alt{number}", ALTERNATIVE_INTENTS,
                            first_seat=1 + number * ALTERNATIVE_INTENTS)
        submit(documents)
        # Then every intent of the batch is bought once, or failed with nothing bought;
        # where Onebox refuses every read, a confirm it may have done ends unsettled,
        # and the operator settles it once reads work again
        restore = functools.partial(chaos.sandbox.admin.configure, **{key: defaults[key]})
        verify(chaos, f"Onebox answers {key}={json.dumps(value)}", documents, len(documents),
               before_settling=restore if key == "orders_mgmt_read" else None)
        restore()
