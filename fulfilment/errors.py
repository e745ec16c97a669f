"""One root error; its subclass says what the caller does next.

- ``TransientError``: nothing happened, or nothing that matters; retry later
  (honour ``retry_after`` when the server gave one).
- ``PermanentError``: retrying cannot help (a seat is sold, the data is invalid).
- ``OutcomeUnknownError``: the request may have reached Onebox and been done;
  find out what happened before acting again (never blindly repeat a POST).
- ``HeldBackError`` (a ``TransientError``: ``CircuitOpenError``,
  ``RateLimitedError``): the call was never sent; waiting is not failing.

Every error may carry what Onebox said: HTTP status, Onebox's ``code`` and
``message``, and the ``ob-audit-trace-id`` support asks for. Messages must never
hold secrets or buyer data: build them from codes and ids only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class FulfilmentError(Exception):
    """Root of every error this project raises on purpose."""

    #: Whether retrying the same operation later may succeed.
    retryable: bool = False
    #: Our own error code when Onebox gave none.
    default_code: str = "FULFILMENT_ERROR"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        trace_id: str | None = None,
        step: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        # What Onebox sends is bounded here, so a result built from it always loads.
        self.code = (code or self.default_code)[:64]
        self.status = status
        self.trace_id = trace_id[:128] if trace_id else None
        self.step = step[:64] if step else None
        self.retry_after = retry_after

    def __str__(self) -> str:
        parts = [self.message]
        if self.code:
            parts.append(f"code={self.code}")
        if self.status is not None:
            parts.append(f"status={self.status}")
        if self.step:
            parts.append(f"step={self.step}")
        if self.trace_id:
            parts.append(f"trace_id={self.trace_id}")
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The error as it appears in a result message."""
        return {
            "code": self.code,
            "message": self.message,
            "step": self.step,
            "retryable": self.retryable,
            "trace_id": self.trace_id,
        }


class TransientError(FulfilmentError):
    """Nothing was done (or it is safe to do again): retry with backoff."""

    retryable = True
    default_code = "TRANSIENT"


class HeldBackError(TransientError):
    """The call was never sent: our own guard held it back (``fulfilment.onebox.guard``).

    Always safe to retry, and not a failure of the purchase: it uses up no
    attempts (the retry deadline still bounds it). ``retry_after`` says when.
    """

    default_code = "HELD_BACK"


class CircuitOpenError(HeldBackError):
    """Onebox keeps failing: calls are paused until the circuit breaker's probe succeeds."""

    default_code = "CIRCUIT_OPEN"


class RateLimitedError(HeldBackError):
    """The fleet's shared rate limit has no slot for this call soon enough."""

    default_code = "RATE_LIMITED"


class PermanentError(FulfilmentError):
    """Retrying cannot help: the purchase fails with this reason."""

    default_code = "PERMANENT"


class AlreadyRefundedError(PermanentError):
    """Onebox refused a refund because an item named is already REFUNDED (its 409
    ``PRODUCT_STATE_INVALID``): nothing was done now, and for a repeated refund that
    is success. ``status`` and ``trace_id`` are the 409's."""

    default_code = "ALREADY_REFUNDED"


class OutcomeUnknownError(FulfilmentError):
    """The request may have been done by the server: reconcile before acting."""

    retryable = True
    default_code = "OUTCOME_UNKNOWN"


class InvalidMessageError(PermanentError):
    """A payload failed its contract; ``errors`` maps each field to its reasons."""

    default_code = "INVALID_MESSAGE"

    def __init__(self, message: str, errors: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.errors = dict(errors)

    def __str__(self) -> str:
        return f"{super().__str__()} errors={self.errors}"


class ConfigError(FulfilmentError):
    """A setting is missing or malformed: fail at start-up with one clear line."""

    default_code = "CONFIG_ERROR"
