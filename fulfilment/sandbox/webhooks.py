"""The sandbox's webhooks: it notifies the channel as Onebox's notification service does.

What Onebox is known to do (docs/onebox-contract, "After the sale"): a POST to
the channel's URL with the headers ``ob-event``, ``ob-action``,
``ob-delivery-id``, ``ob-hook-id``, ``ob-signature`` (and ``ob-subtype`` when
there is one), the body ``{"code", "url"}``; a **new delivery id on every
attempt**; 3 retries with a 1-10 s backoff, then the notification is dropped.

What is not known is a switch: how ``ob-signature`` is computed (the
``webhook_signature`` behaviour switch, the names ``fulfilment.webhooks.signature``
knows), and ``ob-event``'s value (``ORDER`` here).

``WebhookTarget`` says where and how to send; ``delivery`` bends it for tests:
``lost_answer`` treats every answer as lost, so each notification is sent
1 + ``retries`` times with as many delivery ids (what a receiver sees when its
answers time out on Onebox's side); ``drop`` never sends (a dropped webhook).

Sending happens on a thread of its own, never on the sandbox's event loop: a
slow or dead receiver delays no Onebox call.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import requests

from fulfilment.webhooks.signature import SCHEMES, sign

log = logging.getLogger(__name__)

DELIVERIES = ("normal", "lost_answer", "drop")
#: ``ob-event`` of an order notification (the real value is not published).
EVENT = "ORDER"
#: Delivery records kept for ``GET /__sandbox/webhooks`` (the newest).
KEPT = 1000


class WebhookConfigError(ValueError):
    """A webhook setting the sandbox does not take."""


@dataclass(frozen=True)
class WebhookTarget:
    """Where notifications go and how they are retried; no ``url``: none are sent."""

    url: str = ""
    secret: str = field(default="", repr=False)
    #: Sends after the first that failed (Onebox: 3), each with a new delivery id.
    retries: int = 3
    #: Seconds before the first retry; doubled each retry, at most ``backoff_max``.
    backoff_min: float = 1.0
    backoff_max: float = 10.0
    #: ``normal``, ``lost_answer`` (every send counts as failed) or ``drop`` (none sent).
    delivery: str = "normal"
    #: Seconds to wait for the receiver's answer.
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise WebhookConfigError("url must be an http:// or https:// URL (or empty: off)")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) \
                or not 0 <= self.retries <= 10:
            raise WebhookConfigError("retries must be a whole number from 0 to 10")
        for name in ("backoff_min", "backoff_max", "timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise WebhookConfigError(f"{name} must be a number >= 0")
        if self.backoff_max < self.backoff_min:
            raise WebhookConfigError("backoff_max must be >= backoff_min")
        if self.delivery not in DELIVERIES:
            raise WebhookConfigError(f"delivery must be one of {list(DELIVERIES)}")
        if not isinstance(self.secret, str):
            raise WebhookConfigError("secret must be a string")

    def replace(self, changes: Mapping[str, Any]) -> WebhookTarget:
        """A copy with ``changes`` (JSON values) applied; unknown keys refused."""
        known = {"url", "secret", "retries", "backoff_min", "backoff_max", "delivery", "timeout"}
        unknown = set(changes) - known
        if unknown:
            raise WebhookConfigError(f"unknown webhook settings {sorted(unknown)}; "
                                     f"known: {sorted(known)}")
        return replace(self, **changes)

    def shown(self) -> dict[str, Any]:
        """The target as the control endpoint shows it: never the secret."""
        return {"url": self.url, "secret_set": bool(self.secret), "retries": self.retries,
                "backoff_min": self.backoff_min, "backoff_max": self.backoff_max,
                "delivery": self.delivery, "timeout": self.timeout}


@dataclass(frozen=True)
class _Notification:
    action: str
    code: str
    url: str
    subtype: str | None
    scheme: str
    target: WebhookTarget


class WebhookSender:
    """Sends notifications from a thread of its own, retrying on a schedule (a heap)."""

    def __init__(self, target: WebhookTarget | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._target = target or WebhookTarget()
        self._clock = clock
        self.hook_id = uuid.uuid4().hex
        self._due: list[tuple[float, int, _Notification, int]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._generation = 0
        self.deliveries: deque[dict[str, Any]] = deque(maxlen=KEPT)
        self.counts = {"notifications": 0, "sent": 0, "delivered": 0, "dropped": 0}

    @property
    def target(self) -> WebhookTarget:
        return self._target

    def configure(self, target: WebhookTarget) -> None:
        """Send later notifications (and retries not yet sent) to this target."""
        with self._cond:
            self._target = target

    def reset(self, target: WebhookTarget) -> None:
        """Forget what was sent and what waits; a new hook id."""
        with self._cond:
            self._target = target
            self._due.clear()
            self._generation += 1
            self.deliveries.clear()
            self.counts = dict.fromkeys(self.counts, 0)
            self.hook_id = uuid.uuid4().hex

    def notify(self, action: str, code: str, url: str, scheme: str,
               subtype: str | None = None) -> bool:
        """Queue a notification; False when no target is set (nothing is sent)."""
        if scheme not in SCHEMES:
            raise WebhookConfigError(f"unknown signature scheme {scheme!r}")
        with self._cond:
            target = self._target
            if not target.url or self._closed:
                return False
            self.counts["notifications"] += 1
            notification = _Notification(action, code, url, subtype, scheme, target)
            if target.delivery == "drop":
                self.counts["dropped"] += 1
                self._record(notification, 0, None, outcome="dropped")
                return True
            self._schedule(notification, 1, 0.0)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sandbox-webhooks",
                                                daemon=True)
                self._thread.start()
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def summary(self) -> dict[str, Any]:
        with self._cond:
            return {"hook_id": self.hook_id, **self._target.shown(), **self.counts,
                    "waiting": len(self._due), "deliveries": list(self.deliveries)}

    # -- the sending thread -------------------------------------------------------------

    def _schedule(self, notification: _Notification, attempt: int, delay: float) -> None:
        heapq.heappush(self._due, (self._clock() + delay, next(self._order), notification,
                                   attempt))
        self._cond.notify_all()

    def _run(self) -> None:
        with requests.Session() as http:
            while True:
                with self._cond:
                    while not self._closed and (not self._due or
                                                self._due[0][0] > self._clock()):
                        wait = self._due[0][0] - self._clock() if self._due else None
                        self._cond.wait(wait)
                    if self._closed:
                        return
                    _, _, notification, attempt = heapq.heappop(self._due)
                    generation = self._generation
                self._send(http, notification, attempt, generation)

    def _send(self, http: requests.Session, notification: _Notification, attempt: int,
              generation: int) -> None:
        target = notification.target
        body = json.dumps({"code": notification.code, "url": notification.url},
                          separators=(",", ":")).encode()
        delivery_id = str(uuid.uuid4())  # a new one on every attempt, as Onebox does
        headers = {"Content-Type": "application/json", "ob-event": EVENT,
                   "ob-action": notification.action, "ob-delivery-id": delivery_id,
                   "ob-hook-id": self.hook_id}
        if notification.subtype:
            headers["ob-subtype"] = notification.subtype
        signature = sign(notification.scheme, target.secret, body)
        if signature is not None:
            headers["ob-signature"] = signature
        status: int | None = None
        error: str | None = None
        said: str | None = None
        try:
            answer = http.post(target.url, data=body, headers=headers,
                               timeout=(2.0, target.timeout))
            status = answer.status_code
            said = _status_word(answer)
        except requests.RequestException as exc:
            error = type(exc).__name__
        delivered = status is not None and 200 <= status < 300 and \
            target.delivery != "lost_answer"
        with self._cond:
            if generation != self._generation:
                return  # reset meanwhile: forgotten
            self.counts["sent"] += 1
            if delivered:
                self.counts["delivered"] += 1
                outcome = "delivered"
            elif attempt <= target.retries:
                outcome = "retrying"
                delay = min(target.backoff_max, target.backoff_min * 2 ** (attempt - 1))
                self._schedule(notification, attempt + 1, delay)
            else:
                self.counts["dropped"] += 1
                outcome = "dropped"
            self._record(notification, attempt, delivery_id, outcome=outcome, status=status,
                         error=error, answer=said)
        log.debug("webhook %s %s attempt %d: %s", notification.action, notification.code,
                  attempt, outcome)

    def _record(self, notification: _Notification, attempt: int, delivery_id: str | None, *,
                outcome: str, status: int | None = None, error: str | None = None,
                answer: str | None = None) -> None:
        self.deliveries.append({"action": notification.action, "code": notification.code,
                                "attempt": attempt, "delivery_id": delivery_id,
                                "status": status, "answer": answer, "error": error,
                                "outcome": outcome})


def _status_word(answer: requests.Response) -> str | None:
    """The receiver's ``status`` (``fulfilment webhooks`` answers one), for tests to read."""
    try:
        document = answer.json()
    except ValueError:
        return None
    word = document.get("status") if isinstance(document, dict) else None
    return word[:32] if isinstance(word, str) else None
