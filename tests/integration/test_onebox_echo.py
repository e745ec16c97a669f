"""An Onebox error that echoes the buyer: its message is scrubbed before anyone sees it.

The client against the sandbox over loopback, behind a proxy that answers some
calls with a message repeating the buyer data the order was given (e-mail,
phone, name). The exception's text, its result form and every log line the
client writes must hold none of it, for each kind of error it becomes.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterator

import pytest
import redis

from fulfilment.config import Settings
from fulfilment.errors import (
    FulfilmentError,
    OutcomeUnknownError,
    PermanentError,
    TransientError,
)
from fulfilment.onebox import OneboxClient, build_client
from fulfilment.redact import masking_buyer
from fulfilment.sandbox import RunningSandbox
from schemas.intent import AutoItem, Buyer
from tests.echo_proxy import Echo, EchoProxy, echo_proxy

pytestmark = pytest.mark.integration


def probe_buyer() -> Buyer:
    """Personal data nobody could mistake for anything else."""
    tag = secrets.token_hex(3)
    return Buyer(email=f"echo.probe.{tag}@example.com", name=f"Zelda{tag}",
                 surname=f"Quarrington{tag}",
                 phone=f"+34 6{secrets.randbelow(90) + 10} {secrets.randbelow(900) + 100} "
                       f"{secrets.randbelow(900) + 100}")


def personal(buyer: Buyer) -> dict[str, str]:
    values = {"e-mail": buyer.email, "name": buyer.name or "", "surname": buyer.surname or "",
              "phone": buyer.phone or ""}
    values["phone digits"] = re.sub(r"\D", "", values["phone"])
    return values


def leaked(text: str, buyer: Buyer) -> list[str]:
    return [what for what, value in personal(buyer).items() if value and value in text]


@pytest.fixture
def proxy(sandbox: RunningSandbox) -> Iterator[EchoProxy]:
    with echo_proxy(sandbox.url) as running:
        yield running


@pytest.fixture
def client(settings: Settings, proxy: EchoProxy,
           redis_client: redis.Redis) -> Iterator[OneboxClient]:
    built = build_client(settings.with_overrides(onebox_api_url=proxy.url), redis_client)
    yield built
    built.close()


def buy_from_buyer_data(client: OneboxClient, order_id: str, buyer: Buyer) -> None:
    client.set_buyer(order_id, buyer)
    with masking_buyer(buyer):
        pre = client.pre_confirm(order_id)
        assert pre.code
        client.confirm(order_id, "echo-ref")


@pytest.mark.parametrize(("step", "status", "code", "kind"), [
    ("buyer_data", 400, "DIST0005", PermanentError),
    ("buyer_data", 503, "DIST0000", TransientError),
    ("buyer_data", 500, "DIST0000", OutcomeUnknownError),
    ("pre_confirm", 409, "DIST0004", PermanentError),
    ("confirm", 500, "DIST0000", OutcomeUnknownError),
])
def test_an_error_echoing_the_buyer_holds_none_of_it(
        client: OneboxClient, proxy: EchoProxy, caplog: pytest.LogCaptureFixture,
        step: str, status: int, code: str, kind: type[FulfilmentError]) -> None:
    # Given an order with a buyer, and Onebox answering the step with a message that
    # repeats the buyer data it was sent
    buyer = probe_buyer()
    order = client.create_order()
    client.add_seats_auto(order.id, AutoItem(session_id=1002, price_type_id=3, quantity=1))
    proxy.add(Echo(step, status, code))
    caplog.set_level(logging.DEBUG)
    # When the step is called (past the buyer-data call, under the mask the flow sets)
    with pytest.raises(FulfilmentError) as raised:
        buy_from_buyer_data(client, order.id, buyer)
    error = raised.value
    # Then it is the error the status means, with Onebox's code, and the echo happened
    assert isinstance(error, kind) and error.code == code and error.status == status
    assert proxy.echoed == {step: 1}
    assert "refused for buyer" in error.message  # Onebox's message is kept, scrubbed
    # And neither the exception (as text, as a result's error) nor any log line holds
    # the buyer's e-mail, phone or name
    for text in (str(error), error.message, repr(error), str(error.as_dict()), caplog.text):
        assert leaked(text, buyer) == [], text


def test_the_scanner_sees_an_unscrubbed_echo(proxy: EchoProxy) -> None:
    # The check above is only as good as its scanner: the raw echo holds every value
    buyer = probe_buyer()
    proxy.buyers["o1"] = str(buyer.as_payload())
    proxy.add(Echo("confirm", 500, "DIST0000"))
    _, _, body = proxy.handle("POST", "/distribution-api/v1/orders/confirm",
                              {"ob-order-id": "o1"}, b"{}")
    assert set(leaked(body.decode(), buyer)) == {"e-mail", "name", "surname", "phone"}
