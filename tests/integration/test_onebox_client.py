"""The Onebox client against the real sandbox over loopback, with real Redis."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests

from fulfilment.config import Settings
from fulfilment.errors import FulfilmentError, OutcomeUnknownError, PermanentError, TransientError
from fulfilment.onebox import OneboxClient, TokenProvider, build_client
from fulfilment.onebox.auth import AuthRefusedError, CachedToken
from fulfilment.onebox.client import new_session
from fulfilment.sandbox import RunningSandbox
from schemas.intent import AutoItem, Buyer, SeatRef
from tests.services import free_port

pytestmark = pytest.mark.integration

BUYER = Buyer(email="ana.garcia@example.com", name="Ana", phone="+34 600 123 456")


@pytest.fixture
def client(settings: Settings, redis_client: redis.Redis) -> Iterator[OneboxClient]:
    built = build_client(settings, redis_client)
    yield built
    built.close()


def buy(client: OneboxClient, seats: list[SeatRef], reference: str) -> str:
    order = client.create_order()
    client.add_seats(order.id, seats)
    client.set_buyer(order.id, BUYER)
    code = client.pre_confirm(order.id).code
    assert code
    client.confirm(order.id, reference)
    return code


def test_numbered_seats_flow_confirms_with_a_code(client: OneboxClient,
                                                   sandbox: RunningSandbox) -> None:
    # Given an empty basket
    order = client.create_order()
    assert order.status == "BASKET" and len(order.id) == 32
    # When two numbered seats, the buyer and both confirmations go through
    order = client.add_seats(order.id, [SeatRef(id=11, session_id=1001),
                                        SeatRef(id=12, session_id=1001, rate_id=2)])
    assert [item.seat_id for item in order.items] == [11, 12]
    client.set_buyer(order.id, BUYER)
    pre = client.pre_confirm(order.id, delivery_method="EMAIL")
    assert pre.status == "PRE_CONFIRM" and pre.code
    done = client.confirm(order.id, "ref-numbered-1", payments=[{"type": "CASH", "value": 90}])
    # Then the order is confirmed under its code, matched to our reference
    assert done.status == "CONFIRM"
    assert done.code == pre.code
    assert done.external_code == "ref-numbered-1"
    read = client.get_order(pre.code)
    assert read.status == "CONFIRM" and read.id == order.id
    audit = sandbox.admin.audit()
    assert audit["confirmed"]["ref-numbered-1"] == [pre.code]
    assert sandbox.admin.inventory(1001)["seats"]["11"] == "SOLD"


def test_automatic_seats_flow(client: OneboxClient, sandbox: RunningSandbox) -> None:
    order = client.create_order()
    order = client.add_seats_auto(order.id, AutoItem(session_id=1002, price_type_id=3,
                                                     quantity=3, rate_id=1))
    assert len(order.items) == 3
    assert {item.price_type_id for item in order.items} == {3}
    client.set_buyer(order.id, BUYER)
    code = client.pre_confirm(order.id).code
    assert code
    assert client.confirm(order.id, "ref-auto-1").status == "CONFIRM"
    assert sandbox.admin.inventory(1002)["capacity"]["3"]["sold"] == 3


def test_release_seats_frees_them(client: OneboxClient, sandbox: RunningSandbox) -> None:
    order = client.add_seats(client.create_order().id, [SeatRef(id=21, session_id=1001)])
    assert sandbox.admin.inventory(1001)["seats"]["21"] == "HELD"
    client.release_seats(order.id, [item.id for item in order.items])
    assert sandbox.admin.inventory(1001)["seats"]["21"] == "FREE"


def test_seat_already_sold_is_permanent_with_onebox_code_and_trace(
        client: OneboxClient) -> None:
    buy(client, [SeatRef(id=31, session_id=1001)], "first-buyer")
    order = client.create_order()
    with pytest.raises(PermanentError) as caught:
        client.add_seats(order.id, [SeatRef(id=31, session_id=1001)])
    error = caught.value
    assert error.code == "ORDER_SEAT_NOT_AVAILABLE"
    assert error.status == 409
    assert error.step == "seats"
    assert error.trace_id and len(error.trace_id) == 32
    assert not error.retryable


def test_confirm_of_a_basket_is_permanent(client: OneboxClient) -> None:
    order = client.create_order()
    with pytest.raises(PermanentError) as caught:
        client.confirm(order.id, "too-early")
    assert caught.value.code == "DIST0004"


def test_unknown_order_is_permanent_not_found(client: OneboxClient) -> None:
    with pytest.raises(PermanentError) as caught:
        client.get_order("NOSUCHCODE12")
    assert caught.value.code == "ORDER_NOT_FOUND"
    assert caught.value.status == 404


# --- injected faults: each gives its documented error kind ----------------------------
@pytest.mark.parametrize(("kind", "status", "error_kind"), [
    ("error_503", 503, TransientError),
    ("throttle_429", 429, TransientError),
    # A 500 on a POST may come after the work was done: never blindly repeated.
    ("error_500", 500, OutcomeUnknownError),
])
@pytest.mark.parametrize("endpoint", ["create", "seats", "buyer_data", "pre_confirm", "confirm"])
def test_server_errors_give_their_documented_kind(
        client: OneboxClient, sandbox: RunningSandbox, endpoint: str, kind: str,
        status: int, error_kind: type[Exception]) -> None:
    order = client.create_order()
    client.add_seats(order.id, [SeatRef(id=41, session_id=1001)])
    client.set_buyer(order.id, BUYER)
    steps: dict[str, Callable[[], object]] = {
        "create": client.create_order,
        "seats": lambda: client.add_seats(order.id, [SeatRef(id=42, session_id=1001)]),
        "buyer_data": lambda: client.set_buyer(order.id, BUYER),
        "pre_confirm": lambda: client.pre_confirm(order.id),
        "confirm": lambda: client.confirm(order.id, "never"),
    }
    if endpoint == "confirm":
        client.pre_confirm(order.id)
    sandbox.admin.set_faults({"endpoints": {endpoint: {"script": [kind], "retry_after": 2}}})
    with pytest.raises(error_kind) as caught:
        steps[endpoint]()
    error = caught.value
    assert isinstance(error, FulfilmentError)
    assert type(error) is error_kind  # OutcomeUnknownError is no TransientError
    assert error.status == status and error.step == endpoint and error.retryable
    assert error.trace_id
    if kind in {"throttle_429", "error_503"}:
        assert error.retry_after == 2.0
    assert sandbox.admin.inventory(1001)["seats"]["42"] == "FREE"
    assert "never" not in sandbox.admin.audit()["confirmed"]


def test_lost_confirm_response_is_outcome_unknown_and_settled_by_reading(
        client: OneboxClient, sandbox: RunningSandbox) -> None:
    order = client.add_seats(client.create_order().id, [SeatRef(id=51, session_id=1001)])
    client.set_buyer(order.id, BUYER)
    code = client.pre_confirm(order.id).code
    assert code
    sandbox.admin.set_faults({"endpoints": {"confirm": {"script": ["lost_response"]}}})
    with pytest.raises(OutcomeUnknownError) as caught:
        client.confirm(order.id, "lost-1")
    assert caught.value.code == "CONNECTION_LOST" and caught.value.step == "confirm"
    # The server did it: reading the order by code says so.
    assert client.get_order(code).status == "CONFIRM"
    assert sandbox.admin.audit()["confirmed"]["lost-1"] == [code]


@pytest.mark.parametrize("endpoint", ["create", "seats", "buyer_data", "pre_confirm"])
def test_lost_basket_responses_are_outcome_unknown(client: OneboxClient, sandbox: RunningSandbox,
                                                   endpoint: str) -> None:
    order = client.create_order()
    if endpoint in {"buyer_data", "pre_confirm"}:
        client.add_seats(order.id, [SeatRef(id=61, session_id=1001)])
    if endpoint == "pre_confirm":
        client.set_buyer(order.id, BUYER)
    calls: dict[str, Callable[[], object]] = {
        "create": client.create_order,
        "seats": lambda: client.add_seats(order.id, [SeatRef(id=61, session_id=1001)]),
        "buyer_data": lambda: client.set_buyer(order.id, BUYER),
        "pre_confirm": lambda: client.pre_confirm(order.id),
    }
    sandbox.admin.set_faults({"endpoints": {endpoint: {"script": ["lost_response"]}}})
    with pytest.raises(OutcomeUnknownError):
        calls[endpoint]()
    # The server committed it all the same.
    if endpoint == "seats":
        assert sandbox.admin.inventory(1001)["seats"]["61"] == "HELD"


@pytest.mark.parametrize("fault", ["error_500", "lost_response"])
def test_failures_of_a_read_are_transient(client: OneboxClient, sandbox: RunningSandbox,
                                          fault: str) -> None:
    # A read changes nothing, so even a failure after it was sent is safe to repeat.
    code = buy(client, [SeatRef(id=71, session_id=1001)], f"read-{fault}")
    sandbox.admin.set_faults({"endpoints": {"get_order": {"script": [fault]}}})
    with pytest.raises(TransientError) as caught:
        client.get_order(code)
    assert type(caught.value) is TransientError
    assert client.get_order(code).status == "CONFIRM"


def test_read_timeout_after_the_server_acted_is_outcome_unknown(
        settings: Settings, redis_client: redis.Redis, sandbox: RunningSandbox) -> None:
    impatient = build_client(settings.with_overrides(onebox_read_timeout=0.2), redis_client)
    try:
        order = impatient.create_order()
        sandbox.admin.set_faults({"endpoints": {"seats": {"script": ["slow_after"],
                                                             "slow_after_ms": 1000}}})
        with pytest.raises(OutcomeUnknownError) as caught:
            impatient.add_seats(order.id, [SeatRef(id=81, session_id=1001)])
        assert caught.value.code == "READ_TIMEOUT"
        assert sandbox.admin.inventory(1001)["seats"]["81"] == "HELD"
    finally:
        impatient.close()


def test_latency_is_only_latency(client: OneboxClient, sandbox: RunningSandbox) -> None:
    sandbox.admin.set_faults({"endpoints": {"*": {"latency_ms": 20}}})
    assert client.create_order().status == "BASKET"


def test_rate_limit_answers_429_with_retry_after(client: OneboxClient,
                                                 sandbox: RunningSandbox) -> None:
    sandbox.admin.set_faults({"rate_limit": {"per_second": 1, "burst": 2, "retry_after": 3}})
    def burst() -> None:
        for _ in range(10):
            client.create_order()

    with pytest.raises(TransientError) as caught:
        burst()
    assert caught.value.status == 429 and caught.value.retry_after == 3.0


def test_connection_refused_is_transient(settings: Settings, redis_client: redis.Redis,
                                         sandbox: RunningSandbox) -> None:
    client = build_client(settings, redis_client)
    client.create_order()  # token cached
    nowhere = OneboxClient(settings.with_overrides(onebox_api_url=f"http://127.0.0.1:{free_port()}"),
                           TokenProvider(settings, redis_client))
    try:
        with pytest.raises(TransientError) as caught:
            nowhere.create_order()
        assert caught.value.code == "CONNECT_FAILED"
        assert not isinstance(caught.value, OutcomeUnknownError)
    finally:
        nowhere.close()
        client.close()


# --- tokens -------------------------------------------------------------------------
def test_token_is_fetched_once_for_many_calls(client: OneboxClient,
                                              sandbox: RunningSandbox) -> None:
    for _ in range(20):
        client.create_order()
    assert sandbox.admin.audit()["tokens_issued"] == 1


def test_token_is_shared_by_workers_through_redis(settings: Settings, redis_url: str,
                                                  sandbox: RunningSandbox) -> None:
    # Given eight "workers", each with its own Redis connection and provider
    providers = [TokenProvider(settings, redis.Redis.from_url(redis_url), new_session())
                 for _ in range(8)]
    barrier = threading.Barrier(len(providers))
    tokens: list[str] = []

    def worker(provider: TokenProvider) -> None:
        barrier.wait()
        tokens.append(provider.get())

    # When they all want a token at once
    threads = [threading.Thread(target=worker, args=(p,)) for p in providers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # Then Onebox was asked once, and they share its token
    assert len(tokens) == 8 and len(set(tokens)) == 1
    assert sandbox.admin.audit()["tokens_issued"] == 1


def test_token_is_renewed_before_expiry(settings: Settings, redis_client: redis.Redis,
                                        sandbox: RunningSandbox) -> None:
    sandbox.admin.configure(token_ttl=600)
    now = [1_000_000.0]
    provider = TokenProvider(settings.with_overrides(onebox_token_renew_margin=60),
                             redis_client, clock=lambda: now[0])
    first = provider.get()
    now[0] += 539  # just before expiry minus margin
    assert provider.get() == first
    now[0] += 2  # within the margin: renew
    assert provider.get() != first
    assert sandbox.admin.audit()["tokens_issued"] == 2


def test_token_is_renewed_once_on_401(client: OneboxClient, sandbox: RunningSandbox) -> None:
    client.create_order()
    sandbox.admin.revoke_tokens()
    assert client.create_order().status == "BASKET"
    assert sandbox.admin.audit()["tokens_issued"] == 2


def test_token_expired_on_the_server_is_renewed(settings: Settings, redis_client: redis.Redis,
                                                sandbox: RunningSandbox) -> None:
    # The sandbox's tokens live a tenth of a second; ours thinks they live long.
    sandbox.admin.configure(token_ttl=0.1)
    provider = TokenProvider(settings, redis_client, clock=lambda: 0.0)
    client = OneboxClient(settings, provider)
    try:
        token = provider.get()
        deadline = 200
        while sandbox.admin.audit()["tokens_issued"] == 1 and deadline:
            client.create_order()  # a 401 once the server forgets it, then a new token
            deadline -= 1
        assert sandbox.admin.audit()["tokens_issued"] == 2
        assert provider.get() != token
    finally:
        client.close()


def test_refused_credentials_are_transient_within_the_deadline(
        settings: Settings, redis_client: redis.Redis) -> None:
    # An auth outage or a key being rotated passes: nothing was bought, try again later
    bad = build_client(settings.with_overrides(onebox_api_key="not-the-key"), redis_client)
    try:
        with pytest.raises(TransientError) as caught:
            bad.create_order()
        assert caught.value.code == "invalid_client"
        assert caught.value.retry_after
        assert "not-the-key" not in str(caught.value)
    finally:
        bad.close()


def test_a_403_on_a_distribution_call_is_auth_trouble_never_a_failure(
        client: OneboxClient, sandbox: RunningSandbox) -> None:
    # Given Onebox answering 403 to a seats call (it did nothing)
    order = client.create_order()
    sandbox.admin.set_faults({"endpoints": {"seats": {"script": ["error_403"]}}})
    # Then it is auth trouble to wait out, not a permanent refusal of the purchase
    with pytest.raises(AuthRefusedError) as caught:
        client.add_seats(order.id, [SeatRef(id=51, session_id=1001)])
    assert isinstance(caught.value, TransientError)
    assert (caught.value.status, caught.value.code) == (403, "FORBIDDEN_RESOURCE")
    assert caught.value.retry_after and caught.value.trace_id
    # And nothing was done: the same call goes through now
    assert [i.seat_id for i in client.add_seats(order.id, [SeatRef(id=51, session_id=1001)])
            .items] == [51]


def test_a_401_from_the_token_endpoint_is_auth_trouble(
        client: OneboxClient, sandbox: RunningSandbox) -> None:
    sandbox.admin.revoke_tokens()
    sandbox.admin.set_faults({"endpoints": {"token": {"script": ["error_401"]}}})
    with pytest.raises(AuthRefusedError) as caught:
        client.get_order("AX59SJ29392X")
    assert (caught.value.status, caught.value.step) == (401, "token")


def test_a_second_401_is_transient(settings: Settings, redis_client: redis.Redis) -> None:
    # A token refused, renewed, and refused again: auth trouble, not a failed purchase
    class Refusing(requests.Session):
        def request(self, method: str | bytes, url: str | bytes,
                    *args: Any, **kwargs: Any) -> requests.Response:
            response = requests.Response()
            response.status_code = 401
            response._content = b'{"error": "invalid_token"}'
            return response

    tokens = TokenProvider(settings, redis_client)
    client = OneboxClient(settings, tokens, Refusing())
    tokens._local = CachedToken("t", float("inf"), float("inf"))
    with pytest.raises(AuthRefusedError) as caught:
        client.create_order()
    assert caught.value.code == "AUTH_REFUSED"


def test_no_secret_or_personal_data_in_logs_or_errors(
        client: OneboxClient, sandbox: RunningSandbox, settings: Settings,
        redis_client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    buy(client, [SeatRef(id=91, session_id=1001)], "secrets-1")
    sandbox.admin.revoke_tokens()
    order = client.create_order()
    try:
        client.add_seats(order.id, [SeatRef(id=91, session_id=1001)])
    except PermanentError as exc:
        errors.append(str(exc))
    sandbox.admin.set_faults({"endpoints": {"buyer_data": {"script": ["lost_response"]}}})
    try:
        client.set_buyer(order.id, BUYER)
    except OutcomeUnknownError as exc:
        errors.append(str(exc))
    tokens = TokenProvider(settings, redis_client)
    text = caplog.text + "\n".join(errors) + repr(BUYER) + repr(tokens._local)
    for secret in (settings.onebox_api_key, tokens.get(), BUYER.email, "600 123 456"):
        assert secret not in text
