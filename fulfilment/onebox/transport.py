"""Turn what happened on the wire into one of the three error kinds.

The rule that matters: a request that may have reached Onebox is never
reported as transient unless it is safe to send again. A POST whose connection
dropped or timed out after it was sent is ``OutcomeUnknownError``; only a
failure to connect at all is ``TransientError``.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

import requests
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from fulfilment.errors import (
    FulfilmentError,
    OutcomeUnknownError,
    PermanentError,
    TransientError,
)
from fulfilment.redact import scrub
from schemas.onebox import load_api_error

TRACE_HEADER = "ob-audit-trace-id"
#: Statuses after which the server did nothing and asks to be asked again later.
RETRY_LATER_STATUSES = frozenset({408, 425, 429, 503})
#: Cap on a server-requested wait, so a bogus Retry-After cannot park a task for days.
MAX_RETRY_AFTER = 300.0


def classify_send_error(exc: requests.RequestException, *, step: str,
                        idempotent: bool) -> FulfilmentError:
    """The error kind for a request that got no HTTP answer."""
    if isinstance(exc, requests.ConnectTimeout) or _never_sent(exc):
        return TransientError(f"could not connect to Onebox: {type(exc).__name__}",
                              code="CONNECT_FAILED", step=step)
    what = "timed out waiting for Onebox" if isinstance(exc, requests.Timeout) \
        else "connection to Onebox lost"
    code = "READ_TIMEOUT" if isinstance(exc, requests.Timeout) else "CONNECTION_LOST"
    if idempotent:
        return TransientError(what, code=code, step=step)
    return OutcomeUnknownError(f"{what} after the request was sent", code=code, step=step)


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the connection was never opened, so the request cannot have arrived."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, NewConnectionError | ConnectTimeoutError | ConnectionRefusedError):
            return True
        stack.extend([getattr(current, "reason", None), current.__cause__, current.__context__])
        stack.extend(arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException))
    return False


def error_for_response(response: requests.Response, *, step: str,
                       idempotent: bool) -> FulfilmentError:
    """The error kind for an HTTP answer that is not a success.

    429 and 503 say "not now": nothing was done. Any other 5xx may come from a
    server (or a gateway in front of it) that did the work and then failed, so
    for a request that is not safe to repeat its outcome is unknown.
    """
    status = response.status_code
    trace_id = response.headers.get(TRACE_HEADER)
    try:
        body = response.json()
    except ValueError:
        body = None
    api_error = load_api_error(body) if body is not None else None
    code = api_error.code if api_error else f"HTTP_{status}"
    message = scrub(api_error.message) if api_error else f"Onebox answered HTTP {status}"
    common: dict[str, Any] = {"code": code, "status": status, "trace_id": trace_id, "step": step}
    if status in RETRY_LATER_STATUSES or (status >= 500 and idempotent):
        return TransientError(message, retry_after=parse_retry_after(response), **common)
    if status >= 500:
        return OutcomeUnknownError(message, **common)
    return PermanentError(message, **common)


def parse_retry_after(response: requests.Response, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    raw = response.headers.get("Retry-After")
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
