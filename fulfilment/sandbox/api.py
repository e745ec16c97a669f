"""The sandbox application: routing, auth, handlers and error shapes.

``SandboxApp`` is the HTTP handler: it maps each request to an Onebox endpoint
or a control endpoint, applies the fault plan, checks the bearer token, turns
JSON into typed arguments for ``SandboxState`` and the result back into JSON.
Field checks live here (they are about the wire format); the rules about
orders and seats live in ``state.py``. Where the real API's answer is unknown,
the ``Behaviour`` switches (``behaviour.py``) choose; those about the wire
format are applied here, the others in ``state.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import secrets
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote

from fulfilment.sandbox.behaviour import DEFAULT, Behaviour, BehaviourError
from fulfilment.sandbox.catalogue import Catalogue
from fulfilment.sandbox.faults import OK, Decision, FaultInjector, FaultPlan, FaultPlanError
from fulfilment.sandbox.http import Request, Response
from fulfilment.sandbox.state import (
    ADD,
    CONFIRM,
    CONFIRM_CALL,
    PRE_CONFIRM_CALL,
    RELEASE,
    ApiError,
    Order,
    SandboxState,
)
from fulfilment.sandbox.webhooks import WebhookConfigError, WebhookSender, WebhookTarget

log = logging.getLogger(__name__)

DIST = "/distribution-api/v1"
GET_ORDER_PREFIX = "/orders-mgmt-api/v1/orders/"
REFUND_SUFFIX = "/refund"
#: The one refund type the contract names.
REFUND_TYPE = "MANUAL"
#: The surcharge flags a refund may carry (booleans; what they change is not public).
REFUND_FLAGS = ("include_channel_surcharges", "include_promoter_surcharges")
CONTROL = "/__sandbox"
CLIENT_ID = "seller-channel-client"
#: The settings ``/__sandbox/config`` takes besides the ``Behaviour`` switches.
SETTINGS = ("token_ttl", "basket_ttl", "max_items")
#: The webhook actions ``POST /__sandbox/box-office`` simulates (done outside the channel).
BOX_OFFICE_ACTIONS = ("REFUND", "CANCEL")
#: Seconds of per-second call counts the audit keeps (the newest).
PER_SECOND_KEPT = 3600

_encode = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True)
class SandboxOptions:
    """Everything a sandbox is started with."""

    api_key: str = field(default="sandbox-api-key", repr=False)
    channel_id: str = "sandbox-channel"
    token_ttl: float = 43199
    basket_ttl: float = 600.0
    max_items: int = 1000
    catalogue: Catalogue = field(default_factory=Catalogue.default, repr=False)
    faults: FaultPlan = field(default_factory=FaultPlan)
    seed: int | None = None
    behaviour: Behaviour = DEFAULT
    #: Where the sandbox sends its webhooks (none by default).
    webhooks: WebhookTarget = field(default_factory=WebhookTarget)


class OAuthError(Exception):
    """An OAuth-style refusal: ``{"error", "error_description"}``."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description


class TokenStore:
    """Issued bearer tokens and when each expires (fractional TTLs honoured)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self.issued = 0

    def issue(self, ttl: float) -> str:
        """A new random opaque token."""
        now = self._clock()
        if len(self._expiry) > 10_000:  # forget expired ones now and then
            self._expiry = {t: at for t, at in self._expiry.items() if at > now}
        token = secrets.token_urlsafe(32)
        self._expiry[token] = now + ttl
        self.issued += 1
        return token

    def valid(self, token: str) -> bool:
        """Whether the token was issued, is not revoked and has not expired."""
        expiry = self._expiry.get(token)
        return expiry is not None and expiry > self._clock()

    def revoke_all(self) -> int:
        """Invalidate every token; return how many were live."""
        count = len(self._expiry)
        self._expiry.clear()
        return count


class Route(NamedTuple):
    """An Onebox endpoint: its name (as in the fault plan), handler and auth need."""

    endpoint: str
    handler: Callable[[Request], dict[str, Any]]
    auth: bool = True


def _required(data: Mapping[str, Any], key: str) -> Any:
    value = data.get(key)
    if value is None:
        raise ApiError(400, "PARAMETER_REQUIRED", f"{key} is required")
    return value


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, "DIST0005", f"{key} must be an integer")
    return value


def _optional_int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    return None if value is None else _int(value, key)


def _optional_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, "DIST0005", f"{key} must be a string")
    return value


def _json_body(request: Request, *, empty_ok: bool = True) -> dict[str, Any]:
    """The request's JSON object; an empty body is ``{}`` (or, unless ``empty_ok``, 400)."""
    body = request.body
    if not body.strip():
        if empty_ok:
            return {}
        raise ApiError(400, "DIST0001", "the body must be a JSON object")
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "DIST0003", "Content-Type must be application/json")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "DIST0001", "the body is not valid JSON") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "DIST0001", "the body must be a JSON object")
    return data


def _retry_after(seconds: float) -> tuple[str, str]:
    return ("Retry-After", f"{seconds:g}")


class SandboxApp:
    """The HTTP handler of one sandbox, holding all of its state."""

    def __init__(self, options: SandboxOptions, clock: Callable[[], float] = time.time) -> None:
        self.options = options
        self._rng = random.Random(options.seed)
        self.state = SandboxState(options.catalogue, basket_ttl=options.basket_ttl,
                                  max_items=options.max_items, clock=clock,
                                  rng=random.Random(options.seed))
        # A refund made through the API tells the channel, as Onebox's webhooks do.
        self.state.listeners.append(self._tell_channel)
        self.behaviour = options.behaviour
        self.tokens = TokenStore(clock)
        self.token_ttl = options.token_ttl
        self.requests: dict[str, int] = {}
        #: Order id -> confirm calls that named it (reached the sandbox, whatever the answer).
        self.confirm_calls: dict[str, int] = {}
        #: Unix second -> [calls that reached an endpoint, of them refused by the rate limit].
        self.per_second: dict[int, list[int]] = {}
        self._clock = clock
        self.faults = FaultInjector(options.faults, options.seed)
        self.webhooks = WebhookSender(options.webhooks)
        #: What the order URL in a webhook starts with: the Host of the latest call.
        self._base_url = "http://127.0.0.1"
        self._routes: dict[str, dict[str, Route]] = {
            "/oauth/token": {"POST": Route("token", self._token, auth=False)},
            f"{DIST}/orders": {"POST": Route("create", self._create)},
            f"{DIST}/orders/seats": {"POST": Route("seats", self._seats),
                                     "DELETE": Route("release", self._release)},
            f"{DIST}/orders/seats-auto": {"POST": Route("seats_auto", self._seats_auto)},
            f"{DIST}/orders/buyer-data": {"POST": Route("buyer_data", self._buyer_data)},
            f"{DIST}/orders/pre-confirm": {"POST": Route("pre_confirm", self._pre_confirm)},
            f"{DIST}/orders/confirm": {"POST": Route("confirm", self._confirm)},
        }
        self._get_order_routes = {"GET": Route("get_order", self._get_order)}
        self._refund_routes = {"POST": Route("refund", self._refund)}
        control: dict[str, dict[str, Callable[[Request], dict[str, Any]]]] = {
            "/health": {"GET": lambda _: {"ok": True}},
            "/audit": {"GET": self._audit},
            "/confirm-calls": {"GET": lambda _: {"orders": dict(self.confirm_calls)}},
            "/inventory": {"GET": self._inventory},
            "/faults": {"GET": self._get_faults, "POST": self._set_faults},
            "/config": {"GET": self._get_config, "POST": self._set_config},
            "/tokens/revoke": {"POST": self._revoke},
            "/webhooks": {"GET": lambda _: self.webhooks.summary(),
                          "POST": self._set_webhooks},
            "/box-office": {"POST": self._box_office},
            "/reset": {"POST": self._reset},
        }
        self._control = {CONTROL + path: methods for path, methods in control.items()}

    # -- dispatch ---------------------------------------------------------

    def __call__(self, request: Request) -> Response | Coroutine[Any, Any, Response]:
        """Answer one request, now or (with injected delays) later."""
        path = request.path
        routes = self._routes.get(path)
        if routes is None and path.startswith(GET_ORDER_PREFIX):
            routes = (self._refund_routes if path.endswith(REFUND_SUFFIX)
                      else self._get_order_routes)
        if routes is None:
            return self._control_call(request)
        route = routes.get(request.method)
        if route is None:
            return self._method_not_allowed(routes)
        endpoint = route.endpoint
        self.requests[endpoint] = self.requests.get(endpoint, 0) + 1
        if endpoint == "confirm":
            # Which orders a confirm ever reached: what an "unsettled" outcome may claim.
            order_id = request.headers.get("ob-order-id", "").strip()[:64]
            self.confirm_calls[order_id] = self.confirm_calls.get(order_id, 0) + 1
        decision = self.faults.decide(endpoint)
        self._count_second(decision.outcome == "rate_limit")
        if decision is OK:
            return self._call(route, request)
        outcome = decision.outcome
        if (decision.latency > 0 or (outcome == "slow_after" and decision.slow_after > 0)
                or (outcome == "late" and decision.late > 0)):
            return self._delayed(route, request, decision)
        return self._outcome(route, request, decision)

    def _count_second(self, rate_limited: bool) -> None:
        second = int(self._clock())
        counts = self.per_second.get(second)
        if counts is None:
            counts = self.per_second[second] = [0, 0]
            if len(self.per_second) > PER_SECOND_KEPT:
                del self.per_second[next(iter(self.per_second))]
        counts[0] += 1
        if rate_limited:
            counts[1] += 1

    @property
    def behaviour(self) -> Behaviour:
        """The switches in force (``docs/sandbox.md``, "Switches")."""
        return self._behaviour

    @behaviour.setter
    def behaviour(self, behaviour: Behaviour) -> None:
        self._behaviour = behaviour
        self.state.behaviour = behaviour
        self._empty_ok = behaviour.empty_body == "as_object"
        self._create_checks_body = behaviour.create_body == "checked"
        self._status_first = behaviour.check_order == "status_first"
        self._touch_refused = behaviour.refused_calls_touch
        self._rate_required = behaviour.missing_rate_id == "required"
        self._seat_status = behaviour.seat_unavailable_status
        self._mgmt_read = behaviour.orders_mgmt_read

    def _respond(self, status: int, doc: Any, headers: list[tuple[str, str]] | None = None,
                 ) -> Response:
        trace = ("ob-audit-trace-id", f"{self._rng.getrandbits(128):032x}")
        return Response(status, _encode(doc).encode(), [trace, *headers] if headers else [trace])

    def _error(self, status: int, code: str, message: str,
               headers: list[tuple[str, str]] | None = None) -> Response:
        return self._respond(status, {"code": code, "message": message}, headers)

    def _method_not_allowed(self, methods: Mapping[str, object]) -> Response:
        return self._error(405, "METHOD_NOT_ALLOWED", "method not allowed",
                           [("Allow", ", ".join(sorted(methods)))])

    def _call(self, route: Route, request: Request) -> Response:
        try:
            if route.auth:
                self._authorise(request)
            return self._respond(200, route.handler(request))
        except ApiError as exc:
            status = exc.status
            if exc.code == "ORDER_SEAT_NOT_AVAILABLE":
                status = self._seat_status
            return self._error(status, exc.code, exc.message)
        except OAuthError as exc:
            return self._oauth_error(exc)
        except Exception:
            log.exception("sandbox endpoint %s failed", route.endpoint)
            return self._error(500, "DIST0000", "internal error")

    def _oauth_error(self, exc: OAuthError) -> Response:
        headers = ([("WWW-Authenticate", f'Bearer error="{exc.error}"')]
                   if exc.status == 401 else None)
        return self._respond(exc.status, {"error": exc.error,
                                          "error_description": exc.description}, headers)

    def _outcome(self, route: Route, request: Request, decision: Decision) -> Response:
        """Apply an injected outcome (latency, and a late call's wait, already waited)."""
        refusal = self._injected_refusal(route, decision)
        if refusal is not None:
            return refusal
        response = self._call(route, request)
        if decision.outcome == "lost_response":
            return Response(0, drop=True)
        return response

    def _injected_refusal(self, route: Route, decision: Decision) -> Response | None:
        """The answer of an outcome that does nothing (401, 403, 429, 500, 503), else None."""
        outcome = decision.outcome
        if outcome == "error_401":
            return self._oauth_error(
                OAuthError(401, "invalid_client", "bad client credentials (injected)")
                if route.endpoint == "token" else
                OAuthError(401, "invalid_token", "the token is unknown, expired or revoked"
                                                 " (injected)"))
        if outcome == "error_403":
            return self._error(403, "FORBIDDEN_RESOURCE", "access denied (injected)")
        if outcome == "error_500":
            return self._error(500, "DIST0000", "internal error (injected)")
        if outcome == "error_503":
            return self._error(503, "DIST0000", "service unavailable (injected)",
                               [_retry_after(decision.retry_after)])
        if outcome in ("throttle_429", "rate_limit"):
            return self._error(429, "TOO_MANY_REQUESTS", "too many requests",
                               [_retry_after(decision.retry_after)])
        return None

    async def _delayed(self, route: Route, request: Request, decision: Decision) -> Response:
        # A late call waits before doing the work: its client has given up by then and
        # its other calls land first. The HTTP layer never cancels this when the client
        # goes away, so the work is done all the same.
        wait = decision.latency + (decision.late if decision.outcome == "late" else 0.0)
        if wait > 0:
            await asyncio.sleep(wait)
        response = self._outcome(route, request, decision)
        if decision.outcome == "slow_after" and decision.slow_after > 0:
            await asyncio.sleep(decision.slow_after)
        return response

    def _authorise(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OAuthError(401, "invalid_token", "a bearer token is required")
        if not self.tokens.valid(token.strip()):
            raise OAuthError(401, "invalid_token", "the token is unknown, expired or revoked")

    # -- the Onebox endpoints ---------------------------------------------

    def _token(self, request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise OAuthError(400, "invalid_request", "the body must be form-urlencoded")
        form = parse_qs(request.body.decode("utf-8", errors="replace"), keep_blank_values=True)

        def value(key: str) -> str:
            found = form.get(key, [""])[0]
            if not found:
                raise OAuthError(400, "invalid_request", f"{key} is required")
            return found

        if value("grant_type") != "client_credentials":
            raise OAuthError(400, "unsupported_grant_type", "only client_credentials is supported")
        client_id, channel_id = value("client_id"), value("channel_id")
        secret = value("client_secret")
        good = client_id == CLIENT_ID
        good &= hmac.compare_digest(channel_id.encode(), self.options.channel_id.encode())
        good &= hmac.compare_digest(secret.encode(), self.options.api_key.encode())
        if not good:
            raise OAuthError(401, "invalid_client", "bad client credentials")
        return {
            "access_token": self.tokens.issue(self.token_ttl),
            "token_type": "bearer",
            "refresh_token": secrets.token_urlsafe(32),
            "expires_in": int(self.token_ttl),
            "scope": "seller-channel",
            "jti": str(uuid.uuid4()),
        }

    def _body(self, request: Request) -> dict[str, Any]:
        return _json_body(request, empty_ok=self._empty_ok)

    def _order(self, request: Request, call: str, action: str) -> Order:
        """The order named in ``ob-order-id``; with ``check_order=status_first`` its
        status is checked here, before the fields."""
        order_id = request.headers.get("ob-order-id", "").strip()
        if not order_id:
            raise ApiError(400, "PARAMETER_REQUIRED", "header ob-order-id is required")
        order = self.state.order(order_id, touch=self._touch_refused)
        if self._status_first:
            self.state.check_status(order, call, action)
        return order

    def _answer(self, order: Order) -> dict[str, Any]:
        """A call on ``order`` succeeded: touch it if refusals do not, and render it."""
        if not self._touch_refused:
            self.state.touch(order)
        return self.state.render(order)

    def _rate_id(self, data: Mapping[str, Any]) -> int | None:
        if self._rate_required:
            return _int(_required(data, "rate_id"), "rate_id")
        return _optional_int(data, "rate_id")

    def _create(self, request: Request) -> dict[str, Any]:
        if self._create_checks_body:
            self._body(request)
        return self.state.render(self.state.create_order())

    def _seats(self, request: Request) -> dict[str, Any]:
        data = self._body(request)
        order = self._order(request, ADD, "add seats to")
        raw_seats = _required(data, "seats")
        if not isinstance(raw_seats, list) or not raw_seats:
            raise ApiError(400, "DIST0005", "seats must be a non-empty list")
        seats = []
        for raw in raw_seats:
            if not isinstance(raw, dict):
                raise ApiError(400, "DIST0005", "each seat must be an object")
            seats.append((_int(_required(raw, "id"), "id"),
                          _int(_required(raw, "session_id"), "session_id"),
                          self._rate_id(raw)))
        self.state.add_seats(order, seats)
        return self._answer(order)

    def _seats_auto(self, request: Request) -> dict[str, Any]:
        data = self._body(request)
        order = self._order(request, ADD, "add seats to")
        session_id = _int(_required(data, "session_id"), "session_id")
        price_type_id = _int(_required(data, "price_type_id"), "price_type_id")
        quantity = _int(_required(data, "quantity"), "quantity")
        self.state.add_seats_auto(order, session_id, price_type_id, quantity,
                                  self._rate_id(data))
        return self._answer(order)

    def _buyer_data(self, request: Request) -> dict[str, Any]:
        data = self._body(request)
        order = self._order(request, ADD, "set the buyer of")
        email = _required(data, "email")
        if not isinstance(email, str) or "@" not in email:
            raise ApiError(400, "DIST0005", "email must be an e-mail address")
        for key, value in data.items():
            if value is not None and not isinstance(value, str):
                raise ApiError(400, "DIST0005", f"{key} must be a string")
        self.state.set_buyer(order, data)
        return self._answer(order)

    def _pre_confirm(self, request: Request) -> dict[str, Any]:
        data = self._body(request)
        order = self._order(request, PRE_CONFIRM_CALL, "pre-confirm")
        self.state.pre_confirm(order, _optional_str(data, "delivery_method"))
        return self._answer(order)

    def _confirm(self, request: Request) -> dict[str, Any]:
        data = self._body(request)
        order = self._order(request, CONFIRM_CALL, "confirm")
        payments = data.get("payments")
        if payments is not None and not isinstance(payments, list):
            raise ApiError(400, "DIST0005", "payments must be a list")
        was_confirmed = order.status == CONFIRM
        self.state.confirm(order, _optional_str(data, "external_code"), payments)
        if not was_confirmed:
            self._remember_host(request)
            self.notify(order, "PURCHASE")
        return self._answer(order)

    # -- webhooks -----------------------------------------------------------------

    def _tell_channel(self, order: Order, action: str) -> None:
        self.notify(order, action)

    def notify(self, order: Order, action: str, subtype: str | None = None) -> bool:
        """Send the channel Onebox's webhook for ``action`` on ``order`` (PURCHASE on
        confirm; REFUND from a refund; CANCEL, REFUND from the box office). Returns at
        once: the sending thread delivers and retries. False when no target is set."""
        if order.code is None:
            return False
        url = f"{self._base_url}{GET_ORDER_PREFIX}{order.code}"
        return self.webhooks.notify(action, order.code, url, self.behaviour.webhook_signature,
                                    subtype)

    def _remember_host(self, request: Request) -> None:
        host = request.headers.get("host", "").strip()
        if host and all(c.isalnum() or c in ".:-[]" for c in host):
            self._base_url = f"http://{host}"

    def _set_webhooks(self, request: Request) -> dict[str, Any]:
        try:
            self.webhooks.configure(self.webhooks.target.replace(_json_body(request)))
        except (WebhookConfigError, TypeError) as exc:
            raise ApiError(400, "DIST0005", str(exc)) from exc
        return self.webhooks.summary()

    def _box_office(self, request: Request) -> dict[str, Any]:
        """A REFUND or CANCEL of a confirmed order done elsewhere (the box office, Onebox's
        console): the channel hears of it by webhook only."""
        data = _json_body(request)
        code = _required(data, "code")
        action = _required(data, "action")
        subtype = _optional_str(data, "subtype")
        if not isinstance(code, str) or action not in BOX_OFFICE_ACTIONS:
            raise ApiError(400, "DIST0005", f"code is an order code, action one of "
                                            f"{list(BOX_OFFICE_ACTIONS)}")
        order = self.state.order_by_code(code)
        if order.status != CONFIRM:
            raise ApiError(409, "PRODUCT_STATE_INVALID", "only a confirmed order can be "
                                                         "refunded or cancelled")
        self._remember_host(request)
        return {"code": code, "action": action, "notified": self.notify(order, action, subtype)}

    def _release(self, request: Request) -> dict[str, Any]:
        order = self._order(request, RELEASE, "release seats of")
        raw_ids = parse_qs(request.query).get("id", [])
        if not raw_ids:
            raise ApiError(400, "PARAMETER_REQUIRED", "at least one id is required")
        try:
            item_ids = [int(raw) for raw in raw_ids]
        except ValueError as exc:
            raise ApiError(400, "DIST0005", "id must be an integer") from exc
        self.state.release(order, item_ids)
        return self._answer(order)

    def _get_order(self, request: Request) -> dict[str, Any]:
        if self._mgmt_read != "ok":
            if self._mgmt_read == "401":
                raise OAuthError(401, "invalid_token",
                                 "the token is not valid for the orders-management API")
            if self._mgmt_read == "404":
                raise ApiError(404, "ORDER_NOT_FOUND", "order not found")
            raise ApiError(403, "FORBIDDEN_RESOURCE",
                           "the channel may not use the orders-management API")
        code = unquote(request.path[len(GET_ORDER_PREFIX):])
        return self.state.read_by_code(code)

    def _refund(self, request: Request) -> dict[str, Any]:
        """``POST /orders-mgmt-api/v1/orders/{code}/refund``: answers the order as it now stands.

        Body: ``type`` (``MANUAL``), ``items`` (``[{"id": N}, ...]``; absent or empty:
        every item) and the optional surcharge flags. The rules are ``SandboxState.refund``.
        """
        data = _json_body(request, empty_ok=False)
        code = unquote(request.path[len(GET_ORDER_PREFIX):-len(REFUND_SUFFIX)])
        if _required(data, "type") != REFUND_TYPE:
            raise ApiError(400, "DIST0005", f"type must be {REFUND_TYPE}")
        for flag in REFUND_FLAGS:
            if data.get(flag) is not None and not isinstance(data[flag], bool):
                raise ApiError(400, "DIST0005", f"{flag} must be true or false")
        raw_items = data.get("items")
        if raw_items is not None and not isinstance(raw_items, list):
            raise ApiError(400, "DIST0005", "items must be a list")
        item_ids = []
        for raw in raw_items or ():
            if not isinstance(raw, dict):
                raise ApiError(400, "DIST0005", "each item must be an object")
            item_ids.append(_int(_required(raw, "id"), "id"))
        order = self.state.order_by_code(code)
        self.state.refund(order, item_ids)
        return self.state.render(order)

    # -- control endpoints -----------------------------------------------------

    def _control_call(self, request: Request) -> Response:
        methods = self._control.get(request.path)
        if methods is None:
            return self._error(404, "NOT_FOUND", f"no such path {request.path}")
        handler = methods.get(request.method)
        if handler is None:
            return self._method_not_allowed(methods)
        try:
            return self._respond(200, handler(request))
        except ApiError as exc:
            return self._error(exc.status, exc.code, exc.message)

    def _audit(self, _: Request) -> dict[str, Any]:
        audit = self.state.audit()
        audit["requests"] = dict(self.requests)
        audit["per_second"] = {str(second): {"requests": calls, "rate_limited": limited}
                               for second, (calls, limited) in self.per_second.items()}
        audit["faults"] = {name: dict(kinds) for name, kinds in self.faults.counts.items()}
        audit["tokens_issued"] = self.tokens.issued
        return audit

    def _inventory(self, request: Request) -> dict[str, Any]:
        raw = parse_qs(request.query).get("session_id", [""])[0]
        if not raw:
            raise ApiError(400, "PARAMETER_REQUIRED", "session_id is required")
        if not raw.isdigit():
            raise ApiError(400, "DIST0005", "session_id must be an integer")
        return self.state.inventory(int(raw))

    def _get_faults(self, _: Request) -> dict[str, Any]:
        plan = self.faults.plan.to_dict()
        plan["script_remaining"] = self.faults.script_remaining()
        return plan

    def _set_faults(self, request: Request) -> dict[str, Any]:
        try:
            plan = FaultPlan.from_dict(_json_body(request))
        except FaultPlanError as exc:
            raise ApiError(400, "INVALID_FAULT_PLAN", str(exc)) from exc
        self.faults = FaultInjector(plan, self.options.seed, counts=self.faults.counts)
        return self._get_faults(request)

    def _get_config(self, _: Request) -> dict[str, Any]:
        return {"token_ttl": self.token_ttl, "basket_ttl": self.state.basket_ttl,
                "max_items": self.state.max_items, **self.behaviour.to_dict()}

    def _set_config(self, request: Request) -> dict[str, Any]:
        data = _json_body(request)
        switches = Behaviour.keys()
        unknown = set(data) - set(SETTINGS) - set(switches)
        if unknown:
            raise ApiError(400, "DIST0005", f"unknown settings {sorted(unknown)}")
        try:
            behaviour = self.behaviour.replace({k: v for k, v in data.items() if k in switches})
        except BehaviourError as exc:
            raise ApiError(400, "DIST0005", str(exc)) from exc
        for key in ("token_ttl", "basket_ttl"):
            value = data.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or value <= 0):
                raise ApiError(400, "DIST0005", f"{key} must be a number > 0")
        max_items = _optional_int(data, "max_items")
        if max_items is not None and max_items < 1:
            raise ApiError(400, "DIST0005", "max_items must be >= 1")
        if "token_ttl" in data:
            self.token_ttl = float(data["token_ttl"])
        if "basket_ttl" in data:
            self.state.sweep()  # baskets already due go now, under the old TTL
            self.state.basket_ttl = float(data["basket_ttl"])
        if max_items is not None:
            self.state.max_items = max_items
        if behaviour is not self.behaviour:
            self.state.sweep()  # baskets already due go under the old switches
            self.behaviour = behaviour
        return self._get_config(request)

    def _revoke(self, _: Request) -> dict[str, Any]:
        return {"revoked": self.tokens.revoke_all()}

    def _reset(self, _: Request) -> dict[str, Any]:
        options = self.options
        self.state.reset()
        self.state.basket_ttl = options.basket_ttl
        self.state.max_items = options.max_items
        self.token_ttl = options.token_ttl
        self.behaviour = options.behaviour
        self.tokens.revoke_all()
        self.tokens.issued = 0
        self.requests.clear()
        self.confirm_calls.clear()
        self.per_second.clear()
        self.faults = FaultInjector(FaultPlan(), options.seed)
        self.webhooks.reset(options.webhooks)
        return {"ok": True}
