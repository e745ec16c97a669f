"""The receiver: a small WSGI app that takes Onebox's webhooks and answers fast.

``POST /webhooks/onebox``, in this order:

1. The body is read whole, at most ``MAX_BODY`` bytes (413 past it).
2. ``ob-signature`` is checked against the raw body (``signature``): missing or
   wrong is 401 and nothing else happens: no Redis read, no mark, no task.
3. ``ob-action`` and the body's ``code`` are checked (400 if malformed). An
   action we do not act on (PRINT, BOOKING, RELOCATE...) is answered 200
   ``ignored``.
4. A (code, action) handed over already is answered 200 ``duplicate``: Onebox
   makes a new ``ob-delivery-id`` per attempt, so the id cannot tell.
5. The notice is handed to a task (``hand_over``, from ``tasks.webhooks``),
   then (code, action) is marked; answered 200 ``accepted``.

Why hand over first and mark second: a mark written first and a hand-over
that then fails (the broker is down, the process is killed between the two)
would turn Onebox's retries into "duplicate" answers, and a refund or a
cancellation would never reach the shop. Handing over first, a failed hand-over
answers 503 with nothing marked, and Onebox retries. The price is that two
deliveries can both be handed over (a concurrent retry, or a crash between
hand-over and mark): so the task is idempotent on its own. Settling is
(``flow.settle`` leaves anything but an unsettled outcome alone), and the
after-sale event is published once per (code, action) under a lock and a
published mark of its own (``fulfilment.webhooks.actions``). The receiver's
mark saves the broker and the workers the work of Onebox's retries; the
task's guarantees that they act once.

``GET /healthz`` answers 200 while the process serves. Nothing is logged of
the signature, the secret or the body beyond the order code and the action.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment

import redis

from fulfilment.webhooks import signature
from fulfilment.webhooks.dedupe import Dedupe
from fulfilment.webhooks.notice import (
    ACTED_ON,
    ACTION,
    CODE,
    Notice,
    optional_token,
)

log = logging.getLogger(__name__)

PATH = "/webhooks/onebox"
HEALTH_PATH = "/healthz"
#: The largest body taken: Onebox's is ``{"code", "url"}`` (and ``previous_code``).
MAX_BODY = 64 * 1024

HandOver = Callable[[Notice], None]


class WebhookReceiver:
    """The WSGI application; ``hand_over`` sends a notice to a task (and raises if it cannot)."""

    def __init__(self, *, scheme: str, secret: str, dedupe: Dedupe, hand_over: HandOver,
                 clock: Callable[[], float], max_body: int = MAX_BODY) -> None:
        if scheme not in signature.SCHEMES:
            raise ValueError(f"unknown signature scheme {scheme!r}")
        self._scheme = scheme
        self._secret = secret
        self._dedupe = dedupe
        self._hand_over = hand_over
        self._clock = clock
        self._max_body = max_body

    def __repr__(self) -> str:  # never the secret
        return f"WebhookReceiver(scheme={self._scheme!r})"

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        if path == HEALTH_PATH:
            if method not in ("GET", "HEAD"):
                return _answer(start_response, 405, {"error": "method not allowed"},
                               [("Allow", "GET, HEAD")])
            return _answer(start_response, 200, {"ok": True})
        if path != PATH:
            return _answer(start_response, 404, {"error": "not found"})
        if method != "POST":
            return _answer(start_response, 405, {"error": "method not allowed"},
                           [("Allow", "POST")])
        status, document = self.receive(environ)
        return _answer(start_response, status, document)

    def receive(self, environ: WSGIEnvironment) -> tuple[int, dict[str, Any]]:
        """One webhook: the status and JSON document to answer with."""
        body = _read_body(environ, self._max_body)
        if body is None:
            return 413, {"error": f"the body is larger than {self._max_body} bytes"}
        delivery = optional_token(environ.get("HTTP_OB_DELIVERY_ID"))
        if not signature.verify(self._scheme, self._secret, body,
                                environ.get("HTTP_OB_SIGNATURE")):
            log.warning("webhook refused: missing or wrong ob-signature (delivery %s)",
                        delivery or "-")
            return 401, {"error": "missing or wrong ob-signature"}
        action = (environ.get("HTTP_OB_ACTION") or "").strip().upper()
        if not ACTION.fullmatch(action):
            return 400, {"error": "ob-action is missing or not an Onebox action"}
        code = _code_of(body)
        if code is None:
            return 400, {"error": "the body must be a JSON object with the order's code"}
        if action not in ACTED_ON:
            log.debug("webhook %s for order %s: nothing to do", action, code)
            return 200, {"status": "ignored"}
        return self._take(action, code, delivery, optional_token(environ.get("HTTP_OB_SUBTYPE")))

    def _take(self, action: str, code: str, delivery: str | None,
              subtype: str | None) -> tuple[int, dict[str, Any]]:
        """A signed webhook we act on: deduplicate, hand over, mark."""
        try:
            if self._dedupe.seen(code, action):
                log.info("webhook %s for order %s: handed over already (delivery %s)",
                         action, code, delivery or "-")
                return 200, {"status": "duplicate"}
            notice = Notice(action=action, code=code, received_at=self._clock(),
                            delivery_id=delivery, subtype=subtype)
        except redis.RedisError as exc:
            log.error("webhook %s for order %s: Redis unreachable (%s); Onebox retries",
                      action, code, type(exc).__name__)
            return 503, {"error": "cannot reach Redis; try again"}
        try:
            self._hand_over(notice)
        except Exception as exc:  # noqa: BLE001 - any failure to send: Onebox retries
            log.error("webhook %s for order %s: could not hand it to a task (%s); Onebox "
                      "retries", action, code, type(exc).__name__)
            return 503, {"error": "cannot hand the webhook over; try again"}
        try:
            self._dedupe.mark(code, action)
        except redis.RedisError as exc:
            # Handed over all the same: a retry may be handed over again, which the
            # task's own once-only rule absorbs.
            log.warning("webhook %s for order %s: handed over, not marked (%s)", action,
                        code, type(exc).__name__)
        log.info("webhook %s for order %s: handed over (delivery %s)", action, code,
                 delivery or "-")
        return 200, {"status": "accepted"}


def _read_body(environ: WSGIEnvironment, limit: int) -> bytes | None:
    """The whole body, or None when it is larger than ``limit``."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit:
        return None
    stream = environ["wsgi.input"]
    body: bytes = stream.read(length) if length else stream.read(limit + 1)
    return None if len(body) > limit else body


def _code_of(body: bytes) -> str | None:
    """The order code of a webhook body, if it is a JSON object with a valid one."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    code = document.get("code") if isinstance(document, dict) else None
    return code if isinstance(code, str) and CODE.fullmatch(code) else None


def _answer(start_response: StartResponse, status: int, document: dict[str, Any],
            headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = json.dumps(document, separators=(",", ":")).encode()
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
              405: "Method Not Allowed", 413: "Content Too Large",
              503: "Service Unavailable"}.get(status, "")
    start_response(f"{status} {reason}", [("Content-Type", "application/json"),
                                          ("Content-Length", str(len(body))),
                                          *(headers or [])])
    return [body]
