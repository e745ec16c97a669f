"""``SandboxAdmin``: a client of the sandbox's control endpoints.

Tests, the demo and benchmarks use it to read the audit and the inventory and
to change faults or settings of a sandbox that may run in another process.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import requests


class SandboxAdmin:
    """Talks to ``/__sandbox/*`` of the sandbox at ``base_url``."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._http = requests.Session()

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    def __enter__(self) -> SandboxAdmin:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, f"{self.base_url}/__sandbox/{path}",
                                      timeout=self.timeout, **kwargs)
        response.raise_for_status()
        return response.json()

    def health(self) -> bool:
        """Whether the sandbox answers its health check."""
        return bool(self._call("GET", "health").get("ok"))

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll the health check until it answers; raise ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health():
                    return
            except requests.RequestException:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"sandbox at {self.base_url} not ready after {timeout} s")
            time.sleep(0.05)

    def audit(self) -> dict[str, Any]:
        """Order counts, confirmations by external code, duplicates, request counts."""
        result: dict[str, Any] = self._call("GET", "audit")
        return result

    def confirm_calls(self) -> dict[str, int]:
        """Order id -> how many confirm calls named it (any answer, injected faults too)."""
        result: dict[str, int] = self._call("GET", "confirm-calls")["orders"]
        return result

    def inventory(self, session_id: int) -> dict[str, Any]:
        """Seat states and place counts of a session."""
        result: dict[str, Any] = self._call("GET", "inventory", params={"session_id": session_id})
        return result

    def set_faults(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Replace the fault plan; returns it as the sandbox now holds it."""
        result: dict[str, Any] = self._call("POST", "faults", json=plan)
        return result

    def get_faults(self) -> dict[str, Any]:
        """The current fault plan, with what is left of each script."""
        result: dict[str, Any] = self._call("GET", "faults")
        return result

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change ``token_ttl``, ``basket_ttl``, ``max_items`` or any ``Behaviour`` switch
        (``configure(repeat_status_call="idempotent", orders_mgmt_lag_ms=500)``); all or
        nothing is applied. Returns every setting and switch as they now stand."""
        result: dict[str, Any] = self._call("POST", "config", json=settings)
        return result

    def webhooks(self, **target: Any) -> dict[str, Any]:
        """Change where and how webhooks go (``url``, ``secret``, ``retries``, ``backoff_min``,
        ``backoff_max``, ``delivery``, ``timeout``); with no argument, only read. Returns the
        target (never the secret), counts and the deliveries so far."""
        if not target:
            return dict(self._call("GET", "webhooks"))
        return dict(self._call("POST", "webhooks", json=target))

    def box_office(self, code: str, action: str, subtype: str | None = None) -> dict[str, Any]:
        """A REFUND or CANCEL of a confirmed order done outside the channel: the sandbox
        sends the webhook."""
        body: dict[str, Any] = {"code": code, "action": action}
        if subtype is not None:
            body["subtype"] = subtype
        return dict(self._call("POST", "box-office", json=body))

    def revoke_tokens(self) -> int:
        """Invalidate every issued token; returns how many were live."""
        return int(self._call("POST", "tokens/revoke")["revoked"])

    def reset(self) -> None:
        """Forget orders, holds, sales, tokens, counters and faults."""
        self._call("POST", "reset")
