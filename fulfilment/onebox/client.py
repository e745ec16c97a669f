"""Onebox's distribution API, one method per purchase step.

Every method returns the order as Onebox reports it, or raises one of the three
error kinds (see ``fulfilment.errors``). The client itself never retries a
call, with one exception the contract asks for: a 401 renews the token and
repeats the call once (Onebox did nothing with a request it refused).
Retrying anything else is a decision of the purchase flow, which knows whether
the step is safe to repeat. Every call, the token's too, passes the fleet's
rate limit and circuit breaker first (``fulfilment.onebox.guard``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import redis
import requests
from marshmallow import ValidationError
from requests.adapters import HTTPAdapter

from fulfilment.clock import RedisClock
from fulfilment.config import Settings
from fulfilment.errors import (
    AlreadyRefundedError,
    OutcomeUnknownError,
    PermanentError,
    TransientError,
)
from fulfilment.logcontext import bound
from fulfilment.onebox.auth import AUTH_RETRY_AFTER, AuthRefusedError, TokenProvider
from fulfilment.onebox.guard import OneboxGuard, guarded
from fulfilment.onebox.transport import TRACE_HEADER, classify_send_error, error_for_response
from fulfilment.redact import masking_buyer
from schemas.intent import AutoItem, Buyer, SeatRef
from schemas.onebox import Order, load_order

log = logging.getLogger(__name__)

DISTRIBUTION = "/distribution-api/v1"
ORDERS_MGMT = "/orders-mgmt-api/v1"
ORDER_HEADER = "ob-order-id"
#: Onebox's answer to a refund naming an item that is already REFUNDED.
PRODUCT_STATE_INVALID = "PRODUCT_STATE_INVALID"
#: Connections kept per host: one per worker thread is plenty.
POOL_SIZE = 16


class OneboxClient:
    """A keep-alive HTTP session to Onebox plus a token provider."""

    def __init__(self, settings: Settings, tokens: TokenProvider,
                 session: requests.Session | None = None,
                 guard: OneboxGuard | None = None) -> None:
        self._settings = settings
        self._tokens = tokens
        self._session = session or new_session()
        self._guard = guard
        self._base = settings.onebox_api_url
        self._timeout = (settings.onebox_connect_timeout, settings.onebox_read_timeout)

    def close(self) -> None:
        self._session.close()

    # --- the purchase steps ---------------------------------------------------
    def create_order(self) -> Order:
        """A new, empty basket.

        Sent with an empty JSON object rather than no body: whether Onebox takes
        a bodiless POST is unknown, and ``{}`` is what every other call sends.
        """
        return self._order("POST", "create", f"{DISTRIBUTION}/orders", json={})

    def add_seats(self, order_id: str, seats: Sequence[SeatRef]) -> Order:
        """Add these exact numbered seats to the basket (all or none)."""
        body = {"seats": [_seat_body(seat) for seat in seats]}
        return self._order("POST", "seats", f"{DISTRIBUTION}/orders/seats", order_id=order_id,
                           json=body)

    def add_seats_auto(self, order_id: str, item: AutoItem) -> Order:
        """Let the venue pick ``item.quantity`` seats of a price type."""
        body: dict[str, Any] = {"session_id": item.session_id, "price_type_id": item.price_type_id,
                                "quantity": item.quantity}
        if item.rate_id is not None:
            body["rate_id"] = item.rate_id
        return self._order("POST", "seats_auto", f"{DISTRIBUTION}/orders/seats-auto",
                           order_id=order_id, json=body)

    def set_buyer(self, order_id: str, buyer: Buyer) -> Order:
        """Attach the buyer's data (personal data: never logged, masked in Onebox's answer)."""
        with masking_buyer(buyer):
            return self._order("POST", "buyer_data", f"{DISTRIBUTION}/orders/buyer-data",
                               order_id=order_id, json=buyer.as_payload())

    def pre_confirm(self, order_id: str, delivery_method: str | None = None) -> Order:
        """Move the order to PRE_CONFIRM; the answer carries its ``code``."""
        body = {"delivery_method": delivery_method} if delivery_method else {}
        return self._order("POST", "pre_confirm", f"{DISTRIBUTION}/orders/pre-confirm",
                           order_id=order_id, json=body)

    def confirm(self, order_id: str, external_code: str,
                payments: Sequence[Mapping[str, Any]] | None = None) -> Order:
        """The irrevocable step. On ``OutcomeUnknownError`` read the order by code."""
        body: dict[str, Any] = {"external_code": external_code}
        if payments:
            body["payments"] = [dict(payment) for payment in payments]
        return self._order("POST", "confirm", f"{DISTRIBUTION}/orders/confirm",
                           order_id=order_id, json=body)

    def release_seats(self, order_id: str, item_ids: Sequence[int]) -> Order:
        """Give a basket's items back to the venue."""
        return self._order("DELETE", "release", f"{DISTRIBUTION}/orders/seats",
                           order_id=order_id, params=[("id", str(i)) for i in item_ids])

    def get_order(self, code: str) -> Order:
        """Read an order by its code (orders-management API): how unknowns are settled."""
        return self._order("GET", "get_order", f"{ORDERS_MGMT}/orders/{code}")

    def refund(self, code: str, item_ids: Sequence[int] | None = None, *,
               surcharges: bool = True) -> Order:
        """Refund items of a confirmed order (None or empty: all of them), orders-management API.

        Not safe to repeat blindly: on ``OutcomeUnknownError`` read the order by
        code and look at its items' states. A 409 ``PRODUCT_STATE_INVALID`` (an
        item named is already refunded) is ``AlreadyRefundedError``.
        """
        body: dict[str, Any] = {"type": "MANUAL", "include_channel_surcharges": surcharges,
                                "include_promoter_surcharges": surcharges}
        if item_ids:
            body["items"] = [{"id": item_id} for item_id in item_ids]
        try:
            return self._order("POST", "refund", f"{ORDERS_MGMT}/orders/{quote(code, safe='')}"
                               "/refund", json=body)
        except PermanentError as exc:
            if exc.status != 409 or exc.code != PRODUCT_STATE_INVALID:
                raise
            raise AlreadyRefundedError(exc.message, status=exc.status, trace_id=exc.trace_id,
                                       step="refund") from None

    # --- plumbing ---------------------------------------------------------------
    def _order(self, method: str, step: str, path: str, *, order_id: str | None = None,
               json: Any = None, params: Any = None) -> Order:
        response = self._call(method, step, path, order_id=order_id, json=json, params=params)
        trace_id = response.headers.get(TRACE_HEADER)
        try:
            order = load_order(response.json())
        except (ValueError, ValidationError):
            # Onebox said yes but we cannot read what it did.
            kind = TransientError if method == "GET" else OutcomeUnknownError
            raise kind("Onebox's answer is not a readable order", code="MALFORMED_RESPONSE",
                       status=response.status_code, trace_id=trace_id, step=step) from None
        # One line per call, with Onebox's trace id: what its support asks for.
        with bound(order_id=order.id, trace=trace_id):
            log.info("%s %s: HTTP %d, order %s", method, step, response.status_code, order.status)
        return order

    def _call(self, method: str, step: str, path: str, *, order_id: str | None,
              json: Any, params: Any) -> requests.Response:
        token = self._tokens.get()
        response = self._send(method, step, path, token, order_id=order_id, json=json,
                              params=params)
        if response.status_code == 401:
            with bound(trace=response.headers.get(TRACE_HEADER)):
                log.info("Onebox refused the token at %s; renewing it once", step)
            self._tokens.invalidate(token)
            token = self._tokens.get()
            response = self._send(method, step, path, token, order_id=order_id, json=json,
                                  params=params)
            if response.status_code == 401:
                # Refused twice: nothing was done. Auth trouble passes (a revocation
                # racing us, an outage); the flow retries within its deadline.
                raise AuthRefusedError("Onebox refused a fresh token", status=401,
                                       trace_id=response.headers.get(TRACE_HEADER),
                                       step=step, retry_after=AUTH_RETRY_AFTER)
        if response.status_code == 403:
            # Forbidden: refused, so nothing was done. Like a 401, auth trouble that may
            # pass (a permission being granted, an auth outage): the flow waits it out.
            error = error_for_response(response, step=step, idempotent=True)
            raise AuthRefusedError(error.message, code=error.code, status=403,
                                   trace_id=error.trace_id, step=step,
                                   retry_after=AUTH_RETRY_AFTER)
        if not 200 <= response.status_code < 300:
            error = error_for_response(response, step=step, idempotent=method == "GET")
            with bound(trace=error.trace_id):
                log.info("%s %s: HTTP %d, %s", method, step, response.status_code, error.code)
            raise error
        return response

    def _send(self, method: str, step: str, path: str, token: str, *, order_id: str | None,
              json: Any, params: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if order_id is not None:
            headers[ORDER_HEADER] = order_id
        try:
            return guarded(self._guard, step, lambda: self._session.request(
                method, f"{self._base}{path}", headers=headers, json=json, params=params,
                timeout=self._timeout))
        except requests.RequestException as exc:
            raise classify_send_error(exc, step=step, idempotent=method == "GET") from exc


def _seat_body(seat: SeatRef) -> dict[str, int]:
    body = {"id": seat.id, "session_id": seat.session_id}
    if seat.rate_id is not None:
        body["rate_id"] = seat.rate_id
    return body


def new_session(base_url: str | None = None, verify: bool | str = True) -> requests.Session:
    """A keep-alive session whose adapter never retries on its own (the flow decides).

    TLS certificates are always verified (``verify``: True, or a CA bundle:
    ``ONEBOX_CA_BUNDLE``). requests reads proxies from the environment on every
    request (walking all of ``os.environ``, twice): measured at a sixth of a
    worker's CPU per order. The client talks to one host, so given it they are
    read once here; requests' own CA variables are not read (``ONEBOX_CA_BUNDLE``
    says which CAs to trust).
    """
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=2, pool_maxsize=POOL_SIZE, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.verify = verify
    if base_url is not None:
        session.proxies.update(requests.utils.get_environ_proxies(base_url))
        session.trust_env = False
    return session


def build_client(settings: Settings, redis_client: redis.Redis,
                 clock: Callable[[], float] | None = None) -> OneboxClient:
    """A client and its token provider, sharing the fleet's guard.

    Each has a session of its own: the token endpoint may be another host, with
    its own proxy settings (read once, see ``new_session``). The token the fleet
    shares in Redis expires on Redis's clock (``clock``; None: a ``RedisClock``).
    """
    guard = OneboxGuard.for_settings(settings, redis_client)
    tokens = TokenProvider(settings, redis_client,
                           new_session(settings.token_url, settings.tls_verify),
                           clock or RedisClock(redis_client), guard=guard)
    return OneboxClient(settings, tokens,
                        new_session(settings.onebox_api_url, settings.tls_verify), guard)
