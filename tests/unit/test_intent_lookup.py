"""``fulfilment status``: an intent's progress from its ledger entry, never its buyer."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import fakeredis
import pytest
from click.testing import CliRunner

from fulfilment.keys import Keys
from fulfilment.ledger import Ledger
from fulfilment.lookup import describe, intent_status
from schemas.intent import load_intent
from schemas.result import OrderResult, ResultError, dump_result, result_id_for

KEYS = Keys("t")
BUYER = {"email": "secret.buyer@example.com", "phone": "+34 600 111 222", "name": "Secreta",
         "surname": "Compradora"}


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def admit(client: fakeredis.FakeRedis, reference: str) -> Ledger:
    ledger = Ledger(client, KEYS, 3600, clock=lambda: 1_800_000_000.0)
    ledger.admit(load_intent({"reference": reference, "buyer": BUYER, "batch": "night-1",
                              "items": [{"session_id": 1002, "price_type_id": 3,
                                         "quantity": 1}]}))
    return ledger


def test_each_stage_of_a_purchase_reads_as_a_state_and_step(client: fakeredis.FakeRedis) -> None:
    ledger = admit(client, "shop-1")
    seen = [intent_status(client, KEYS, "shop-1")]
    ledger.count_attempt("shop-1")
    ledger.record("shop-1", order_id="o-1", items_done=0)
    seen.append(intent_status(client, KEYS, "shop-1"))
    ledger.record("shop-1", items_done=1, buyer_set=True)
    seen.append(intent_status(client, KEYS, "shop-1"))
    ledger.record("shop-1", code="AX59")
    seen.append(intent_status(client, KEYS, "shop-1"))
    ledger.record("shop-1", confirm_sent=True)
    seen.append(intent_status(client, KEYS, "shop-1"))
    assert [(s.state, s.step) for s in seen] == [
        ("queued", "basket"), ("basket", "seats"), ("basket", "pre_confirm"),
        ("pre-confirmed", "confirm"), ("confirm sent", "confirm")]
    last = seen[-1]
    assert (last.order_id, last.order_code, last.attempts, last.batch) == ("o-1", "AX59", 1,
                                                                           "night-1")
    assert last.submitted_at == "2027-01-15T08:00:00Z"


def test_a_failed_intent_shows_its_outcome_and_error_code(client: fakeredis.FakeRedis) -> None:
    ledger = admit(client, "shop-2")
    ledger.finish("shop-2", OrderResult(
        result_id=result_id_for("shop-2"), reference="shop-2", status="failed", batch="night-1",
        order_id="o-2", error=ResultError(code="ORDER_SEAT_NOT_AVAILABLE", message="sold",
                                          step="seats"),
        finished_at=datetime(2027, 1, 15, 8, 1, tzinfo=UTC)))
    found = intent_status(client, KEYS, "shop-2")
    assert (found.state, found.outcome, found.error_code, found.error_step, found.step) == (
        "failed", "failed", "ORDER_SEAT_NOT_AVAILABLE", "seats", "publish")
    assert found.finished_at == "2027-01-15T08:01:00Z"
    lines = "\n".join(describe(found, now=datetime(2027, 1, 15, 8, 3, tzinfo=UTC)))
    assert "shop-2: failed, not yet published" in lines
    assert "error       ORDER_SEAT_NOT_AVAILABLE at seats" in lines
    assert "finished    2027-01-15T08:01:00Z (2m ago)" in lines


@pytest.mark.parametrize(("reference", "problem"), [
    ("never-seen", "no ledger entry"), ("a{b}", "not a reference"), ("", "not a reference")])
def test_an_unknown_or_impossible_reference_is_said_so(client: fakeredis.FakeRedis,
                                                       reference: str, problem: str) -> None:
    found = intent_status(client, KEYS, reference)
    assert not found.found and found.problem and problem in found.problem


def test_the_command_shows_no_personal_data_and_exits_1_for_an_unknown_reference(
        client: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    from fulfilment import cli as cli_module

    ledger = admit(client, "shop-3")
    ledger.record("shop-3", order_id="o-3")
    monkeypatch.setenv("FULFILMENT_KEY_PREFIX", "t")
    monkeypatch.setattr("fulfilment.wiring.redis_client", lambda settings: client)
    monkeypatch.setattr(client, "close", lambda: None)
    runner = CliRunner()
    human = runner.invoke(cli_module.cli, ["status", "shop-3", "nope"])
    as_json = runner.invoke(cli_module.cli, ["status", "--json", "shop-3"])
    assert human.exit_code == 1 and as_json.exit_code == 0, human.output + as_json.output
    assert "shop-3: basket" in human.stdout and "nope: unknown: no ledger entry" in human.stdout
    document = json.loads(as_json.stdout)
    assert document["order_id"] == "o-3" and document["state"] == "basket"
    for secret in BUYER.values():
        assert secret not in human.stdout and secret not in as_json.stdout


def test_a_held_purchase_reads_as_held_until_its_hold_lapses(client: fakeredis.FakeRedis) -> None:
    # Given a purchase pre-confirmed and held for ten minutes (Redis's clock)
    ledger = admit(client, "hold-1")
    ledger.record("hold-1", order_id="o-1", items_done=1, buyer_set=True, code="AX59")
    client.hset(KEYS.ledger("hold-1"), "held_until", "1800000600")
    found = intent_status(client, KEYS, "hold-1")
    assert (found.state, found.step, found.order_code, found.held_until, found.held_published,
            found.outcome) == ("held", "confirm", "AX59", "2027-01-15T08:10:00Z", False, None)
    lines = describe(found, now=datetime(2027, 1, 15, 8, 1, tzinfo=UTC))
    assert lines[0] == "hold-1: held"
    assert "  order       o-1, code AX59" in lines
    assert "  held until  2027-01-15T08:10:00Z (in 9m), held result not yet published" in lines
    # When the held result went out and the hold has lapsed, not yet released
    client.hset(KEYS.ledger("hold-1"), "held_published", "1")
    lines = describe(intent_status(client, KEYS, "hold-1"),
                     now=datetime(2027, 1, 15, 8, 12, tzinfo=UTC))
    assert "  held until  2027-01-15T08:10:00Z (lapsed 2m ago), held result published" in lines


@pytest.mark.parametrize(("fields", "state", "step"), [
    ({"confirm_requested": "1"}, "confirm requested", "confirm"),
    ({"stop": "expire"}, "expiring", "expire"),
    ({"stop": "cancel"}, "cancelling", "cancel"),
    ({"stop": "cancel", "confirm_requested": "1"}, "cancelling", "cancel"),
    ({"confirm_requested": "1", "confirm_sent": "1"}, "confirm sent", "confirm"),
])
def test_a_hold_confirmed_or_stopped_reads_as_what_comes_next(
        client: fakeredis.FakeRedis, fields: dict[str, str], state: str, step: str) -> None:
    ledger = admit(client, "hold-2")
    ledger.record("hold-2", order_id="o-2", items_done=1, buyer_set=True, code="AX60")
    for name, value in {"held_until": "1800000600", **fields}.items():
        client.hset(KEYS.ledger("hold-2"), name, value)
    found = intent_status(client, KEYS, "hold-2")
    assert (found.state, found.step) == (state, step)


def test_a_cancel_before_any_basket_reads_as_cancelling(client: fakeredis.FakeRedis) -> None:
    admit(client, "hold-3")
    client.hset(KEYS.ledger("hold-3"), "stop", "cancel")
    found = intent_status(client, KEYS, "hold-3")
    assert (found.state, found.step, found.held_until) == ("cancelling", "cancel", None)


def test_held_cancelled_and_expired_outcomes_show_their_code_and_expiry(
        client: fakeredis.FakeRedis) -> None:
    # A held result kept as the entry's outcome (interim, like unsettled)
    admit(client, "hold-4")
    held = OrderResult(result_id=result_id_for("hold-4"), reference="hold-4", status="held",
                       order_code="AX61", hold_expires_at=datetime(2027, 1, 15, 8, 10,
                                                                   tzinfo=UTC))
    client.hset(KEYS.ledger("hold-4"), mapping={"outcome": json.dumps(dump_result(held)),
                                                "published": "1"})
    found = intent_status(client, KEYS, "hold-4")
    assert (found.state, found.order_code, found.held_until, found.held_published) == (
        "held", "AX61", "2027-01-15T08:10:00Z", True)
    assert ("  held until  2027-01-15T08:10:00Z (in 5m), held result published"
            in describe(found, now=datetime(2027, 1, 15, 8, 5, tzinfo=UTC)))
    # The final outcomes: the error code says which stop, and no hold line any more
    for reference, status, code, order_code in (("hold-5", "cancelled", "CANCELLED", None),
                                                ("hold-6", "expired", "HOLD_EXPIRED", "AX62")):
        ledger = admit(client, reference)
        client.hset(KEYS.ledger(reference), "held_until", "1800000600")
        ledger.finish(reference, OrderResult(
            result_id=result_id_for(reference), reference=reference, status=status,
            order_code=order_code, error=ResultError(code=code, message="m", step="confirm")))
        found = intent_status(client, KEYS, reference)
        assert (found.state, found.outcome, found.error_code) == (status, status, code)
        lines = describe(found, now=datetime(2027, 1, 15, 8, 5, tzinfo=UTC))
        assert lines[0] == f"{reference}: {status}, not yet published"
        assert f"  error       {code} at confirm" in lines
        assert not any("held until" in line for line in lines)
