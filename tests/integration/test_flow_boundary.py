"""The flow's verdicts at the Onebox boundary, end to end: the sandbox over HTTP, real Redis.

Each test plays one of Onebox's possible answers (a sandbox switch or fault) to a
purchase driven by ``advance`` in this process, the way a worker's tasks drive it.
The sandbox and the flow share one wall clock the test moves by hand, so a
basket's expiry passes without waiting; late calls take real time and are waited
for as conditions with a deadline. What counts is Onebox's own record (the
audit): nothing bought twice, and a verdict only on a positive answer.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from fulfilment.config import Settings
from fulfilment.flow import Proceed, RetryIn, Services, Stage, advance
from fulfilment.harness.processes import wait_for
from fulfilment.retry import RetryPolicy
from fulfilment.sandbox import RunningSandbox, SandboxOptions, start_in_thread
from fulfilment.wiring import build_services
from schemas.intent import load_intent
from schemas.result import OrderResult
from tests.integration.test_sandbox_switches import Clock

pytestmark = pytest.mark.integration

TTL = 600



@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sandbox(clock: Clock) -> Iterator[RunningSandbox]:
    with start_in_thread(SandboxOptions(seed=3, basket_ttl=TTL), clock=clock) as running:
        yield running


@pytest.fixture
def services(settings: Settings, redis_client: redis.Redis, clock: Clock) -> Iterator[Services]:
    # A read timeout shorter than a late call's wait, and retries with no real waiting
    # (the test runs the next attempt at once; the flow's delays are not slept).
    built = build_services(settings.with_overrides(onebox_read_timeout=1.0), redis_client)
    yield dataclasses.replace(built, clock=clock,
                              policy=RetryPolicy(max_attempts=6, base=0.01, cap=0.1,
                                                 deadline=3600, jitter=False))
    built.client.close()


def admit(services: Services, *, seat: int | None = None) -> str:
    """One intent: a numbered seat, or (by default) two places the venue picks."""
    reference = f"boundary-{uuid.uuid4().hex[:8]}"
    item: dict[str, Any] = ({"seats": [{"id": seat, "session_id": 1001}]} if seat else
                            {"session_id": 1002, "price_type_id": 3, "quantity": 2})
    services.ledger.admit(load_intent({"reference": reference, "items": [item],
                                       "buyer": {"email": "a@example.com"}}))
    return reference


def drive(services: Services, reference: str, clock: Clock, *, runs: int = 30,
          expire_baskets: bool = True) -> tuple[OrderResult, list[RetryIn]]:
    """Run the intent until it has an outcome; each wait for a basket's expiry is
    skipped by moving the shared clock. Returns the outcome and every retry."""
    retries: list[RetryIn] = []
    for _ in range(runs):
        decision = advance(services, reference, Stage.PUBLISHED)
        if isinstance(decision, Proceed):
            assert decision.outcome is not None
            return decision.outcome, retries
        assert isinstance(decision, RetryIn), decision  # these intents do not ask to hold
        retries.append(decision)
        if expire_baskets and decision.reason in {"ORDER_NOT_FOUND", "CONFIRM_UNSETTLED"}:
            clock.advance(TTL / 4)  # the flow's delay is capped short: move on faster
    raise AssertionError(f"no outcome after {runs} runs: {retries}")


def bought(sandbox: RunningSandbox, reference: str) -> list[str]:
    """The order codes Onebox confirmed for this reference."""
    codes: list[str] = sandbox.admin.audit()["confirmed"].get(reference, [])
    return codes


# --- item 1: a read that answers 404 ---------------------------------------------
def test_a_read_answering_404_never_buys_again(services: Services, sandbox: RunningSandbox,
                                               clock: Clock) -> None:
    # Given a confirm Onebox did whose answer was lost, and an orders-management
    # read that answers 404 (as for an order this channel may not read)
    sandbox.admin.configure(orders_mgmt_read="404")
    sandbox.admin.set_faults({"endpoints": {"confirm": {"script": ["lost_response"]}}})
    reference = admit(services)
    # When the flow settles it, long past the basket's expiry
    outcome, retries = drive(services, reference, clock)
    # Then it is never bought again: the 404 is no proof, the release (the fence) is
    # refused for a confirmed order, so the outcome is "unsettled", with the code
    assert len(bought(sandbox, reference)) == 1, sandbox.admin.audit()["confirmed"]
    assert outcome.status == "unsettled" and outcome.order_code
    assert any(r.reason == "ORDER_NOT_FOUND" for r in retries)  # waited for the expiry
    assert sandbox.admin.audit()["requests"]["create"] == 1


def test_a_read_answering_404_is_replaced_by_a_fence_that_takes(
        services: Services, sandbox: RunningSandbox, clock: Clock) -> None:
    # Given a confirm refused with a 500 (Onebox did nothing) and reads answering 404
    sandbox.admin.configure(orders_mgmt_read="404")
    sandbox.admin.set_faults({"endpoints": {"confirm": {"script": ["error_500"]}}})
    reference = admit(services, seat=7)
    # When the flow settles it
    outcome, _ = drive(services, reference, clock, expire_baskets=False)
    # Then releasing the order by id answered BASKET (fenced, proof it is unconfirmed):
    # a new basket bought the seat, once
    assert outcome.status == "confirmed"
    assert len(bought(sandbox, reference)) == 1
    assert sandbox.admin.audit()["requests"]["create"] == 2


# --- item 2: auth trouble is waited out ----------------------------------------------
def test_a_token_refused_for_a_moment_after_a_lost_confirm_is_waited_out(
        services: Services, sandbox: RunningSandbox, clock: Clock) -> None:
    # Given a confirm whose answer was lost, then the token endpoint refusing the
    # channel's credentials a few times (401) after its token was revoked
    sandbox.admin.set_faults({"endpoints": {"confirm": {"script": ["lost_response"]}}})
    reference = admit(services)
    assert isinstance(advance(services, reference, Stage.PUBLISHED), RetryIn)
    sandbox.admin.revoke_tokens()
    sandbox.admin.set_faults({"endpoints": {"token": {"script": ["error_401"] * 5}}})
    # When the flow settles it
    outcome, retries = drive(services, reference, clock)
    # Then the refusals were waited out, not taken as a verdict: confirmed, once
    assert outcome.status == "confirmed", outcome.error
    assert len(bought(sandbox, reference)) == 1
    assert len(retries) >= 2


def test_a_403_on_a_distribution_call_is_waited_out(services: Services,
                                                     sandbox: RunningSandbox,
                                                     clock: Clock) -> None:
    # Given Onebox answering 403 to a seats call (nothing done), then working again
    sandbox.admin.set_faults({"endpoints": {"seats": {"script": ["error_403", "error_403"]}}})
    reference = admit(services, seat=21)
    # When the flow buys it
    outcome, retries = drive(services, reference, clock)
    # Then the 403s were retried within the budget, not a failure at once
    assert [r.reason for r in retries] == ["FORBIDDEN_RESOURCE"] * 2
    assert outcome.status == "confirmed", outcome.error
    assert len(bought(sandbox, reference)) == 1


# --- item 8: a pre-confirm whose answer was lost -------------------------------------
def test_a_pre_confirm_done_but_never_recorded_starts_a_new_basket(
        services: Services, sandbox: RunningSandbox, clock: Clock) -> None:
    # Given a basket Onebox pre-confirmed but whose code the ledger never recorded
    # (the worker died between the answer and recording it), holding seat 31
    reference = admit(services, seat=31)
    assert isinstance(advance(services, reference, Stage.BASKET), Proceed)
    entry = services.ledger.get(reference)
    assert entry is not None and entry.order_id is not None
    services.client.pre_confirm(entry.order_id)
    # When the flow goes on (its pre-confirm is refused: DIST0004)
    outcome, _ = drive(services, reference, clock, expire_baskets=False)
    # Then no confirm was ever sent, so nothing could be bought: the order was
    # released by id (its seat free for the new basket at once) and the seat bought
    assert outcome.status == "confirmed", outcome.error
    assert len(bought(sandbox, reference)) == 1
    assert sandbox.admin.audit()["orders"]["PRE_CONFIRM"] == 0
    assert sandbox.admin.audit()["requests"]["create"] == 2


# --- item 9: a fence that worked, and a release that does not take --------------------
def test_a_fence_that_worked_after_a_timed_out_release_starts_a_new_basket(
        services: Services, sandbox: RunningSandbox, clock: Clock) -> None:
    # Given a confirm answered 500 (outcome unknown; the sandbox did nothing), reads
    # refused (403), and the first release of the order timing out (it lands late)
    sandbox.admin.configure(orders_mgmt_read="403")
    sandbox.admin.set_faults({"endpoints": {
        "confirm": {"script": ["error_500"]},
        "release": {"script": ["late"], "late_ms": 1500}}})
    reference = admit(services, seat=41)
    # When the flow settles it
    outcome, _ = drive(services, reference, clock, expire_baskets=False)
    # Then the release that worked is a fence, not a failure: a new basket bought it
    assert outcome.status == "confirmed", outcome.error
    assert len(bought(sandbox, reference)) == 1
    assert sandbox.admin.audit()["requests"]["create"] == 2


def test_a_release_that_does_not_take_is_no_fence(services: Services, sandbox: RunningSandbox,
                                                  clock: Clock) -> None:
    # Given a confirm that lands late (after the client's timeout), reads refused
    # (403), and a release that answers 200 but leaves the order in PRE_CONFIRM
    sandbox.admin.configure(orders_mgmt_read="403", release_outside_basket="ignored")
    sandbox.admin.set_faults({"endpoints": {"confirm": {"script": ["late"],
                                                        "late_ms": 1500}}})
    reference = admit(services)
    # When the flow settles it
    outcome, _ = drive(services, reference, clock, expire_baskets=False)
    # And the late confirm has landed (no order is left pre-confirmed)
    wait_for(lambda: sandbox.admin.audit()["orders"]["PRE_CONFIRM"] == 0, timeout=10,
             what="the late confirm to land")
    # Then it was bought once: the release's answer showed the order still
    # PRE_CONFIRM, so the flow confirmed that order rather than a new basket
    assert outcome.status == "confirmed", outcome.error
    assert sandbox.admin.audit()["duplicates"] == {}
    assert len(bought(sandbox, reference)) == 1
