"""The sandbox's refund endpoint, and how the Onebox client reports each of its answers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import requests

from fulfilment.config import Settings
from fulfilment.errors import AlreadyRefundedError, OutcomeUnknownError, PermanentError
from fulfilment.onebox.auth import TokenProvider
from fulfilment.onebox.client import OneboxClient, new_session
from fulfilment.sandbox import Behaviour, RunningSandbox, SandboxOptions, start_in_thread
from fulfilment.sandbox.state import REFUND_ACTION, Order
from schemas.intent import AutoItem, Buyer, SeatRef


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    with start_in_thread(SandboxOptions()) as running:
        yield running


@pytest.fixture
def client(sandbox: RunningSandbox) -> Iterator[OneboxClient]:
    settings = Settings.defaults().with_overrides(onebox_api_url=sandbox.url,
                                                  onebox_read_timeout=2.0)
    session = new_session()
    built = OneboxClient(settings, TokenProvider(settings, fakeredis.FakeRedis(), session),
                         session)
    yield built
    built.close()


def bought(client: OneboxClient, *seat_ids: int, places: int = 0) -> tuple[str, list[int]]:
    """A confirmed order of these seats of session 1001 (and places of session 1002)."""
    order = client.create_order()
    if seat_ids:
        client.add_seats(order.id, [SeatRef(id=s, session_id=1001) for s in seat_ids])
    if places:
        client.add_seats_auto(order.id, AutoItem(session_id=1002, price_type_id=3,
                                                 quantity=places))
    client.set_buyer(order.id, Buyer(email="a@example.com"))
    client.pre_confirm(order.id)
    confirmed = client.confirm(order.id, "ref-1")
    assert confirmed.code is not None
    return confirmed.code, [item.id for item in confirmed.items]


def test_a_refund_puts_the_seats_back_on_sale_and_reads_back(client: OneboxClient,
                                                              sandbox: RunningSandbox) -> None:
    code, items = bought(client, 5, 6, places=2)
    free_places = sandbox.admin.inventory(1002)["capacity"]["3"]["free"]
    answer = client.refund(code, [items[0], items[2]])
    assert [(i.id, i.state) for i in answer.items] == [
        (items[0], "REFUNDED"), (items[1], "SOLD"), (items[2], "REFUNDED"), (items[3], "SOLD")]
    assert answer.status == "CONFIRM"
    seats = sandbox.admin.inventory(1001)["seats"]
    assert (seats["5"], seats["6"]) == ("FREE", "SOLD")
    assert sandbox.admin.inventory(1002)["capacity"]["3"]["free"] == free_places + 1
    read = client.get_order(code)
    assert read.refunded((items[0], items[2])) and not read.refunded()
    # The rest: no items named is every item, and one already refunded is a 409
    with pytest.raises(AlreadyRefundedError) as caught:
        client.refund(code)
    assert caught.value.status == 409 and caught.value.code == "ALREADY_REFUNDED"
    assert caught.value.trace_id
    assert client.refund(code, [items[1], items[3]]).refunded()
    audit = sandbox.admin.audit()
    assert audit["refunds"] == 2 and audit["refund_conflicts"] == 1
    assert audit["refunded"] == {code: {str(i): 1 for i in items}}
    assert audit["refunded_twice"] == 0
    # A freed seat can be sold again
    bought(client, 5)


def test_what_cannot_be_refunded_is_refused(client: OneboxClient,
                                            sandbox: RunningSandbox) -> None:
    code, items = bought(client, 7)
    with pytest.raises(PermanentError) as caught:
        client.refund(code, [items[0] + 100])
    assert caught.value.code == "DIST0005"
    with pytest.raises(PermanentError) as caught:
        client.refund("NOSUCHCODE")
    assert caught.value.code == "ORDER_NOT_FOUND"
    basket = client.create_order()
    client.add_seats(basket.id, [SeatRef(id=8, session_id=1001)])
    client.set_buyer(basket.id, Buyer(email="a@example.com"))
    pre = client.pre_confirm(basket.id)
    assert pre.code is not None
    with pytest.raises(PermanentError) as caught:
        client.refund(pre.code)
    assert caught.value.code == "ORDER_STATE_INVALID"
    assert sandbox.admin.audit()["refunds"] == 0


@pytest.mark.parametrize("body", [{"items": [{"id": 1}]}, {"type": "AUTO"},
                                  {"type": "MANUAL", "items": [1]},
                                  {"type": "MANUAL", "include_channel_surcharges": "yes"}])
def test_a_malformed_refund_body_is_refused(client: OneboxClient, sandbox: RunningSandbox,
                                            body: dict[str, Any]) -> None:
    code, _ = bought(client, 9)
    token = client._tokens.get()
    answer = requests.post(f"{sandbox.url}/orders-mgmt-api/v1/orders/{code}/refund", json=body,
                           headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert answer.status_code == 400, answer.text


def test_a_lost_answer_is_an_unknown_outcome_and_the_refund_was_done(
        client: OneboxClient, sandbox: RunningSandbox) -> None:
    code, items = bought(client, 10)
    sandbox.admin.set_faults({"endpoints": {"refund": {"script": ["lost_response"]}}})
    with pytest.raises(OutcomeUnknownError) as caught:
        client.refund(code)
    assert caught.value.step == "refund"
    assert client.get_order(code).refunded()
    audit = sandbox.admin.audit()
    assert audit["faults"] == {"refund": {"lost_response": 1}}
    assert audit["refunded"] == {code: {str(items[0]): 1}}


def test_with_repeat_refund_again_the_audit_shows_a_double_refund(
        client: OneboxClient, sandbox: RunningSandbox) -> None:
    sandbox.admin.configure(repeat_refund="again")
    code, items = bought(client, 11)
    client.refund(code)
    client.refund(code)
    audit = sandbox.admin.audit()
    assert audit["refunds"] == 2 and audit["refunded_twice"] == 1
    assert audit["refunded"] == {code: {str(items[0]): 2}}
    assert sandbox.admin.inventory(1001)["seats"]["11"] == "FREE"


def test_refund_listeners_hear_each_refund() -> None:
    from fulfilment.sandbox.api import SandboxApp

    app = SandboxApp(SandboxOptions(behaviour=Behaviour()))
    heard: list[tuple[str | None, str]] = []

    def listener(order: Order, action: str) -> None:
        heard.append((order.code, action))

    app.state.listeners.append(listener)
    state = app.state
    order = state.create_order()
    state.add_seats(order, [(12, 1001, None)])
    state.set_buyer(order, {"email": "a@example.com"})
    state.pre_confirm(order)
    state.confirm(order, "ref-1")
    state.refund(order, None)
    assert heard == [(order.code, REFUND_ACTION)]
    state.reset()
    assert state.listeners[-1] == listener  # reset keeps them (the first tells the channel)
